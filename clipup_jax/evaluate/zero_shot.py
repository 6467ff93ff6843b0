"""Zero-shot classification with prompt ensembles (OpenAI / open_clip / CLIP_benchmark protocol).

A class's classifier row is the renormalised mean of its L2-normalised prompt embeddings; an image is scored
against every row by cosine similarity (the logit scale does not change any ranking, so it is left out).
Ties between classes go to the lower class index, the rule of ``retrieval.target_ranks``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from clipup_jax.evaluate.scoring import as_mask, check_finite, check_ks, l2_normalize, row_chunks, target_ranks


def class_embeddings(
    embed_texts: Callable[[np.ndarray], np.ndarray],
    tokenizer: Callable[[Sequence[str], int], np.ndarray],
    class_names: Sequence[str],
    templates: Sequence[str],
    context_length: int,
) -> np.ndarray:
    """(C, E) float32 unit rows: per class, normalise each template's embedding, average, renormalise.

    All C*T prompts go through ``embed_texts`` in one call (class-major order), so a batching embedder such as
    ``lambda tokens: embedder.texts(chunks(tokens, bs))`` pads only the last batch instead of one per class.
    """
    if isinstance(class_names, str) or isinstance(templates, str):
        raise ValueError("class_names and templates must be sequences of strings, not a single string")
    class_names, templates = list(class_names), list(templates)
    if not class_names or not templates:
        raise ValueError(f"need at least one class and one template, got {len(class_names)} and {len(templates)}")
    if any("{}" not in t for t in templates):
        raise ValueError(f"every template needs a '{{}}' placeholder for the class name: {templates}")
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = np.asarray(embed_texts(tokenizer(prompts, context_length)))
    c, t = len(class_names), len(templates)
    if emb.ndim != 2 or emb.shape[0] != c * t:
        raise ValueError(f"embed_texts returned shape {emb.shape} for {c * t} prompts")
    emb = emb.astype(np.float64).reshape(c, t, -1)
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    mean = emb.mean(axis=1)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


def zero_shot_metrics(
    image_emb: ArrayLike,
    labels: ArrayLike,
    class_emb: ArrayLike,
    ks: Sequence[int] = (1, 5),
    mask: ArrayLike | None = None,
) -> dict[str, float]:
    """``top{k}`` accuracy for each k, and ``mean_per_class_recall`` (top-1 balanced accuracy).

    k is capped at the class count, so ``top5`` of a 3-class problem is 1.0 (CLIP_benchmark reports NaN there).
    The per-class mean runs over classes with at least one valid image, as sklearn's
    ``balanced_accuracy_score`` (CLIP_benchmark's implementation) does. Masked rows are padding and ignored.
    """
    images = np.asarray(image_emb)
    classes = np.asarray(class_emb)
    labels = np.asarray(labels)
    if images.ndim != 2 or classes.ndim != 2 or images.shape[1] != classes.shape[1]:
        raise ValueError(f"need (N, E) images and (C, E) classes, got {images.shape} and {classes.shape}")
    n, c = images.shape[0], classes.shape[0]
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
    valid = as_mask(mask, n, "mask")
    ks = check_ks(ks)
    if c == 0 or not valid.any():
        raise ValueError(f"nothing to evaluate: {valid.sum()} valid images, {c} classes")
    labels = labels[valid]
    if np.any((labels < 0) | (labels >= c)):
        raise ValueError(f"a valid label is outside [0, {c})")
    images, classes = l2_normalize(images[valid]), l2_normalize(classes)
    check_finite(images, "image_emb")
    check_finite(classes, "class_emb")

    ranks = np.empty(len(images), np.int64)
    for lo, hi in row_chunks(len(images), c, None):
        ranks[lo:hi] = target_ranks(images[lo:hi] @ classes.T, labels[lo:hi])
    out = {f"top{k}": float(np.mean(ranks < k)) for k in ks}  # rank <= c - 1, so k > c caps itself
    count = np.bincount(labels, minlength=c)
    correct = np.bincount(labels, weights=(ranks == 0).astype(np.float64), minlength=c)
    present = count > 0
    out["mean_per_class_recall"] = float(np.mean(correct[present] / count[present]))
    return out
