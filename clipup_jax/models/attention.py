"""Multi-head self-attention with a fused q/k/v kernel (one matmul instead of three)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clipup_jax.models.layers import normal


class SelfAttention(nnx.Module):
    """Kernel layout `(embed, 3, heads, head_dim)`: OpenAI's packed `in_proj_weight` reshaped, q;k;v order."""

    def __init__(self, width: int, heads: int, depth: int, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        head_dim = width // heads
        self.dtype = dtype
        self.qkv_kernel = nnx.Param(normal(rngs, (width, 3, heads, head_dim), width**-0.5),
                                    logical_axes=("embed", None, "heads", "kv"))
        self.qkv_bias = nnx.Param(jnp.zeros((3, heads, head_dim), jnp.float32), logical_axes=(None, "heads", "kv"))
        out_std = width**-0.5 * (2 * depth) ** -0.5
        self.out_kernel = nnx.Param(normal(rngs, (heads, head_dim, width), out_std),
                                    logical_axes=("heads", "kv", "embed"))
        self.out_bias = nnx.Param(jnp.zeros((width,), jnp.float32), logical_axes=("embed",))

    def __call__(self, x: jax.Array, causal: bool, queries: jax.Array | None = None) -> jax.Array:
        """(B, T, D) -> (B, T, D); with `queries` (B,) positions, only those rows' outputs (B, 1, D), each still
        attending to every row of x (a tower's last block, where no other row is read)."""
        d = self.dtype
        x, kernel, bias = x.astype(d), self.qkv_kernel[...].astype(d), self.qkv_bias[...].astype(d)[:, None, :, None]
        if queries is None:
            # Heads-major (b, h, t, k) from the projection on: both attention matmuls then batch over leading axes.
            q, k, v = jnp.einsum("btd,dshk->sbhtk", x, kernel) + bias
        else:
            k, v = jnp.einsum("btd,dshk->sbhtk", x, kernel[:, 1:]) + bias[1:]
            rows = x[jnp.arange(x.shape[0]), queries][:, None]
            q = jnp.einsum("btd,dhk->bhtk", rows, kernel[:, 0]) + bias[0]
        y = attention(q, k, v, causal, None if queries is None else queries[:, None])
        return jnp.einsum("bhtk,hkd->btd", y, self.out_kernel[...].astype(d)) + self.out_bias[...].astype(d)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, positions: jax.Array | None = None
              ) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v on (B, H, T, head_dim) arrays, logits and softmax in float32;
    `positions` (B, Tq): where the queries sit among the keys, for the causal mask (default: q is every row).

    Written out rather than `jax.nn.dot_product_attention` (whose default is this same XLA computation):
    that one takes (B, T, H, K), vmaps over head groups and transposes around the softmax, which costs
    the CPU train step ~15 % of an attention layer in layout copies (profiled: benchmarks/RESULTS.md).
    """
    logits = jnp.einsum("bhtk,bhsk->bhts", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if causal:
        keys = jnp.arange(k.shape[2])
        rows = keys if positions is None else positions[:, None, :]  # (Tq,) or (B, 1, Tq)
        logits = jnp.where(rows[..., :, None] >= keys, logits, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhts,bhsk->bhtk", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
