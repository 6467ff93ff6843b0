"""Contrastive losses over the global batch (every image against every caption)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def clip_softmax_loss(image: jax.Array, text: jax.Array, scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE (CLIP): mean of image->text and text->image cross-entropy, matched pairs on the diagonal.

    `image`, `text`: (B, E) L2-normalised; `scale`: exp(logit_scale).
    """
    logits = scale * image.astype(jnp.float32) @ text.astype(jnp.float32).T
    labels = jnp.arange(logits.shape[0])
    i2t = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1).mean()
    t2i = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], axis=0).mean()
    return 0.5 * (i2t + t2i)


def siglip_sigmoid_loss(image: jax.Array, text: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """SigLIP: independent binary decisions per pair, +1 on the diagonal, -1 elsewhere; summed per image."""
    logits = scale * image.astype(jnp.float32) @ text.astype(jnp.float32).T + bias
    signs = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]


LOSSES = ("clip", "siglip")
