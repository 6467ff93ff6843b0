"""The image and text towers of CLIP, faithful to OpenAI/open_clip (and big_vision where flagged)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clipup_jax.config import Activation, TextConfig, VisionConfig
from clipup_jax.models.encoder import Encoder, Record
from clipup_jax.models.layers import LayerNorm, Projection, normal


class VisionTower(nnx.Module):
    """Patchify (a bias-free conv as one matmul), [cls], +pos, ln_pre, blocks, ln_post, pool, project."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, activation: Activation, ln_eps: float, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32, encoder: Encoder | None = None, remat: str = "none",
                 scan: bool = False):
        self.cfg = cfg
        self.dtype = dtype
        w, p = cfg.width, cfg.patch_size
        scale = w**-0.5
        self.patch_kernel = nnx.Param(normal(rngs, (p, p, 3, w), (3 * p * p) ** -0.5),
                                      logical_axes=(None, None, None, "embed"))
        self.patch_bias = nnx.Param(jnp.zeros((w,), jnp.float32), logical_axes=("embed",)) if cfg.patch_bias else None
        self.class_embedding = (
            nnx.Param(normal(rngs, (w,), scale), logical_axes=("embed",)) if cfg.class_token else None
        )
        self.pos_embed = nnx.Param(normal(rngs, (cfg.num_positions, w), scale), logical_axes=(None, "embed"))
        self.ln_pre = LayerNorm(w, ln_eps) if cfg.ln_pre else None
        # `encoder` is given when both towers share one backbone (LIMoE-style).
        if encoder is None:
            encoder = Encoder(w, cfg.heads, cfg.mlp_dim, cfg.depth, activation, ln_eps, rngs, dtype, cfg.moe, remat, scan)
        self.encoder = encoder
        self.ln_post = LayerNorm(w, ln_eps)
        self.proj = Projection(w, embed_dim, cfg.proj_bias, rngs, dtype)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, dict[int, Record]]:
        """pixels: (B, H, W, 3), normalised. Returns projected, unnormalised features (B, embed_dim), and the
        encoder's records per block (`Encoder.records`)."""
        cfg = self.cfg
        b, h, w_, c = pixels.shape
        if (h, w_, c) != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"image tower expects (B, {cfg.image_size}, {cfg.image_size}, 3) pixels, got {pixels.shape}")
        g, p = cfg.grid, cfg.patch_size
        patches = pixels.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * 3)
        x = patches.astype(self.dtype) @ self.patch_kernel[...].reshape(p * p * 3, -1).astype(self.dtype)
        if self.patch_bias is not None:
            x = x + self.patch_bias[...].astype(self.dtype)
        pos = self.pos_embed[...].astype(self.dtype)
        if self.class_embedding is not None:
            cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, x.shape[-1]))
            if cfg.pos_embed_covers_cls:
                x = jnp.concatenate([cls, x], axis=1) + pos
            else:
                x = jnp.concatenate([cls, x + pos], axis=1)
        else:
            x = x + pos
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        if cfg.pool == "tok":  # LayerNorm is per token: normalising only the pooled one is exact
            cls, records = self.encoder(x, causal=False, pool=jnp.zeros((b,), jnp.int32))
            return self.proj(self.ln_post(cls)), records
        x, records = self.encoder(x, causal=False)
        if cfg.ln_post_after_pool:
            return self.proj(self.ln_post(x[:, int(cfg.class_token):].mean(axis=1))), records
        return self.proj(self.ln_post(x)[:, int(cfg.class_token):].mean(axis=1)), records


def text_pool_index(cfg: TextConfig, tokens: jax.Array) -> jax.Array:
    """(B,) the position each caption's features are read from, as `cfg.pool` says (open_clip's
    `text_global_pool`): the largest id (CLIP's EOT), the first `eos_id` (0 where a row has none), or an end."""
    if cfg.pool == "argmax":
        return jnp.argmax(tokens, axis=-1)
    if cfg.pool == "eos":
        return jnp.argmax(tokens == cfg.eos_id, axis=-1)
    return jnp.full(tokens.shape[:1], 0 if cfg.pool == "first" else tokens.shape[1] - 1)


def routed_tokens(cfg: TextConfig, tokens: jax.Array) -> jax.Array | None:
    """(B, L) bool: the positions whose MLP output can reach the pooled feature, the ones MoE blocks dispatch at
    inference and calibrate routers on; None where every position can (a bidirectional tower). Causal attention
    carries nothing back from a later token, so a caption's tokens after its pooled one never matter."""
    if not cfg.causal:
        return None
    return jnp.arange(tokens.shape[1]) <= text_pool_index(cfg, tokens)[:, None]


class TextTower(nnx.Module):
    """Token + position embedding, causal blocks, ln_final, pool (at EOT by default, `text_pool_index`), project."""

    def __init__(self, cfg: TextConfig, embed_dim: int, activation: Activation, ln_eps: float, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32, encoder: Encoder | None = None, remat: str = "none",
                 scan: bool = False):
        self.cfg = cfg
        self.dtype = dtype
        w = cfg.width
        self.token_embed = nnx.Param(normal(rngs, (cfg.vocab_size, w), 0.02), logical_axes=("vocab", "embed"))
        self.pos_embed = nnx.Param(normal(rngs, (cfg.context_length, w), 0.01), logical_axes=(None, "embed"))
        # `encoder` is given when both towers share one backbone (LIMoE-style).
        if encoder is None:
            encoder = Encoder(w, cfg.heads, cfg.mlp_dim, cfg.depth, activation, ln_eps, rngs, dtype, cfg.moe, remat, scan)
        self.encoder = encoder
        self.ln_final = LayerNorm(w, ln_eps)
        self.proj = Projection(w, embed_dim, cfg.proj_bias, rngs, dtype)

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, dict[int, Record]]:
        """tokens: (B, L) int ids, L <= context_length. Returns projected, unnormalised features, and the encoder's
        records per block."""
        cfg = self.cfg
        if tokens.ndim != 2 or tokens.shape[1] > cfg.context_length:
            raise ValueError(f"text tower expects (B, L<={cfg.context_length}) token ids, got {tokens.shape}")
        length = tokens.shape[1]
        x = jnp.take(self.token_embed[...], tokens, axis=0).astype(self.dtype)
        x = x + self.pos_embed[...][:length].astype(self.dtype)
        # LayerNorm is per token, so pooling before ln_final is exact and B x fewer rows to normalise.
        pooled, records = self.encoder(x, causal=cfg.causal, routed=routed_tokens(cfg, tokens),
                                       pool=text_pool_index(cfg, tokens))
        return self.proj(self.ln_final(pooled)), records
