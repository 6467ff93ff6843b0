"""Image-text retrieval Recall@k, as CLIP_benchmark defines it (the "CLIP paper" recall).

* image->text: each image is a query over all captions; it hits at k when ANY of its captions is among the
  k best-scored captions (so several captions per image help, exactly as in the Karpathy COCO/Flickr protocol).
* text->image: each caption is a query over all images; it hits at k when its one image is among the k best.
* R@k is the fraction of queries that hit. CLIP_benchmark calls text->image "image_retrieval_recall@k" and
  image->text "text_retrieval_recall@k"; the keys here name the direction instead.

Ties follow ``scoring``'s rule (equal scores: lower candidate index first, as a stable sort and ``jax.lax.top_k``
order them), so the top-k list always holds exactly k candidates; a positive's rank counts the valid candidates
that beat it.

Masks mark real rows; padding rows (multi-host padded eval batches) are dropped before anything is scored, so
they are never queries, never candidates and never push a real candidate down. An image none of whose captions
is valid counts as a miss (CLIP_benchmark's 0/0 recall is NaN, and ``NaN > 0`` is false).

Scores are computed in row chunks so a 5k x 25k COCO evaluation never materialises the full matrix at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from clipup_jax.evaluate.scoring import (as_embeddings, as_mask, check_finite, check_ks, l2_normalize, row_chunks,
                                        target_ranks)

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
    images = as_embeddings(image_emb, "image_emb")
    texts = as_embeddings(text_emb, "text_emb")
    if images.shape[1] != texts.shape[1]:
        raise ValueError(f"embedding widths differ: images {images.shape[1]}, texts {texts.shape[1]}")
    n, m = len(images), len(texts)
    owner = np.asarray(text_to_image)
    if owner.shape != (m,) or not np.issubdtype(owner.dtype, np.integer):
        raise ValueError(f"text_to_image must be integers of shape ({m},), got {owner.dtype} {owner.shape}")
    image_valid = as_mask(image_mask, n, "image_mask")
    text_valid = as_mask(text_mask, m, "text_mask")
    ks = check_ks(ks)

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
    check_finite(images, "image_emb")
    check_finite(texts, "text_emb")

    t2i_rank = _text_to_image_ranks(texts, images, owner, chunk_size)
    i2t_rank = _image_to_text_ranks(images, texts, owner, chunk_size)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float(np.mean(i2t_rank < k))
    for k in ks:
        out[f"text_to_image_R@{k}"] = float(np.mean(t2i_rank < k))
    return out


def _text_to_image_ranks(texts: np.ndarray, images: np.ndarray, owner: np.ndarray, chunk_size: int | None):
    ranks = np.empty(len(texts), np.int64)
    for lo, hi in row_chunks(len(texts), len(images), chunk_size):
        ranks[lo:hi] = target_ranks(texts[lo:hi] @ images.T, owner[lo:hi])
    return ranks


def _image_to_text_ranks(images: np.ndarray, texts: np.ndarray, owner: np.ndarray, chunk_size: int | None):
    """Rank of each image's best-placed caption; ``_NEVER`` (a miss for any k) for an image without captions.

    Under a total order the best-placed positive is the one with the highest score, the lowest index among
    equals -- which is what ``argmax`` over the positives' scores returns -- so its rank is the minimum. The
    positives' scores are gathered from each score block through a padded table of every image's captions (in
    index order), so no block-sized mask is built.
    """
    by_image = np.argsort(owner, kind="stable")  # captions grouped by image, ascending index within each
    counts = np.bincount(owner, minlength=len(images))
    slots = np.arange(counts.max(initial=0))
    starts = np.cumsum(counts) - counts
    captions = by_image[np.minimum(starts[:, None] + slots[None, :], max(len(owner) - 1, 0))]
    has = slots[None, :] < counts[:, None]  # (images, max captions): which slots hold a caption
    ranks = np.full(len(images), _NEVER, np.int64)
    for lo, hi in row_chunks(len(images), len(texts), chunk_size):
        scores = images[lo:hi] @ texts.T
        rows = np.arange(hi - lo)[:, None]
        candidates = np.where(has[lo:hi], scores[rows, captions[lo:hi]], -np.inf)
        best = captions[lo:hi][rows[:, 0], candidates.argmax(axis=1)]
        found = counts[lo:hi] > 0
        ranks[lo:hi][found] = target_ranks(scores[found], best[found])
    return ranks
