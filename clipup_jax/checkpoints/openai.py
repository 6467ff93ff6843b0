"""OpenAI / open_clip state dicts (`visual.conv1.weight`, `...resblocks.N.attn.in_proj_weight`, ...).

The two layouts are the same key set for ViT CLIPs, so one mapping serves both;
the Hugging Face importer renames into this layout and reuses it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Any

import numpy as np

from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.checkpoints.source_keys import SourceKeys
from clipup_jax.config import ConfigError, ModelConfig, TextConfig, VisionConfig, preset

JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # TorchScript archive buffers, not weights
OPEN_CLIP_CONFIG = "open_clip_config.json"
_ENCODER_PREFIX = {"visual": "visual.transformer.resblocks", "text": "transformer.resblocks"}
# open_clip config fields that change the architecture in ways these towers do not implement.
_UNSUPPORTED_OPEN_CLIP = {
    "vision_cfg": {"timm_model_name", "hf_model_name", "ls_init_value", "attentional_pool", "patch_dropout_rate",
                   "final_ln_after_pool", "output_tokens", "attn_pooler_queries"},
    "text_cfg": {"hf_model_name", "ls_init_value", "embed_cls", "final_ln_after_pool", "output_tokens"},
}


class _Keys(SourceKeys):
    """Missing keys read as an empty array so the mapping runs on and every problem is listed at once."""

    def __init__(self, tensors: dict[str, np.ndarray], source: str):
        super().__init__(tensors, source, "an OpenAI/open_clip ViT CLIP state dict")

    def take(self, key: str) -> np.ndarray:
        x = super().take(key)
        return np.zeros((0,), np.float32) if x is None else x


def _shape(tensors: dict[str, np.ndarray], key: str, source: str) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(f"{source}: not an OpenAI/open_clip ViT CLIP state dict: missing {key!r}")
    return tuple(tensors[key].shape)


def _depth(tensors: dict[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.attn\.in_proj_weight$")
    indices = {int(m.group(1)) for k in tensors if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def infer_config(tensors: dict[str, np.ndarray], source: str, activation: str, ln_eps: float,
                 vision_heads: int | None = None, text_heads: int | None = None) -> ModelConfig:
    """The architecture implied by tensor shapes (as OpenAI's `build_model` does).

    Head counts are not visible in shapes; without a config they follow OpenAI's
    rule width / 64.
    """
    vw, _, patch, _ = _shape(tensors, "visual.conv1.weight", source)
    pos_rows = _shape(tensors, "visual.positional_embedding", source)[0]
    grid = math.isqrt(pos_rows - 1)
    if grid * grid != pos_rows - 1:
        raise CheckpointError(
            f"{source}: visual.positional_embedding has {pos_rows} rows, not grid**2 + 1 (class token included)"
        )
    context, tw = _shape(tensors, "positional_embedding", source)
    vocab = _shape(tensors, "token_embedding.weight", source)[0]
    text_proj = "text_projection" if "text_projection" in tensors else "text_projection.weight"
    proj_shape = _shape(tensors, text_proj, source)
    embed = proj_shape[1] if text_proj == "text_projection" else proj_shape[0]
    vd, td = _depth(tensors, _ENCODER_PREFIX["visual"]), _depth(tensors, _ENCODER_PREFIX["text"])
    if vd == 0 or td == 0:
        raise CheckpointError(f"{source}: no transformer blocks found (is this a ModifiedResNet or non-CLIP file?)")
    vision = VisionConfig(
        image_size=grid * patch, patch_size=patch, width=vw, depth=vd, heads=vision_heads or max(vw // 64, 1),
        mlp_dim=_shape(tensors, f"{_ENCODER_PREFIX['visual']}.0.mlp.c_fc.weight", source)[0],
        ln_pre="visual.ln_pre.weight" in tensors,
    )
    text = TextConfig(
        vocab_size=vocab, context_length=context, width=tw, depth=td, heads=text_heads or max(tw // 64, 1),
        mlp_dim=_shape(tensors, f"{_ENCODER_PREFIX['text']}.0.mlp.c_fc.weight", source)[0],
        proj_bias=text_proj == "text_projection.weight",
    )
    try:
        return ModelConfig(vision=vision, text=text, embed_dim=embed, activation=activation, ln_eps=ln_eps,
                           logit_bias="logit_bias" in tensors).validate()
    except ConfigError as e:
        raise CheckpointError(f"{source}: inferred architecture is invalid: {e}") from e


def check_against_preset(cfg: ModelConfig, name: str, source: str) -> ModelConfig:
    """Takes head counts from a named preset after checking every shape-visible size agrees."""
    ref = preset(name)
    diffs = []
    for tower in ("vision", "text"):
        got, want = getattr(cfg, tower), getattr(ref, tower)
        for field in ("image_size", "patch_size", "vocab_size", "context_length", "width", "depth", "mlp_dim"):
            if hasattr(got, field) and getattr(got, field) != getattr(want, field):
                diffs.append(f"{tower}.{field}: file {getattr(got, field)} vs preset {getattr(want, field)}")
    if cfg.embed_dim != ref.embed_dim:
        diffs.append(f"embed_dim: file {cfg.embed_dim} vs preset {ref.embed_dim}")
    if diffs:
        raise CheckpointError(f"{source}: does not match --model {name}: " + "; ".join(diffs))
    return cfg.replace(vision=dataclasses.replace(cfg.vision, heads=ref.vision.heads),
                       text=dataclasses.replace(cfg.text, heads=ref.text.heads))


def read_open_clip_config(path: pathlib.Path) -> dict[str, Any]:
    """activation and head counts from an `open_clip_config.json` beside the weights."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read open_clip config ({e})") from e
    model_cfg = raw.get("model_cfg", raw)
    if "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
        raise CheckpointError(f"{path}: expected 'model_cfg' with 'vision_cfg' and 'text_cfg'")
    for section, fields in _UNSUPPORTED_OPEN_CLIP.items():
        used = sorted(f for f in fields if model_cfg[section].get(f))
        if used:
            raise CheckpointError(f"{path}: {section} uses {used}, which these ViT towers do not implement")
    if model_cfg.get("custom_text"):
        raise CheckpointError(f"{path}: custom_text towers (keys under 'text.') are not supported")
    vision_cfg, text_cfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if isinstance(vision_cfg.get("layers"), (list, tuple)):
        raise CheckpointError(f"{path}: vision_cfg.layers is a list: ModifiedResNet towers are not supported")
    for section, key, ok in (("vision_cfg", "pool_type", "tok"), ("text_cfg", "pool_type", "argmax")):
        if model_cfg[section].get(key, ok) != ok:
            raise CheckpointError(f"{path}: {section}.{key}={model_cfg[section][key]!r} is not supported (only {ok!r})")
    if text_cfg.get("no_causal_mask"):
        raise CheckpointError(f"{path}: text_cfg.no_causal_mask is not supported")
    vw = vision_cfg.get("width", 768)
    return {
        "activation": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        "vision_heads": vw // vision_cfg.get("head_width", 64),
        "text_heads": text_cfg.get("heads", 8),
    }


