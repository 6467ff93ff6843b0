"""OpenAI / open_clip state dicts (`visual.conv1.weight`, `...resblocks.N.attn.in_proj_weight`, ...).

The two layouts are the same key set for ViT CLIPs, so one mapping (`_layout`) serves both, in both directions:
import (`convert_state_dict`) and export (`to_state_dict`: open_clip's hub layout, and Hugging Face's once
renamed). The Hugging Face importer renames into this layout and reuses it.

open_clip's LayerScale (`ls_init_value`: `x + g1 * attn(..)`, `x + g2 * mlp(..)`) is folded at import into the
last linear layer of its branch (the rows and bias of `out_proj` and `c_proj` times gamma). That is exact (up to
rounding) and keeps one block architecture: upcycling needs nothing new (the experts copy a `c_proj` that already
carries gamma), and such a model exports as the same function without LayerScale.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.checkpoints.params import from_blocks, to_blocks
from clipup_jax.checkpoints.source_keys import SourceKeys
from clipup_jax.config import TEXT_POOLS, ConfigError, ModelConfig, TextConfig, VisionConfig, preset

JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # TorchScript archive buffers, not weights
OPEN_CLIP_CONFIG = "open_clip_config.json"
_ENCODER_PREFIX = {"visual": "visual.transformer.resblocks", "text": "transformer.resblocks"}
# open_clip config fields (truthy) for architectures these towers do not implement.
_UNSUPPORTED_OPEN_CLIP = {
    "vision_cfg": ("timm_model_name", "attentional_pool", "qk_norm", "scaled_cosine_attn", "scale_heads",
                   "scale_attn_inner", "scale_attn", "scale_fc"),
    "text_cfg": ("hf_model_name", "embed_cls", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                 "scale_attn", "scale_fc"),
}
# open_clip's vision pool types -> the towers' (its text ones are the towers'); 'none' (tokens, not an embedding)
# is refused.
_VISION_POOLS = {"tok": "tok", "avg": "gap"}


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
                 vision: Mapping[str, Any] | None = None, text: Mapping[str, Any] | None = None) -> ModelConfig:
    """The architecture implied by tensor shapes (as OpenAI's `build_model` does), with the `vision` / `text`
    fields a config file fixes (`read_open_clip_config`).

    Head counts are not visible in shapes; without a config they follow OpenAI's rule width / 64.
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
    vision_cfg = VisionConfig(**{
        "image_size": grid * patch, "patch_size": patch, "width": vw, "depth": vd, "heads": max(vw // 64, 1),
        "mlp_dim": _shape(tensors, f"{_ENCODER_PREFIX['visual']}.0.mlp.c_fc.weight", source)[0],
        "ln_pre": "visual.ln_pre.weight" in tensors, **(vision or {})})
    text_cfg = TextConfig(**{
        "vocab_size": vocab, "context_length": context, "width": tw, "depth": td, "heads": max(tw // 64, 1),
        "mlp_dim": _shape(tensors, f"{_ENCODER_PREFIX['text']}.0.mlp.c_fc.weight", source)[0],
        "proj_bias": text_proj == "text_projection.weight", **(text or {})})
    try:
        return ModelConfig(vision=vision_cfg, text=text_cfg, embed_dim=embed, activation=activation, ln_eps=ln_eps,
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


class OpenClipArch(NamedTuple):
    """What an `open_clip_config.json` fixes that tensor shapes do not."""

    activation: str
    ln_eps: float
    vision: dict[str, Any]  # VisionConfig fields: heads, pool, ...
    text: dict[str, Any]  # TextConfig fields: heads, causal, pool, eos_id
    hf_tokenizer: str | None  # text_cfg.hf_tokenizer_name: the model's ids are not the CLIP BPE's


def read_open_clip_config(path: pathlib.Path) -> OpenClipArch:
    """The architecture an `open_clip_config.json` (hub layout, or a bare model config) describes beyond shapes;
    a field these towers cannot compute is refused by name. The tokenizer is not read from it: one is imported
    only from --tokenizer."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read open_clip config ({e})") from e
    model_cfg = raw.get("model_cfg", raw)
    if "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
        raise CheckpointError(f"{path}: expected 'model_cfg' with 'vision_cfg' and 'text_cfg'")
    if model_cfg.get("custom_text"):
        raise CheckpointError(f"{path}: custom_text towers (keys under 'text.') are not supported")
    if "multimodal_cfg" in model_cfg:
        raise CheckpointError(f"{path}: multimodal_cfg is set: CoCa models (a text decoder) are not supported")
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]

    def refuse(section: str, field: str, why: str) -> CheckpointError:
        value = model_cfg[section].get(field)
        return CheckpointError(f"{path}: {section}.{field}={value!r}: {why}")

    for section, fields in _UNSUPPORTED_OPEN_CLIP.items():
        for field in fields:
            if model_cfg[section].get(field):
                raise refuse(section, field, "these ViT towers do not implement it")
        if model_cfg[section].get("block_type") not in (None, "default"):
            raise refuse(section, "block_type", "only the default residual block is implemented")
    if isinstance(v.get("layers"), (list, tuple)):
        raise refuse("vision_cfg", "layers", "a list means a ModifiedResNet tower, which is not supported")
    if v.get("pool_type", "tok") not in _VISION_POOLS:
        raise refuse("vision_cfg", "pool_type", f"expected one of {sorted(_VISION_POOLS)}")
    if t.get("pool_type", "argmax") not in TEXT_POOLS:
        raise refuse("text_cfg", "pool_type", f"expected one of {list(TEXT_POOLS)}")
    if t.get("proj_type", "linear") != "linear":
        raise refuse("text_cfg", "proj_type", "only the linear text projection is implemented")
    activations = {_activation(path, model_cfg, section) for section in ("vision_cfg", "text_cfg")}
    eps = {_ln_eps(path, model_cfg, section) for section in ("vision_cfg", "text_cfg")}
    if len(activations) > 1 or len(eps) > 1:
        raise CheckpointError(f"{path}: vision_cfg and text_cfg differ in act_kwargs or norm_kwargs "
                              f"({sorted(activations)}, eps {sorted(eps)}); these towers share one of each")
    vision_pool = _VISION_POOLS[v.get("pool_type", "tok")]
    text_pool = t.get("pool_type", "argmax")
    return OpenClipArch(
        activation=activations.pop(), ln_eps=eps.pop(),
        vision={"heads": v.get("width", 768) // v.get("head_width", 64), "pool": vision_pool,
                # after a single token's pooling the order of LayerNorm and pooling does not matter
                "ln_post_after_pool": bool(v.get("final_ln_after_pool")) and vision_pool == "gap"},
        text={"heads": t.get("heads", 8), "causal": not t.get("no_causal_mask", False), "pool": text_pool,
              "eos_id": t.get("eos_id", 2) if text_pool == "eos" else None},
        hf_tokenizer=t.get("hf_tokenizer_name") or None,
    )


def _activation(path: pathlib.Path, model_cfg: Mapping[str, Any], section: str) -> str:
    kwargs = model_cfg[section].get("act_kwargs") or {}
    if model_cfg.get("quick_gelu"):
        if kwargs:
            raise CheckpointError(f"{path}: {section}.act_kwargs={kwargs!r} with quick_gelu: QuickGELU takes none")
        return "quick_gelu"
    if kwargs not in ({}, {"approximate": "none"}, {"approximate": "tanh"}):
        raise CheckpointError(f"{path}: {section}.act_kwargs={kwargs!r}: only GELU's approximate='tanh' is known")
    return "gelu_tanh" if kwargs.get("approximate") == "tanh" else "gelu"


def _ln_eps(path: pathlib.Path, model_cfg: Mapping[str, Any], section: str) -> float:
    kwargs = model_cfg[section].get("norm_kwargs") or {}
    if set(kwargs) - {"eps"}:
        raise CheckpointError(f"{path}: {section}.norm_kwargs={kwargs!r}: only LayerNorm's eps is known")
    return float(kwargs.get("eps", 1e-5))


class _Transform(NamedTuple):
    """How one tensor changes between the OpenAI layout and the canonical one."""

    to_canonical: Callable[[np.ndarray], np.ndarray]
    to_openai: Callable[[np.ndarray], np.ndarray]


_SAME = _Transform(lambda x: x, lambda x: x)
_LINEAR = _Transform(lambda w: w.T, lambda k: k.T)  # torch (out, in) weights, (in, out) kernels
_CONV = _Transform(lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))  # OIHW <-> HWIO
_SCALAR = _Transform(lambda x: x.reshape(()) if x.size == 1 else x, lambda x: x.reshape(()))


def _qkv_kernel(heads: int) -> _Transform:
    """`in_proj_weight` (3 * width, width), q;k;v stacked, <-> (width, 3, heads, head_dim)."""
    def to_canonical(w: np.ndarray) -> np.ndarray:
        if w.ndim != 2 or w.shape[0] != 3 * w.shape[1]:
            raise ValueError("not a packed q/k/v weight")
        return w.reshape(3, heads, -1, w.shape[1]).transpose(3, 0, 1, 2)
    return _Transform(to_canonical, lambda k: k.transpose(1, 2, 3, 0).reshape(-1, k.shape[0]))


def _out_kernel(heads: int) -> _Transform:
    """`out_proj.weight` (width, heads * head_dim) <-> (heads, head_dim, width)."""
    return _Transform(lambda w: w.T.reshape(heads, -1, w.shape[0]), lambda k: k.reshape(-1, k.shape[-1]).T)


def _norm(src: str, dst: str) -> list[tuple[str, str, _Transform]]:
    return [(f"{src}.weight", f"{dst}/scale", _SAME), (f"{src}.bias", f"{dst}/bias", _SAME)]


def _blocks(tower: str, depth: int, heads: int) -> list[tuple[str, str, _Transform]]:
    rows = []
    for i in range(depth):
        src, dst = f"{_ENCODER_PREFIX[tower]}.{i}", f"{tower}/encoder/blocks/{i}"
        rows += [(f"{src}.attn.in_proj_weight", f"{dst}/attn/qkv_kernel", _qkv_kernel(heads)),
                 (f"{src}.attn.in_proj_bias", f"{dst}/attn/qkv_bias",
                  _Transform(lambda b: b.reshape(3, heads, -1), lambda b: b.reshape(-1))),
                 (f"{src}.attn.out_proj.weight", f"{dst}/attn/out_kernel", _out_kernel(heads)),
                 (f"{src}.attn.out_proj.bias", f"{dst}/attn/out_bias", _SAME),
                 *_norm(f"{src}.ln_1", f"{dst}/ln_1"), *_norm(f"{src}.ln_2", f"{dst}/ln_2"),
                 (f"{src}.mlp.c_fc.weight", f"{dst}/mlp/fc1_kernel", _LINEAR),
                 (f"{src}.mlp.c_fc.bias", f"{dst}/mlp/fc1_bias", _SAME),
                 (f"{src}.mlp.c_proj.weight", f"{dst}/mlp/fc2_kernel", _LINEAR),
                 (f"{src}.mlp.c_proj.bias", f"{dst}/mlp/fc2_bias", _SAME)]
    return rows


def _layout(cfg: ModelConfig) -> list[tuple[str, str, _Transform]]:
    """(OpenAI key, canonical key, transform) for every tensor of a dense `cfg`: the one mapping, both ways."""
    rows = [("visual.conv1.weight", "visual/patch_kernel", _CONV),
            ("visual.class_embedding", "visual/class_embedding", _SAME),
            ("visual.positional_embedding", "visual/pos_embed", _SAME)]
    if cfg.vision.ln_pre:
        rows += _norm("visual.ln_pre", "visual/ln_pre")
    rows += _blocks("visual", cfg.vision.depth, cfg.vision.heads)
    rows += [*_norm("visual.ln_post", "visual/ln_post"), ("visual.proj", "visual/proj/kernel", _SAME),
             ("token_embedding.weight", "text/token_embed", _SAME), ("positional_embedding", "text/pos_embed", _SAME)]
    rows += _blocks("text", cfg.text.depth, cfg.text.heads)
    rows += _norm("ln_final", "text/ln_final")
    if cfg.text.proj_bias:
        rows += [("text_projection.weight", "text/proj/kernel", _LINEAR),
                 ("text_projection.bias", "text/proj/bias", _SAME)]
    else:
        rows.append(("text_projection", "text/proj/kernel", _SAME))
    rows.append(("logit_scale", "logit_scale", _SCALAR))
    if cfg.logit_bias:
        rows.append(("logit_bias", "logit_bias", _SCALAR))
    return rows


def _fold_layer_scale(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """LayerScale gammas (`...resblocks.N.ls_1.gamma` / `ls_2.gamma`) multiplied into the output rows and bias
    of their branch's last linear layer (see the module docstring)."""
    out = dict(tensors)
    for key in [k for k in tensors if re.search(r"\.ls_[12]\.gamma$", k)]:
        block, branch, _ = key.rsplit(".", 2)
        linear = f"{block}.{'attn.out_proj' if branch == 'ls_1' else 'mlp.c_proj'}"
        gamma, weight, bias = out[key], out.get(f"{linear}.weight"), out.get(f"{linear}.bias")
        if weight is None or bias is None or not weight.shape[:1] == bias.shape == gamma.shape:
            continue  # left unconsumed: reported with the other keys
        out[f"{linear}.weight"], out[f"{linear}.bias"] = weight * gamma[:, None], bias * gamma
        del out[key]
    return out


def convert_state_dict(tensors: dict[str, np.ndarray], cfg: ModelConfig, source: str) -> dict[str, np.ndarray]:
    """OpenAI-layout tensors -> flat params in the model's stacked layout; every source key must be consumed."""
    tensors = _fold_layer_scale({k: v for k, v in tensors.items() if k not in JIT_EXTRAS})
    keys = _Keys(tensors, source)
    out: dict[str, np.ndarray] = {}
    for src, dst, transform in _layout(cfg):
        x = keys.take(src)
        try:
            out[dst] = transform.to_canonical(x)
        except ValueError:
            out[dst] = x  # a shape the transform does not fit: the parameter check reports it
    keys.finish()
    return from_blocks(out, cfg, source)


def to_state_dict(cfg: ModelConfig, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Params of a dense model -> the OpenAI / open_clip state dict (float32, C order)."""
    params = to_blocks(params, cfg)
    return {src: np.array(transform.to_openai(np.asarray(params[dst])), np.float32, order="C")
            for src, dst, transform in _layout(cfg)}
