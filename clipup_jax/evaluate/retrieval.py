"""Image-text retrieval Recall@k, as CLIP_benchmark defines it (the "CLIP paper" recall).

* image->text: each image is a query over all captions; it hits at k when ANY of its captions is among the
  k best-scored captions (so several captions per image help, exactly as in the Karpathy COCO/Flickr protocol).
* text->image: each caption is a query over all images; it hits at k when its one image is among the k best.
* R@k is the fraction of queries that hit. CLIP_benchmark calls text->image "image_retrieval_recall@k" and
  image->text "text_retrieval_recall@k"; the keys here name the direction instead.

Tie rule (deterministic): candidates are ordered by score, descending, and equal scores by candidate index,
ascending -- the order of a stable sort and of ``jax.lax.top_k``. The top-k list therefore always holds exactly
k candidates. A positive's rank is the number of valid candidates that beat it under this order.

Masks mark real rows; padding rows (multi-host padded eval batches) are dropped before anything is scored, so
they are never queries, never candidates and never push a real candidate down. An image none of whose captions
is valid counts as a miss (CLIP_benchmark's 0/0 recall is NaN, and ``NaN > 0`` is false).

Scores are computed in row chunks so a 5k x 25k COCO evaluation never materialises the full matrix at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

# Scores per chunk (~16 MB of float32): small enough for any host, large enough for BLAS to be efficient.
_CHUNK_ELEMENTS = 1 << 22
_NEVER = np.iinfo(np.int64).max


def retrieval_metrics(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_to_image: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
    image_mask: ArrayLike | None = None,
    text_mask: ArrayLike | None = None,
    *,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """``{"image_to_text_R@k": ..., "text_to_image_R@k": ...}`` for every k in ``ks``, each in [0, 1].

    Embeddings are L2-normalised here (cosine similarity), which is a no-op for already normalised inputs.
    ``text_to_image[t]`` is the index of caption t's image; it is ignored for masked captions.
    ``chunk_size`` (query rows per score block) only trades memory for speed; results do not depend on it.
    """
    images = _as_embeddings(image_emb, "image_emb")
    texts = _as_embeddings(text_emb, "text_emb")
    if images.shape[1] != texts.shape[1]:
        raise ValueError(f"embedding widths differ: images {images.shape[1]}, texts {texts.shape[1]}")
    n, m = len(images), len(texts)
    owner = np.asarray(text_to_image)
    if owner.shape != (m,) or not np.issubdtype(owner.dtype, np.integer):
        raise ValueError(f"text_to_image must be integers of shape ({m},), got {owner.dtype} {owner.shape}")
    image_valid = _as_mask(image_mask, n, "image_mask")
    text_valid = _as_mask(text_mask, m, "text_mask")
    ks = _check_ks(ks)

    if not image_valid.any() or not text_valid.any():
        raise ValueError(f"nothing to evaluate: {image_valid.sum()} valid images, {text_valid.sum()} valid captions")
    owner = owner[text_valid]
    if np.any((owner < 0) | (owner >= n)):
        raise ValueError(f"text_to_image of a valid caption is outside [0, {n})")
    if not np.all(image_valid[owner]):
        raise ValueError("a valid caption points at a masked (padding) image")
    # Compact to the real rows; the relative order (hence the tie rule) of the survivors is unchanged.
    new_index = np.cumsum(image_valid) - 1
    owner = new_index[owner]
    images, texts = l2_normalize(images[image_valid]), l2_normalize(texts[text_valid])
    _check_finite(images, "image_emb")
    _check_finite(texts, "text_emb")

    t2i_rank = _text_to_image_ranks(texts, images, owner, chunk_size)
    i2t_rank = _image_to_text_ranks(images, texts, owner, chunk_size)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float(np.mean(i2t_rank < k))
    for k in ks:
        out[f"text_to_image_R@{k}"] = float(np.mean(t2i_rank < k))
    return out


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rank (0 = best) of ``scores[i, targets[i]]`` in row i under the tie rule above: lower index first."""
    rows = np.arange(len(scores))
    target_score = scores[rows, targets][:, None]
    columns = np.arange(scores.shape[1])[None, :]
    beats = (scores > target_score) | ((scores == target_score) & (columns < targets[:, None]))
    return beats.sum(axis=1)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32; an all-zero row stays zero instead of becoming NaN."""
    x = np.asarray(x, np.float32)
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    return x / np.maximum(norm, np.float32(1e-12))


def _text_to_image_ranks(texts: np.ndarray, images: np.ndarray, owner: np.ndarray, chunk_size: int | None):
    ranks = np.empty(len(texts), np.int64)
    for lo, hi in _row_chunks(len(texts), len(images), chunk_size):
        ranks[lo:hi] = target_ranks(texts[lo:hi] @ images.T, owner[lo:hi])
    return ranks


def _image_to_text_ranks(images: np.ndarray, texts: np.ndarray, owner: np.ndarray, chunk_size: int | None):
    """Rank of each image's best-placed caption; ``_NEVER`` (a miss for any k) for an image without captions.

    Under a total order the best-placed positive is the one with the highest score, the lowest index among
    equals -- which is what ``argmax`` over the positives' scores returns -- so its rank is the minimum.
    """
    ranks = np.empty(len(images), np.int64)
    for lo, hi in _row_chunks(len(images), len(texts), chunk_size):
        scores = images[lo:hi] @ texts.T
        positive = owner[None, :] == np.arange(lo, hi)[:, None]
        best = np.where(positive, scores, -np.inf).argmax(axis=1)
        ranks[lo:hi] = np.where(positive.any(axis=1), target_ranks(scores, best), _NEVER)
    return ranks


def _row_chunks(rows: int, columns: int, chunk_size: int | None):
    size = chunk_size if chunk_size is not None else max(1, _CHUNK_ELEMENTS // max(columns, 1))
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {size}")
    for lo in range(0, rows, size):
        yield lo, min(lo + size, rows)


def _as_embeddings(x: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, width), got shape {x.shape}")
    return x


def _as_mask(mask: ArrayLike | None, n: int, name: str) -> np.ndarray:
    if mask is None:
        return np.ones(n, bool)
    mask = np.asarray(mask)
    if mask.shape != (n,) or mask.dtype != bool:
        raise ValueError(f"{name} must be bool of shape ({n},), got {mask.dtype} {mask.shape}")
    return mask


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def _check_finite(x: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has non-finite values in rows that are not masked")
