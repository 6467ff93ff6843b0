"""The two-tower CLIP model."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipup_jax.config import ModelConfig
from clipup_jax.models.encoder import Encoder, Record
from clipup_jax.models.layers import LN_100
from clipup_jax.models.towers import TextTower, VisionTower


class CLIPOutput(NamedTuple):
    image_features: jax.Array  # L2-normalised
    text_features: jax.Array  # L2-normalised
    logit_scale: jax.Array  # exp(clamped log scale): multiply cosine similarities by it
    logit_bias: jax.Array | None
    # What the encoders were asked to record (`Encoder.records`), by layer: 'visual/encoder/blocks/1/mlp' ->
    # {'moe': metrics, 'mlp_input': ...}; a shared backbone's text calls are the same layers with '#1'.
    records: dict[str, Record]


def l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class CLIP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32, remat: str = "none",
                 scan: bool = False):
        """`dtype` is the compute dtype (params stay float32); `remat` ("none", "full", "dots") trades compute for
        activation memory; `scan` runs repeated blocks with one `lax.scan` (same parameters; see `Encoder`)."""
        cfg.validate()
        self.cfg = cfg
        shared = None
        if cfg.shared_backbone:  # validated: both towers have the same encoder shape and MoE plan
            v = cfg.vision
            shared = Encoder(v.width, v.heads, v.mlp_dim, v.depth, cfg.activation, cfg.ln_eps, rngs, dtype, v.moe,
                             remat, scan)
        self.visual = VisionTower(cfg.vision, cfg.embed_dim, cfg.activation, cfg.ln_eps, rngs, dtype, shared, remat,
                                  scan)
        self.text = TextTower(cfg.text, cfg.embed_dim, cfg.activation, cfg.ln_eps, rngs, dtype, shared, remat, scan)
        self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32), logical_axes=())
        self.logit_bias = nnx.Param(jnp.asarray(-10.0, jnp.float32), logical_axes=()) if cfg.logit_bias else None

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        """Projected image features before normalisation, float32."""
        return self.visual(pixels)[0].astype(jnp.float32)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """Projected text features before normalisation, float32."""
        return self.text(tokens)[0].astype(jnp.float32)

    def scale(self) -> jax.Array:
        """exp(logit_scale), clamped at 100 as open_clip does after every step."""
        return jnp.exp(jnp.minimum(self.logit_scale[...], LN_100))

    def __call__(self, pixels: jax.Array, tokens: jax.Array) -> CLIPOutput:
        image, image_records = self.visual(pixels)
        text, text_records = self.text(tokens)
        records = {f"visual/encoder/blocks/{i}/mlp": r for i, r in image_records.items() if r}
        text_layer = "visual/encoder/blocks/{}/mlp#1" if self.cfg.shared_backbone else "text/encoder/blocks/{}/mlp"
        records.update({text_layer.format(i): r for i, r in text_records.items() if r})
        bias = None if self.logit_bias is None else self.logit_bias[...]
        return CLIPOutput(l2_normalize(image.astype(jnp.float32)), l2_normalize(text.astype(jnp.float32)),
                          self.scale(), bias, records)
