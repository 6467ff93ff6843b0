"""Dense clipup checkpoints back to Hugging Face `transformers` CLIPModel directories.

The inverse of the HF importer: canonical params -> OpenAI tensor layout -> HF names (q/k/v split out of the
fused projection, linear weights as (out, in)), written as `config.json` + `model.safetensors` (+ `vocab.json` /
`merges.txt` when the checkpoint's tokenizer is in that form), so `CLIPModel.from_pretrained` computes the same
features. A model the HF CLIP architecture cannot express (MoE towers, big_vision's pooling or biases, a logit
bias) is refused naming the field. The output directory is written whole or not at all (`atomic_directory`).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
from safetensors.numpy import save_file

from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.checkpoints.format import Checkpoint, atomic_directory, check_output
from clipup_jax.checkpoints.hf import TOKENIZER_FILES
from clipup_jax.config import ModelConfig, TextConfig, VisionConfig

_HF_ACTIVATION = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# What HF's CLIP architecture fixes: ViT with class token, pre-LN, no patch/projection biases, argmax pooling.
_FIXED = [("vision", f.name, f.default) for f in VisionConfig.__dataclass_fields__.values()
          if f.name in ("pool", "class_token", "pos_embed_covers_cls", "ln_pre", "patch_bias", "proj_bias", "moe")]
_FIXED += [("text", f.name, f.default) for f in TextConfig.__dataclass_fields__.values()
           if f.name in ("causal", "pool", "proj_bias", "moe")]


def check_exportable(cfg: ModelConfig, source: str) -> None:
    for tower, name, default in _FIXED:
        value = getattr(getattr(cfg, tower), name)
        if value != default:
            what = ("sparse (MoE) towers have no Hugging Face or open_clip format" if name == "moe"
                    else f"Hugging Face's CLIP has no such variant (only {default!r})")
            raise CheckpointError(f"{source}: {tower}.{name}={value!r}: {what}")
    if cfg.logit_bias or cfg.shared_backbone:
        raise CheckpointError(f"{source}: {'logit_bias' if cfg.logit_bias else 'shared_backbone'} is set: "
                              "Hugging Face's CLIPModel has no such variant")


def hf_config(cfg: ModelConfig) -> dict:
    v, t = cfg.vision, cfg.text
    act = _HF_ACTIVATION[cfg.activation]
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": 2.6592,
        "vision_config": {"hidden_size": v.width, "intermediate_size": v.mlp_dim, "num_hidden_layers": v.depth,
                          "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
                          "num_channels": 3, "hidden_act": act, "layer_norm_eps": cfg.ln_eps,
                          "projection_dim": cfg.embed_dim},
        # eos_token_id 2 is transformers' legacy switch for pooling at argmax(input_ids): exactly these towers'
        # pooling, whatever the tokenizer's own end-of-text id.
        "text_config": {"vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": t.mlp_dim,
                        "num_hidden_layers": t.depth, "num_attention_heads": t.heads,
                        "max_position_embeddings": t.context_length, "hidden_act": act, "layer_norm_eps": cfg.ln_eps,
                        "projection_dim": cfg.embed_dim, "eos_token_id": 2, "bos_token_id": 0, "pad_token_id": 1},
    }


def hf_tensors(cfg: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {
        "vision_model.embeddings.patch_embedding.weight": params["visual/patch_kernel"].transpose(3, 2, 0, 1),
        "vision_model.embeddings.class_embedding": params["visual/class_embedding"],
        "vision_model.embeddings.position_embedding.weight": params["visual/pos_embed"],
        "vision_model.pre_layrnorm.weight": params["visual/ln_pre/scale"],
        "vision_model.pre_layrnorm.bias": params["visual/ln_pre/bias"],
        "vision_model.post_layernorm.weight": params["visual/ln_post/scale"],
        "vision_model.post_layernorm.bias": params["visual/ln_post/bias"],
        "visual_projection.weight": params["visual/proj/kernel"].T,
        "text_model.embeddings.token_embedding.weight": params["text/token_embed"],
        "text_model.embeddings.position_embedding.weight": params["text/pos_embed"],
        "text_model.final_layer_norm.weight": params["text/ln_final/scale"],
        "text_model.final_layer_norm.bias": params["text/ln_final/bias"],
        "text_projection.weight": params["text/proj/kernel"].T,
        "logit_scale": np.asarray(params["logit_scale"]).reshape(()),
    }
    for tower, prefix, depth in (("visual", "vision_model", cfg.vision.depth), ("text", "text_model", cfg.text.depth)):
        for i in range(depth):
            src, dst = f"{tower}/encoder/blocks/{i}", f"{prefix}.encoder.layers.{i}"
            qkv = params[f"{src}/attn/qkv_kernel"]  # (D, 3, heads, head_dim)
            bias = params[f"{src}/attn/qkv_bias"]  # (3, heads, head_dim)
            width = qkv.shape[0]
            for j, name in enumerate("qkv"):
                out[f"{dst}.self_attn.{name}_proj.weight"] = qkv[:, j].reshape(width, -1).T
                out[f"{dst}.self_attn.{name}_proj.bias"] = bias[j].reshape(-1)
            out[f"{dst}.self_attn.out_proj.weight"] = params[f"{src}/attn/out_kernel"].reshape(-1, width).T
            out[f"{dst}.self_attn.out_proj.bias"] = params[f"{src}/attn/out_bias"]
            for ln, hf in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
                out[f"{dst}.{hf}.weight"] = params[f"{src}/{ln}/scale"]
                out[f"{dst}.{hf}.bias"] = params[f"{src}/{ln}/bias"]
            out[f"{dst}.mlp.fc1.weight"] = params[f"{src}/mlp/fc1_kernel"].T
            out[f"{dst}.mlp.fc1.bias"] = params[f"{src}/mlp/fc1_bias"]
            out[f"{dst}.mlp.fc2.weight"] = params[f"{src}/mlp/fc2_kernel"].T
            out[f"{dst}.mlp.fc2.bias"] = params[f"{src}/mlp/fc2_bias"]
    return {k: np.array(v, np.float32, order="C") for k, v in out.items()}  # (ascontiguousarray makes 0-d 1-d)


def export_hf(ckpt: Checkpoint, out: str | pathlib.Path, force: bool = False) -> list[str]:
    """Writes `ckpt` as a Hugging Face CLIPModel directory at `out`; returns the files written."""
    out = pathlib.Path(out)
    check_exportable(ckpt.config, str(ckpt.path))
    check_output(out, force)  # before the tensors are converted
    tensors = hf_tensors(ckpt.config, ckpt.params)
    tokenizer = ckpt.tokenizer_path
    tokenizer_files = [tokenizer / name for name in TOKENIZER_FILES] if tokenizer is not None and tokenizer.is_dir() \
        else []
    tokenizer_files = [f for f in tokenizer_files if f.is_file()]

    def write(directory: pathlib.Path) -> None:
        (directory / "config.json").write_text(json.dumps(hf_config(ckpt.config), indent=2) + "\n")
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        for f in tokenizer_files:
            shutil.copyfile(f, directory / f.name)

    atomic_directory(out, force, write)
    return ["config.json", "model.safetensors", *(f.name for f in tokenizer_files)]
