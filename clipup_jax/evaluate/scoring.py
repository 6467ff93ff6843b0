"""What retrieval and zero-shot scoring share: the tie rule of a rank, chunked rows, and input checks.

Tie rule (deterministic): candidates are ordered by score, descending, and equal scores by candidate index,
ascending -- the order of a stable sort and of ``jax.lax.top_k``. A positive's rank is the number of candidates
that beat it under this order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from numpy.typing import ArrayLike

# Scores per chunk (~16 MB of float32): small enough for any host, large enough for BLAS to be efficient.
CHUNK_ELEMENTS = 1 << 22


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rank (0 = best) of ``scores[i, targets[i]]`` in row i under the tie rule (module doc): lower index first."""
    rows = np.arange(len(scores))
    target_score = scores[rows, targets][:, None]
    ranks = np.count_nonzero(scores > target_score, axis=1)
    # Two passes over the block instead of one per term of the rule: only rows where another column ties with
    # the target (rare with float scores) need the columns before the target counted.
    tied = np.flatnonzero(np.count_nonzero(scores >= target_score, axis=1) - ranks > 1)
    for i in tied:
        ranks[i] += np.count_nonzero(scores[i, : targets[i]] == target_score[i, 0])
    return ranks


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32; an all-zero row stays zero instead of becoming NaN."""
    x = np.asarray(x, np.float32)
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    return x / np.maximum(norm, np.float32(1e-12))


def row_chunks(rows: int, columns: int, chunk_size: int | None) -> Iterator[tuple[int, int]]:
    """[lo, hi) row ranges whose score block holds about CHUNK_ELEMENTS (or `chunk_size` rows)."""
    size = chunk_size if chunk_size is not None else max(1, CHUNK_ELEMENTS // max(columns, 1))
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {size}")
    for lo in range(0, rows, size):
        yield lo, min(lo + size, rows)


def as_embeddings(x: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, width), got shape {x.shape}")
    return x


def as_mask(mask: ArrayLike | None, n: int, name: str) -> np.ndarray:
    if mask is None:
        return np.ones(n, bool)
    mask = np.asarray(mask)
    if mask.shape != (n,) or mask.dtype != bool:
        raise ValueError(f"{name} must be bool of shape ({n},), got {mask.dtype} {mask.shape}")
    return mask


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def check_finite(x: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has non-finite values in rows that are not masked")

