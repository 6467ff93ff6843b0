"""A human-readable summary of a checkpoint: architecture, parameter counts, FLOPs."""

from __future__ import annotations

from clipup_jax.checkpoints.format import Checkpoint
from clipup_jax.checkpoints.params import count_params
from clipup_jax.models.flops import image_flops, text_flops


def describe(ckpt: Checkpoint) -> str:
    cfg = ckpt.config
    v, t = cfg.vision, cfg.text
    image = count_params({k: p for k, p in ckpt.params.items() if k.startswith("visual/")})
    text = count_params({k: p for k, p in ckpt.params.items() if k.startswith("text/")})
    source = ckpt.metadata.get("source", {})
    return "\n".join([
        f"checkpoint   {ckpt.path}",
        f"kind         {ckpt.metadata['kind']} (from {source.get('format', '?')}: {source.get('path', '?')})",
        f"image tower  {v.image_size}px patch {v.patch_size}, width {v.width}, depth {v.depth}, heads {v.heads}, "
        f"mlp {v.mlp_dim}, pool {v.pool}",
        f"text tower   vocab {t.vocab_size}, context {t.context_length}, width {t.width}, depth {t.depth}, "
        f"heads {t.heads}, mlp {t.mlp_dim}, {'causal' if t.causal else 'bidirectional'}, pool {t.pool}",
        f"embed dim    {cfg.embed_dim}; activation {cfg.activation}; ln_eps {cfg.ln_eps:g}",
        f"params       total {count_params(ckpt.params):,} (image {image:,}, text {text:,})",
        f"FLOPs        per image {_si(image_flops(cfg))}, per text {_si(text_flops(cfg))} (forward, 2 per multiply-add)",
        f"tokenizer    {ckpt.metadata.get('tokenizer') or 'none'}",
    ])


def _si(flops: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}FLOPs"
    return f"{flops:,} FLOPs"