def _encoder(keys: _Keys, prefix: str, out_prefix: str, depth: int, heads: int, out: dict[str, np.ndarray]) -> None:
    for i in range(depth):
        src, dst = f"{prefix}.{i}", f"{out_prefix}/encoder/blocks/{i}"
        w = keys.take(f"{src}.attn.in_proj_weight")
        b = keys.take(f"{src}.attn.in_proj_bias")
        width = w.shape[1] if w.ndim == 2 else 0
        head_dim = width // heads if heads else 0
        if w.ndim == 2 and w.shape == (3 * width, width) and b.shape == (3 * width,):
            out[f"{dst}/attn/qkv_kernel"] = w.reshape(3, heads, head_dim, width).transpose(3, 0, 1, 2)
            out[f"{dst}/attn/qkv_bias"] = b.reshape(3, heads, head_dim)
        else:
            out[f"{dst}/attn/qkv_kernel"], out[f"{dst}/attn/qkv_bias"] = w, b  # shape check reports it
        wo = keys.take(f"{src}.attn.out_proj.weight")
        out[f"{dst}/attn/out_kernel"] = wo.T.reshape(heads, head_dim, -1) if wo.ndim == 2 and head_dim else wo
        out[f"{dst}/attn/out_bias"] = keys.take(f"{src}.attn.out_proj.bias")
        for ln in ("ln_1", "ln_2"):
            _layernorm(keys, f"{src}.{ln}", f"{dst}/{ln}", out)
        out[f"{dst}/mlp/fc1_kernel"] = _t(keys.take(f"{src}.mlp.c_fc.weight"))
        out[f"{dst}/mlp/fc1_bias"] = keys.take(f"{src}.mlp.c_fc.bias")
        out[f"{dst}/mlp/fc2_kernel"] = _t(keys.take(f"{src}.mlp.c_proj.weight"))
        out[f"{dst}/mlp/fc2_bias"] = keys.take(f"{src}.mlp.c_proj.bias")


def _t(x: np.ndarray) -> np.ndarray:
    return x.T if x.ndim == 2 else x


def _scalar(x: np.ndarray) -> np.ndarray:
    return x.reshape(()) if x.size == 1 else x


def _layernorm(keys: _Keys, src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    out[f"{dst}/scale"] = keys.take(f"{src}.weight")
    out[f"{dst}/bias"] = keys.take(f"{src}.bias")


def convert_state_dict(tensors: dict[str, np.ndarray], cfg: ModelConfig, source: str) -> dict[str, np.ndarray]:
    """OpenAI-layout tensors -> canonical flat params; every source key must be consumed."""
    tensors = {k: v for k, v in tensors.items() if k not in JIT_EXTRAS}
    keys = _Keys(tensors, source)
    out: dict[str, np.ndarray] = {}
    conv = keys.take("visual.conv1.weight")
    out["visual/patch_kernel"] = conv.transpose(2, 3, 1, 0) if conv.ndim == 4 else conv
    out["visual/class_embedding"] = keys.take("visual.class_embedding")
    out["visual/pos_embed"] = keys.take("visual.positional_embedding")
    if cfg.vision.ln_pre:
        _layernorm(keys, "visual.ln_pre", "visual/ln_pre", out)
    _encoder(keys, _ENCODER_PREFIX["visual"], "visual", cfg.vision.depth, cfg.vision.heads, out)
    _layernorm(keys, "visual.ln_post", "visual/ln_post", out)
    out["visual/proj/kernel"] = keys.take("visual.proj")
    out["text/token_embed"] = keys.take("token_embedding.weight")
    out["text/pos_embed"] = keys.take("positional_embedding")
    _encoder(keys, _ENCODER_PREFIX["text"], "text", cfg.text.depth, cfg.text.heads, out)
    _layernorm(keys, "ln_final", "text/ln_final", out)
    if cfg.text.proj_bias:
        out["text/proj/kernel"] = _t(keys.take("text_projection.weight"))
        out["text/proj/bias"] = keys.take("text_projection.bias")
    else:
        out["text/proj/kernel"] = keys.take("text_projection")
    out["logit_scale"] = _scalar(keys.take("logit_scale"))
    if cfg.logit_bias:
        out["logit_bias"] = _scalar(keys.take("logit_bias"))
    keys.finish()
    return out
