"""CLIP image preprocessing: bicubic resize, then to a square (OpenAI's: the short side, centre crop), mean/std
normalise.

How an image becomes a square moves retrieval scores by many points (open_clip#1074: Flickr30k R@1 by ~20), so
eval names it: `RESIZE_MODES`, open_clip's names for them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from clipup_jax.storage import Path, PathLike, as_path

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# shortest: short side to `size`, centre crop (OpenAI's `_transform`, the CLIP default); squash: both sides to
# `size`, aspect lost; longest: long side to `size`, centred on black padding (nothing cropped).
RESIZE_MODES = ("shortest", "squash", "longest")


def check_resize_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r}: expected one of {', '.join(RESIZE_MODES)}")
    return mode


def preprocess(image: Image.Image, size: int, resize: str = "shortest") -> np.ndarray:
    """(size, size, 3) float32 model input from any PIL image; `resize` is one of `RESIZE_MODES`."""
    image = image.convert("RGB")
    w, h = image.size
    if check_resize_mode(resize) == "squash":
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    elif resize == "longest":
        scale = size / max(w, h)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (size, size))  # padding as torchvision's CenterCrop pads: zeros, extra on the far side
        canvas.paste(image.resize((new_w, new_h), Image.Resampling.BICUBIC), ((size - new_w) // 2, (size - new_h) // 2))
        image = canvas
    else:
        scale = size / min(w, h)
        # OpenAI resizes so the short side is exactly `size` (torchvision rounds the long side down).
        new_w, new_h = (size, int(h * scale)) if w <= h else (int(w * scale), size)
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, np.float32) / 255.0
    return (pixels - CLIP_MEAN) / CLIP_STD


def list_images(paths: Sequence[PathLike]) -> list[Path]:
    """Image files named directly, plus those in named directories (sorted, so rows are reproducible); local or
    gs://."""
    out: list[Path] = []
    for p in map(as_path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image file or directory")
    if not out:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return out


def load_image(path: PathLike, size: int) -> np.ndarray:
    try:
        with as_path(path).open("rb") as f, Image.open(f) as image:
            return preprocess(image, size)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from e
