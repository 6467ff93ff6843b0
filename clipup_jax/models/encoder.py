"""Pre-LN transformer blocks shared by both towers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clipup_jax.config import Activation, MoEPlan
from clipup_jax.models.attention import SelfAttention
from clipup_jax.models.layers import LayerNorm, Mlp
from clipup_jax.models.moe import MoeMlp


class Block(nnx.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)); the MLP is a `MoeMlp` when `moe` is given."""

    def __init__(self, width: int, heads: int, mlp_dim: int, depth: int, activation: Activation, ln_eps: float,
                 rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32, moe: MoEPlan | None = None):
        self.ln_1 = LayerNorm(width, ln_eps)
        self.attn = SelfAttention(width, heads, depth, rngs, dtype)
        self.ln_2 = LayerNorm(width, ln_eps)
        if moe is None:
            self.mlp = Mlp(width, mlp_dim, depth, activation, rngs, dtype)
        else:
            self.mlp = MoeMlp(width, mlp_dim, depth, activation, moe, rngs, dtype)

    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Encoder(nnx.Module):
    """`remat` recomputes each block's activations in the backward pass instead of storing them."""

    def __init__(self, width: int, heads: int, mlp_dim: int, depth: int, activation: Activation, ln_eps: float,
                 rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32, moe: MoEPlan | None = None, remat: bool = False):
        self.remat = remat
        sparse = set(moe.layer_indices(depth)) if moe is not None else set()
        self.blocks = nnx.List([
            Block(width, heads, mlp_dim, depth, activation, ln_eps, rngs, dtype, moe if i in sparse else None)
            for i in range(depth)
        ])

    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        for block in self.blocks:
            x = nnx.remat(lambda b, h: b(h, causal))(block, x) if self.remat else block(x, causal)
        return x
