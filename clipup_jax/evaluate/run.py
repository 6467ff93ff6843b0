"""Evaluate a model on an image-caption source: retrieval both ways, and zero-shot when labels exist.

Each process embeds its own slice through the grain eval pipeline (every process
yields the same number of padded batches, with masks), the embeddings are gathered
across processes, and the metrics are computed on the masked global arrays, so
multi-host evaluation counts every example exactly once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from clipup_jax.data.pipeline import eval_pipeline
from clipup_jax.data.tokenizer import Tokenizer
from clipup_jax.evaluate.embedding import Embedder, chunks
from clipup_jax.evaluate.retrieval import retrieval_metrics
from clipup_jax.evaluate.zero_shot import class_embeddings, zero_shot_metrics
from clipup_jax.models import CLIP


@dataclasses.dataclass(frozen=True)
class EvalData:
    """What to evaluate on: a random-access source, and the class names and prompts for zero-shot (optional)."""

    source: Any
    tokenizer: Tokenizer
    size: int | None = None  # the first `size` examples (all when None)
    class_names: Sequence[str] = ()
    templates: Sequence[str] = ()
    max_captions: int = 5


class _Prefix:
    """The first n examples of a source (random access preserved)."""

    def __init__(self, source: Any, n: int):
        self.source, self.n = source, min(n, len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.source[index]


def _gather(x: np.ndarray) -> np.ndarray:
    """Concatenates every process's rows (a no-op with one process)."""
    if jax.process_count() == 1:
        return x
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate(model: CLIP, data: EvalData, batch_size: int = 256) -> dict[str, float]:
    cfg = model.cfg
    source = data.source if data.size is None else _Prefix(data.source, data.size)
    pipeline = eval_pipeline(source, tokenizer=data.tokenizer, image_size=cfg.vision.image_size,
                             context_length=cfg.text.context_length, batch_size=batch_size,
                             max_captions=data.max_captions, process_index=jax.process_index(),
                             process_count=jax.process_count())
    embedder = Embedder(model, batch_size)
    images, texts, image_mask, caption_mask, labels = [], [], [], [], []
    for batch in pipeline:
        b, c, length = batch["tokens"].shape
        images.append(embedder.images([batch["pixels"]]))
        if batch["caption_mask"].any():
            texts.append(embedder.texts(chunks(batch["tokens"].reshape(b * c, length), batch_size)))
        else:  # a classification set: no caption to embed
            texts.append(np.zeros((b * c, cfg.embed_dim), np.float32))
        image_mask.append(batch["mask"])
        caption_mask.append(batch["caption_mask"] & batch["mask"][:, None])
        labels.append(batch["label"])
    images, texts = _gather(np.concatenate(images)), _gather(np.concatenate(texts))
    image_mask, caption_mask = _gather(np.concatenate(image_mask)), _gather(np.concatenate(caption_mask))
    labels = _gather(np.concatenate(labels))
    metrics = {}
    if caption_mask.any():  # a classification set (ImageNet) has labels and no captions
        owner = np.repeat(np.arange(len(images)), caption_mask.shape[1])
        metrics = retrieval_metrics(images, texts, owner, image_mask=image_mask, text_mask=caption_mask.reshape(-1))
    if data.class_names and (labels[image_mask] >= 0).all():
        classes = class_embeddings(lambda t: embedder.texts(chunks(t, batch_size)), data.tokenizer, data.class_names,
                                   data.templates, cfg.text.context_length)
        zero_shot = zero_shot_metrics(images, np.maximum(labels, 0), classes, mask=image_mask)
        metrics.update({f"zero_shot_{k}": v for k, v in zero_shot.items()})
    metrics["eval_images"] = float(image_mask.sum())
    metrics["eval_captions"] = float(caption_mask.sum())
    return metrics
