"""Hugging Face `transformers` CLIPModel directories (`config.json` + `model.safetensors`).

The architecture comes from config.json; weights are renamed into the OpenAI
layout (q/k/v stacked into `in_proj_weight`) and converted by the OpenAI mapping.
Export renames back (`from_openai_layout`), with the same tables.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import numpy as np

from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.checkpoints.tensor_files import read_tensors
from clipup_jax.config import ConfigError, ModelConfig, TextConfig, VisionConfig

_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "flax_model.msgpack")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# int64 buffers that older transformers versions saved; not weights.
_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
_LAYER = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")
_OPENAI_LAYER = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_LAYER_RENAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}
_RENAMES = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}


def read_hf_config(directory: pathlib.Path) -> ModelConfig:
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: not a Hugging Face model directory (no config.json)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if raw.get("model_type") not in (None, "clip") or "vision_config" not in raw or "text_config" not in raw:
        raise CheckpointError(f"{path}: model_type={raw.get('model_type')!r} is not a CLIPModel config")
    v, t = raw["vision_config"], raw["text_config"]
    acts = {_activation(path, "vision_config", v), _activation(path, "text_config", t)}
    eps = {float(v.get("layer_norm_eps", 1e-5)), float(t.get("layer_norm_eps", 1e-5))}
    if len(acts) > 1 or len(eps) > 1:
        raise CheckpointError(f"{path}: towers use different activations {acts} or LayerNorm eps {eps}; unsupported")
    vocab = t.get("vocab_size", 49408)
    eos = t.get("eos_token_id", 2)
    if eos not in (2, vocab - 1):
        # transformers pools at the first eos id unless eos_token_id == 2; that is argmax pooling only
        # when eos is the largest id, as in the CLIP BPE.
        raise CheckpointError(f"{path}: text_config.eos_token_id={eos} pools at a token other than the largest id "
                              f"({vocab - 1}), which this project's towers pool at (CLIP's EOT); if the tokenizer's "
                              f"end-of-text token is {vocab - 1}, set eos_token_id to {vocab - 1} in config.json")
    try:
        return ModelConfig(
            vision=VisionConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
                                width=v.get("hidden_size", 768), depth=v.get("num_hidden_layers", 12),
                                heads=v.get("num_attention_heads", 12), mlp_dim=v.get("intermediate_size", 3072)),
            text=TextConfig(vocab_size=vocab, context_length=t.get("max_position_embeddings", 77),
                            width=t.get("hidden_size", 512), depth=t.get("num_hidden_layers", 12),
                            heads=t.get("num_attention_heads", 8), mlp_dim=t.get("intermediate_size", 2048)),
            embed_dim=raw.get("projection_dim", 512), activation=acts.pop(), ln_eps=eps.pop(),
        ).validate()
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _activation(path: pathlib.Path, section: str, cfg: dict[str, Any]) -> str:
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in _HF_ACTIVATIONS:
        raise CheckpointError(f"{path}: {section}.hidden_act={act!r} is not one of {sorted(_HF_ACTIVATIONS)}")
    return _HF_ACTIVATIONS[act]


def read_hf_weights(directory: pathlib.Path) -> dict[str, np.ndarray]:
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            tensors: dict[str, np.ndarray] = {}
            for shard in shards:
                tensors.update(read_tensors(directory / shard))
            return tensors
        tensors = read_tensors(path)
        return _torch_names(tensors) if name.endswith(".msgpack") else tensors
    raise CheckpointError(f"{directory}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def _torch_names(flax_tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 4.x `FlaxCLIPModel` weights under the PyTorch names and layouts (Dense kernels are
    [in, out], the patch conv HWIO; LayerNorm `scale` and Embed `embedding` are torch's `weight`)."""
    out = {}
    for key, value in flax_tensors.items():
        *path, leaf = key.split("/")
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        if leaf in ("kernel", "scale", "embedding"):
            leaf = "weight"
        out[".".join([*path, leaf])] = value
    return out


def to_openai_layout(tensors: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Renames HF keys to OpenAI keys; unknown keys pass through so the OpenAI mapping reports them."""
    tensors = {k.removeprefix("clip."): v for k, v in tensors.items() if k not in _BUFFERS}
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if key in _RENAMES:
            out[_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.T
        elif m := _LAYER.match(key):
            tower, index, rest = m.groups()
            prefix = ("visual.transformer" if tower == "vision_model" else "transformer") + f".resblocks.{index}"
            if q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault((prefix, q.group(2), key), {})[q.group(1)] = value
                continue
            for old, new in _LAYER_RENAMES.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            out[f"{prefix}.{rest}"] = value
        else:
            out[key] = value
    grouped: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for (prefix, kind, _), parts in qkv.items():
        grouped.setdefault((prefix, kind), {}).update(parts)
    for (prefix, kind), parts in grouped.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: {prefix} has only {sorted(parts)} of q/k/v_proj.{kind}")
        out[f"{prefix}.attn.in_proj_{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return out


def from_openai_layout(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `to_openai_layout` (export): OpenAI keys -> HF names, q/k/v split out of `in_proj_*`."""
    names = {v: k for k, v in _RENAMES.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if key in names:
            out[names[key]] = value
        elif key in transposed:
            out[transposed[key]] = np.ascontiguousarray(value.T)
        elif m := _OPENAI_LAYER.match(key):
            visual, index, rest = m.groups()
            prefix = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{index}"
            if q := re.fullmatch(r"attn\.in_proj_(weight|bias)", rest):
                for name, part in zip("qkv", np.split(value, 3)):
                    out[f"{prefix}.self_attn.{name}_proj.{q.group(1)}"] = np.ascontiguousarray(part)
                continue
            for hf_name, openai_name in _LAYER_RENAMES.items():
                if rest.startswith(openai_name + "."):
                    rest = hf_name + rest[len(openai_name):]
                    break
            out[f"{prefix}.{rest}"] = value
        else:
            raise ValueError(f"{key!r} has no Hugging Face CLIP name")
    return out
