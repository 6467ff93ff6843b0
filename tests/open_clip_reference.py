"""open_clip's own model code (open_clip_torch 3.3.0 on the CPU torch): the reference for open_clip towers.

open_clip is installed without its dependencies (the Makefile: `pip install --no-deps open_clip_torch==3.3.0`):
the torchvision it depends on does not load against this project's CPU torch, and its model code needs none of
it. `load()` imports it with stand-ins for the few torchvision names its transform and utils modules import at
module level (model code never calls them), with transformers hidden (open_clip then leaves out its HF text
towers, and transformers would probe the stand-in as a real torchvision), and restores sys.modules afterwards.
"""

from __future__ import annotations

import copy
import enum
import functools
import json
import pathlib
import re
import sys
import types
from typing import Any

import numpy as np
import torch

VERSION = "3.3.0"
_TORCHVISION_NAMES = {
    "torchvision": (),
    "torchvision.transforms": ("Normalize", "Compose", "RandomResizedCrop", "ToTensor", "Resize", "CenterCrop",
                               "ColorJitter", "Grayscale"),
    "torchvision.transforms.functional": (),
    "torchvision.ops": (),
    "torchvision.ops.misc": ("FrozenBatchNorm2d",),
}


def _stand_ins() -> dict[str, types.ModuleType | None]:
    modules: dict[str, types.ModuleType | None] = {}
    for name, attrs in _TORCHVISION_NAMES.items():
        module = types.ModuleType(name)
        for attr in attrs:
            setattr(module, attr, type(attr, (), {}))
        modules[name] = module
    modules["torchvision.transforms"].InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")
    modules["transformers"] = None  # `import transformers` raises ImportError while this is in sys.modules
    return modules


@functools.cache
def load() -> types.ModuleType:
    """The open_clip package (its version checked), imported against the stand-ins."""
    stand_ins = _stand_ins()
    saved = {name: sys.modules[name] for name in stand_ins if name in sys.modules}
    sys.modules.update(stand_ins)
    try:
        import open_clip
    except ModuleNotFoundError as e:
        if e.name != "open_clip":
            raise
        raise ModuleNotFoundError(f"open_clip is not installed: pip install --no-deps open_clip_torch=={VERSION} "
                                  "(`make test` does)") from None
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    if open_clip.__version__ != VERSION:
        raise RuntimeError(f"open_clip {open_clip.__version__} is installed; these tests pin {VERSION}")
    return open_clip


def native_vit_configs() -> dict[str, dict[str, Any]]:
    """open_clip's bundled model configs built by its own ViT and text transformer (no timm/HF towers, no CoCa)."""
    oc = load()
    out = {}
    for name in oc.list_models():
        cfg = oc.get_model_config(name)
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        if not (v.get("timm_model_name") or t.get("hf_model_name") or isinstance(v.get("layers"), list)
                or "multimodal_cfg" in cfg or cfg.get("custom_text")):
            out[name] = cfg
    return out


def shrunk(cfg: dict[str, Any]) -> dict[str, Any]:
    """A model config with every field kept but depth, widths, image size and vocabulary made test-sized."""
    cfg = copy.deepcopy(cfg)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    v.update(layers=2, width=48, head_width=16, image_size=3 * v.get("patch_size", 16))
    t.update(layers=2, width=40, heads=5, vocab_size=99, context_length=min(t.get("context_length", 77), 12))
    cfg["embed_dim"] = 24
    return cfg


def build(model_cfg: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """open_clip's CLIP for `model_cfg`, in eval mode, with random weights everywhere: LayerNorms and LayerScale
    gammas moved off their (1, 0) and 1e-4 inits so a dropped or swapped one cannot pass."""
    torch.manual_seed(seed)
    model = load().CLIP(**copy.deepcopy(model_cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"(^|\.)ln_\w+\.(weight|bias)$", name):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".gamma"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
        model.logit_scale.fill_(3.3)
    return model


def save_hub(model: torch.nn.Module, model_cfg: dict[str, Any], directory: pathlib.Path,
             weights: str = "open_clip_model.safetensors") -> pathlib.Path:
    """The hub layout open_clip's `push_to_hf_hub` writes: `open_clip_config.json` and the weights file."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = directory / weights
    if weights.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def inputs(model_cfg: dict[str, Any], n: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random NHWC pixels and full-length token rows ending (at varied positions, then zeros) in the token the
    text tower pools at: the largest id, or `eos_id` for 'eos' pooling; the last row has none."""
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    vocab, length = t["vocab_size"], t["context_length"]
    end = t.get("eos_id", 2) if t.get("pool_type") == "eos" else vocab - 1
    rng = np.random.RandomState(seed)
    pixels = rng.randn(n, v["image_size"], v["image_size"], 3).astype(np.float32)
    tokens = rng.randint(1, vocab - 1, (n, length)).astype(np.int32)
    tokens[tokens == end] = end + 1
    for i in range(n - 1):
        position = [1, length - 1, length // 2][i % 3]
        tokens[i, position] = end
        tokens[i, position + 1:] = 0
    return pixels, tokens


def features(model: torch.nn.Module, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """open_clip's `encode_image` / `encode_text` (unnormalised) of NHWC pixels and token ids."""
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
        text = model.encode_text(torch.from_numpy(tokens.astype(np.int64)))
    return image.numpy(), text.numpy()
