"""Evaluate a model on an image-caption source: retrieval both ways, and zero-shot when labels exist.

Each process embeds its own slice through the grain eval pipeline (every process
yields the same number of padded batches, with masks), the embeddings are gathered
across processes, and the metrics are computed on the masked global arrays, so
multi-host evaluation counts every example exactly once.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from clipup_jax.data.image_ops import check_resize_mode
from clipup_jax.data.pipeline import eval_num_batches, eval_pipeline
from clipup_jax.data.tokenizer import Tokenizer
from clipup_jax.evaluate import templates
from clipup_jax.evaluate.embedding import Embedder, chunks
from clipup_jax.evaluate.retrieval import retrieval_metrics
from clipup_jax.evaluate.zero_shot import class_embeddings, zero_shot_metrics
from clipup_jax.models import CLIP


def zero_shot_classes(name: str, source: Any = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(class names, templates) a `config.data.zero_shot` value names: "" (none), "synthetic" (the embedded eval
    `source`'s own labels), "imagenet1k"
    (OpenAI's names and 80 templates), or "clip_benchmark:DATASET@DIR" (DIR holding CLIP_benchmark's
    en_classnames.json and en_zeroshot_classification_templates.json)."""
    if not name:
        return (), ()
    if name == "synthetic":
        if not hasattr(source, "zero_shot_classes"):
            raise ValueError(f"config.data.zero_shot='synthetic' names the labels of the embedded data set, but the "
                             f"eval data is {source!r}")
        return source.zero_shot_classes()
    if name == "imagenet1k":
        return templates.imagenet1k()
    dataset, sep, directory = name.removeprefix("clip_benchmark:").partition("@")
    if name.startswith("clip_benchmark:") and sep:
        root = pathlib.Path(directory)
        return templates.clip_benchmark(dataset, root / "en_classnames.json",
                                        root / "en_zeroshot_classification_templates.json")
    raise ValueError(f"config.data.zero_shot={name!r}: expected '', 'synthetic', 'imagenet1k' or "
                     "'clip_benchmark:DATASET@DIR'")


@dataclasses.dataclass(frozen=True)
class EvalData:
    """What to evaluate on: a random-access source, and the class names and prompts for zero-shot (optional)."""

    source: Any
    tokenizer: Tokenizer
    size: int | None = None  # the first `size` examples (all when None)
    class_names: Sequence[str] = ()
    templates: Sequence[str] = ()
    max_captions: int = 5
    resize: str = "shortest"  # how an image is made square: data.image_ops.RESIZE_MODES


def eval_data(source: Any, tokenizer: Tokenizer, size: int | None = None, zero_shot: str = "",
              resize: str = "shortest") -> EvalData:
    """`EvalData` for `source` with the classes `zero_shot` names (`zero_shot_classes`), and as many caption slots
    per image as the source's most-captioned image where it says (Karpathy splits), so no caption is cut."""
    class_names, prompts = zero_shot_classes(zero_shot, source)
    classes = getattr(source, "classes", None)  # a class-per-folder or TFDS classification source knows its classes
    if class_names and classes is not None and len(classes) != len(class_names):
        raise ValueError(f"zero-shot classes {zero_shot!r}: {len(class_names)} class names for the {len(classes)} "
                         f"classes of the eval data")
    return EvalData(source, tokenizer, size, class_names, prompts,
                    max(EvalData.max_captions, getattr(source, "max_captions", 0)), check_resize_mode(resize))


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


def evaluate(model: CLIP, data: EvalData, batch_size: int = 256,
             progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Metrics of `model` on `data`; `progress(batches_done, batches)` is called after each batch."""
    cfg = model.cfg
    source = data.source if data.size is None else _Prefix(data.source, data.size)
    pipeline = eval_pipeline(source, tokenizer=data.tokenizer, image_size=cfg.vision.image_size,
                             context_length=cfg.text.context_length, batch_size=batch_size,
                             max_captions=data.max_captions, process_index=jax.process_index(),
                             process_count=jax.process_count(), resize=data.resize)
    embedder = Embedder(model, batch_size)
    images, texts, image_mask, caption_mask, labels = [], [], [], [], []
    batches = eval_num_batches(len(source), batch_size, jax.process_count())
    for done, batch in enumerate(pipeline, 1):
        b, c, length = batch["tokens"].shape
        images.append(embedder.images([batch["pixels"]]))
        if batch["caption_mask"].any():
            texts.append(embedder.texts(chunks(batch["tokens"].reshape(b * c, length), batch_size)))
        else:  # a classification set: no caption to embed
            texts.append(np.zeros((b * c, cfg.embed_dim), np.float32))
        image_mask.append(batch["mask"])
        caption_mask.append(batch["caption_mask"] & batch["mask"][:, None])
        labels.append(batch["label"])
        if progress is not None:
            progress(done, batches)
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
