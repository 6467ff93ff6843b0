"""Evaluate a model on an image-caption source: retrieval both ways, and zero-shot when labels exist.

The eval set is materialised once (preprocessed pixels, every caption tokenised)
and reused at each evaluation during training. Runs on the host that calls it.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from clipup_jax.data.image_ops import preprocess
from clipup_jax.data.tokenizer import Tokenizer
from clipup_jax.evaluate.embedding import Embedder, chunks
from clipup_jax.evaluate.retrieval import retrieval_metrics
from clipup_jax.evaluate.zero_shot import class_embeddings, zero_shot_metrics
from clipup_jax.models import CLIP


@dataclasses.dataclass(frozen=True)
class EvalSet:
    pixels: np.ndarray  # (N, H, W, 3) model input
    tokens: np.ndarray  # (M, L) every caption of every image
    text_to_image: np.ndarray  # (M,) image index of each caption
    labels: np.ndarray | None = None  # (N,) class ids for zero-shot
    class_names: Sequence[str] = ()
    templates: Sequence[str] = ()


def _image(record: Mapping[str, Any], size: int) -> np.ndarray:
    if "image" in record:
        return preprocess(Image.fromarray(np.asarray(record["image"], np.uint8)), size)
    with Image.open(io.BytesIO(record["image_bytes"])) as image:
        return preprocess(image, size)


def build_eval_set(source: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, image_size: int, context_length: int,
                   size: int | None = None, class_names: Sequence[str] = (), templates: Sequence[str] = ()) -> EvalSet:
    """The first `size` examples of `source` (all of it when None)."""
    n = len(source) if size is None else min(size, len(source))
    pixels, captions, owner, labels = [], [], [], []
    for i in range(n):
        record = source[i]
        pixels.append(_image(record, image_size))
        texts = record.get("captions") or (record["caption"],)
        captions.extend(texts)
        owner.extend([i] * len(texts))
        if "label" in record:
            labels.append(int(record["label"]))
    return EvalSet(np.stack(pixels), tokenizer(captions, context_length), np.asarray(owner, np.int64),
                   np.asarray(labels, np.int64) if class_names and len(labels) == n else None,
                   tuple(class_names), tuple(templates))


def evaluate(model: CLIP, eval_set: EvalSet, tokenizer: Tokenizer, batch_size: int = 256) -> dict[str, float]:
    embedder = Embedder(model, batch_size)
    images = embedder.images(chunks(eval_set.pixels, batch_size))
    texts = embedder.texts(chunks(eval_set.tokens, batch_size))
    metrics = retrieval_metrics(images, texts, eval_set.text_to_image)
    if eval_set.labels is not None:
        classes = class_embeddings(lambda t: embedder.texts(chunks(t, batch_size)), tokenizer, eval_set.class_names,
                                   eval_set.templates, eval_set.tokens.shape[1])
        metrics.update({f"zero_shot_{k}": v for k, v in zero_shot_metrics(images, eval_set.labels, classes).items()})
    return metrics
