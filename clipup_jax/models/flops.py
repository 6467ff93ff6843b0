"""Analytic forward FLOPs of the towers (2 FLOPs per multiply-add, matmuls and attention only).

Norms, activations and softmax are left out, as in the usual ViT/CLIP accounting; the
figures equal open_clip's published model profile (tests/models/test_flops.py).
"""

from __future__ import annotations

from clipup_jax.config import ModelConfig


def _encoder_flops(tokens: int, width: int, mlp_dim: int, depth: int) -> int:
    qkv_out = 2 * tokens * width * 4 * width  # q, k, v and output projections
    attention = 2 * 2 * tokens * tokens * width  # scores and weighted values
    mlp = 2 * 2 * tokens * width * mlp_dim
    return depth * (qkv_out + attention + mlp)


def image_flops(cfg: ModelConfig) -> int:
    v = cfg.vision
    patches = v.grid**2
    tokens = patches + int(v.class_token)
    patchify = 2 * patches * v.patch_size**2 * 3 * v.width
    return patchify + _encoder_flops(tokens, v.width, v.mlp_dim, v.depth) + 2 * v.width * cfg.embed_dim


def text_flops(cfg: ModelConfig) -> int:
    """At the full context length, as the causal mask is applied to a dense attention matrix."""
    t = cfg.text
    return _encoder_flops(t.context_length, t.width, t.mlp_dim, t.depth) + 2 * t.width * cfg.embed_dim
