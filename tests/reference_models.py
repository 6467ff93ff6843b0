"""Random-weight Hugging Face CLIPs (PyTorch, CPU): the independent reference for imported towers."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import torch
from transformers import CLIPConfig, CLIPModel


def hf_clip(vision: dict[str, Any], text: dict[str, Any], projection_dim: int, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    vocab = text["vocab_size"]
    text = {"eos_token_id": vocab - 1, "bos_token_id": vocab - 2, "pad_token_id": 0, **text}
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=projection_dim)).eval()
    with torch.no_grad():  # LayerNorms init to (1, 0); randomise them so a swapped scale/bias cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name == "logit_scale":
                p.fill_(3.3)
    return model


def inputs(model: CLIPModel, n: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random NHWC pixels and token rows whose EOT (the largest id) sits at varied positions."""
    v, t = model.config.vision_config, model.config.text_config
    rng = np.random.RandomState(seed)
    pixels = rng.randn(n, v.image_size, v.image_size, 3).astype(np.float32)
    tokens = rng.randint(1, t.vocab_size - 2, (n, t.max_position_embeddings)).astype(np.int32)
    for i in range(n):
        eot = [1, t.max_position_embeddings - 1, t.max_position_embeddings // 2][i % 3]
        tokens[i, eot] = t.vocab_size - 1
        tokens[i, eot + 1:] = 0
    return pixels, tokens


def features(model: CLIPModel, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
        text = model.get_text_features(input_ids=torch.from_numpy(tokens.astype(np.int64)))
    image, text = getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)
    return image.numpy(), text.numpy()


def openai_state_dict(model: CLIPModel) -> dict[str, torch.Tensor]:
    """The OpenAI/open_clip layout of an HF CLIP, written independently of the importer under test."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    out = {
        "visual.conv1.weight": sd.pop("vision_model.embeddings.patch_embedding.weight"),
        "visual.class_embedding": sd.pop("vision_model.embeddings.class_embedding"),
        "visual.positional_embedding": sd.pop("vision_model.embeddings.position_embedding.weight"),
        "visual.ln_pre.weight": sd.pop("vision_model.pre_layrnorm.weight"),
        "visual.ln_pre.bias": sd.pop("vision_model.pre_layrnorm.bias"),
        "visual.ln_post.weight": sd.pop("vision_model.post_layernorm.weight"),
        "visual.ln_post.bias": sd.pop("vision_model.post_layernorm.bias"),
        "visual.proj": sd.pop("visual_projection.weight").T.contiguous(),
        "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": sd.pop("text_model.final_layer_norm.bias"),
        "text_projection": sd.pop("text_projection.weight").T.contiguous(),
        "logit_scale": sd.pop("logit_scale"),
    }
    for hf_tower, oa_prefix in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        depth = getattr(model.config, "vision_config" if hf_tower == "vision_model" else "text_config").num_hidden_layers
        for i in range(depth):
            src, dst = f"{hf_tower}.encoder.layers.{i}", f"{oa_prefix}.resblocks.{i}"
            for kind in ("weight", "bias"):
                out[f"{dst}.attn.in_proj_{kind}"] = torch.cat(
                    [sd.pop(f"{src}.self_attn.{p}_proj.{kind}") for p in "qkv"], dim=0)
                for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                    out[f"{dst}.{b}.{kind}"] = sd.pop(f"{src}.{a}.{kind}")
    assert not sd, f"unmapped reference keys: {sorted(sd)}"
    return out


def save_hf(model: CLIPModel, directory: pathlib.Path) -> pathlib.Path:
    model.save_pretrained(directory)
    return directory
