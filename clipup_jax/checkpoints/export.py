"""Dense clipup checkpoints back to Hugging Face `transformers` CLIPModel or open_clip hub directories.

Both go through the importers' own OpenAI-layout mapping, inverted (`openai.to_state_dict`): open_clip's hub
layout is that state dict as `open_clip_model.safetensors` beside an `open_clip_config.json`; Hugging Face's is
the same tensors renamed (`hf.from_openai_layout`: q/k/v split out of the fused projection) beside a `config.json`.
Either loads with the same features. The checkpoint's tokenizer files (a CLIP BPE: `vocab.json` + `merges.txt`, or
a merges file) are copied beside the weights when it has them: `CLIPTokenizer` reads the former; open_clip's
loader reads neither (without `hf_tokenizer_name` it uses its bundled CLIP BPE, the one OpenAI's models use).
A model the target cannot express (MoE towers, big_vision's cls-less pooling or biases, ...) is refused naming the
field; LayerScale was folded into the weights at import, so such a model exports without it, computing the same.
The output directory is written whole or not at all (`atomic_directory`; on gs:// its config file, which a
loader reads first, is written last).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
from safetensors.numpy import save

from clipup_jax.checkpoints import hf, openai
from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.checkpoints.format import Checkpoint, atomic_directory, check_output
from clipup_jax.config import ModelConfig
from clipup_jax.data.image_ops import CLIP_MEAN, CLIP_STD
from clipup_jax.data.tokenizer import source_files
from clipup_jax.storage import Path, PathLike, as_path

FORMATS = ("hf", "open_clip")
_NAMES = {"hf": "Hugging Face's CLIPModel", "open_clip": "open_clip's CLIP"}
_HF_ACTIVATION = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# (tower, field, the only value the format can express). HF's CLIP: ViT with class token, pre-LN, no patch or
# projection biases, argmax pooling; open_clip's adds avg pooling (before or after ln_post), no ln_pre, any text
# pooling, a bidirectional text tower and a text projection bias.
_FIXED = {
    "hf": [("vision", "pool", "tok"), ("vision", "class_token", True), ("vision", "pos_embed_covers_cls", True),
           ("vision", "ln_pre", True), ("vision", "patch_bias", False), ("vision", "proj_bias", False),
           ("text", "causal", True), ("text", "pool", "argmax"), ("text", "proj_bias", False),
           ("model", "logit_bias", False)],
    "open_clip": [("vision", "class_token", True), ("vision", "pos_embed_covers_cls", True),
                  ("vision", "patch_bias", False), ("vision", "proj_bias", False)],
}


def check_exportable(cfg: ModelConfig, source: str, to: str) -> None:
    """Refuses, naming the field, a model that format `to` cannot express."""
    for tower in ("vision", "text"):
        plan = getattr(cfg, tower).moe
        if plan is not None:
            raise CheckpointError(f"{source}: {tower}.moe={plan.num_experts} experts top-{plan.top_k}: sparse (MoE) "
                                  "towers have no Hugging Face or open_clip format; export a dense checkpoint")
    if cfg.shared_backbone:
        raise CheckpointError(f"{source}: shared_backbone=True: {_NAMES[to]} has separate towers")
    for tower, name, only in _FIXED[to]:
        value = getattr(cfg if tower == "model" else getattr(cfg, tower), name)
        if value != only:
            field = name if tower == "model" else f"{tower}.{name}"
            raise CheckpointError(f"{source}: {field}={value!r}: {_NAMES[to]} has no such variant (only {only!r})")
    if to == "open_clip":
        for tower in (cfg.vision, cfg.text):
            _mlp_ratio(tower.width, tower.mlp_dim, f"{source}: {'vision' if tower is cfg.vision else 'text'}")


def _mlp_ratio(width: int, mlp_dim: int, where: str) -> float:
    """open_clip sizes the MLP as int(width * mlp_ratio); the ratio that gives `mlp_dim` back."""
    ratio = mlp_dim / width
    if int(width * ratio) != mlp_dim:
        raise CheckpointError(f"{where}.mlp_dim={mlp_dim}: open_clip's int(width * mlp_ratio) cannot give it for "
                              f"width {width}")
    return ratio


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


def open_clip_config(cfg: ModelConfig) -> dict[str, Any]:
    """`open_clip_config.json` as open_clip's `push_to_hf_hub` writes it: `model_cfg` (a `CLIP(**model_cfg)`), and
    `preprocess_cfg`: this project's CLIP preprocessing (OpenAI mean/std, bicubic, short side then centre crop)."""
    v, t = cfg.vision, cfg.text
    towers = {}
    for name, tower, fields in (
            ("vision_cfg", v, {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width,
                               "layers": v.depth, "head_width": v.width // v.heads}),
            ("text_cfg", t, {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                             "heads": t.heads, "layers": t.depth})):
        fields["mlp_ratio"] = _mlp_ratio(tower.width, tower.mlp_dim, name)
        if cfg.activation == "gelu_tanh":
            fields["act_kwargs"] = {"approximate": "tanh"}
        if cfg.ln_eps != 1e-5:
            fields["norm_kwargs"] = {"eps": cfg.ln_eps}
        towers[name] = fields
    if not v.ln_pre:
        towers["vision_cfg"]["no_ln_pre"] = True
    if v.pool == "gap":
        towers["vision_cfg"]["pool_type"] = "avg"
        towers["vision_cfg"]["final_ln_after_pool"] = v.ln_post_after_pool
    if not t.causal:
        towers["text_cfg"]["no_causal_mask"] = True
    if t.pool != "argmax":
        towers["text_cfg"]["pool_type"] = t.pool
    if t.eos_id is not None:
        towers["text_cfg"]["eos_id"] = t.eos_id
    if t.proj_bias:
        towers["text_cfg"]["proj_bias"] = True
    model_cfg: dict[str, Any] = {"embed_dim": cfg.embed_dim, **towers}
    if cfg.activation == "quick_gelu":
        model_cfg["quick_gelu"] = True
    if cfg.logit_bias:
        model_cfg["init_logit_bias"] = -10.0  # makes the parameter; its value comes from the weights
    return {"model_cfg": model_cfg,
            "preprocess_cfg": {"mean": CLIP_MEAN.tolist(), "std": CLIP_STD.tolist(), "interpolation": "bicubic",
                               "resize_mode": "shortest"}}


def export(ckpt: Checkpoint, out: PathLike, to: str, force: bool = False) -> list[str]:
    """Writes `ckpt` at `out` (local or gs://) in format `to` (one of `FORMATS`); returns the names of the files
    written."""
    if to not in FORMATS:
        raise CheckpointError(f"unknown export format {to!r}; expected one of {', '.join(FORMATS)}")
    out = as_path(out)
    check_exportable(ckpt.config, str(ckpt.path), to)
    check_output(out, force)  # before the tensors are converted
    tensors = openai.to_state_dict(ckpt.config, ckpt.params)
    writers: dict[str, Callable[[Path], None]]
    if to == "hf":
        config = "config.json"
        writers = {config: _json(hf_config(ckpt.config)),
                   "model.safetensors": _safetensors(hf.from_openai_layout(tensors))}
    else:
        config = openai.OPEN_CLIP_CONFIG
        writers = {config: _json(open_clip_config(ckpt.config)),
                   "open_clip_model.safetensors": _safetensors(tensors)}
    tokenizer = ckpt.tokenizer_path
    for f in source_files(tokenizer) if tokenizer is not None else []:
        writers[f.name] = lambda path, f=as_path(f): path.write_bytes(f.read_bytes())  # across stores

    def write(directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name, writer in writers.items():
            writer(directory / name)

    atomic_directory(out, force, write, last=(config,))
    return list(writers)


def _json(data: dict) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(data, indent=2) + "\n")


def _safetensors(tensors: dict[str, np.ndarray]) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(save(tensors, metadata={"format": "pt"}))  # as torch's writer tags it
