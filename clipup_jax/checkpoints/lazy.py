"""Arrays made one leading-axis slice at a time: an upcycled expert stack, a stacked layer built from its blocks."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from clipup_jax.checkpoints.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class LazyStack:
    """A float32 array of `shape` whose slice `i` along axis 0 is `part(i)`, made only when asked for.

    Indexing (`stack[idx]`) builds only the slices `idx` covers, so
    `jax.make_array_from_callback(stack.shape, sharding, stack.__getitem__)`
    gives each device just its own experts. A part may itself be a `LazyStack` (a stacked layer's upcycled
    experts): it is indexed by the rest of `idx`, never built whole.
    """

    shape: tuple[int, ...]
    part: Callable[[int], "np.ndarray | LazyStack"]
    lazy_axes: int = 1  # leading axes made slice by slice: 2 for a stacked layer of lazy experts

    dtype = np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, idx: Any) -> np.ndarray:
        idx = idx if isinstance(idx, tuple) else (idx,)
        head, rest = (idx[0], idx[1:]) if idx else (slice(None), ())
        rows = range(self.shape[0])[head]
        if isinstance(rows, int):
            return self._part(rows, rest)
        return np.stack([self._part(i, rest) for i in rows]) if len(rows) else \
            np.empty((0, *self.shape[1:]), np.float32)[(slice(None), *rest)]

    def _part(self, i: int, rest: tuple) -> np.ndarray:
        part = self.part(i)
        if tuple(part.shape) != self.shape[1:]:
            raise CheckpointError(f"slice {i} of a {self.shape} stack has shape {tuple(part.shape)}")
        return part[rest] if isinstance(part, LazyStack) else np.asarray(np.asarray(part, np.float32)[rest])

    def materialize(self) -> np.ndarray:
        return self[:]
