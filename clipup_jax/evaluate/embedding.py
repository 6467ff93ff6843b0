"""Batched, jit-compiled feature extraction with a fixed batch shape (one compile per tower)."""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
from flax import nnx

from clipup_jax.models import CLIP
from clipup_jax.models.encoder import for_inference


# Module-level and keyed on the (hashable) graph definition: a periodic eval during training builds a new Embedder
# each time and must hit the compile cache, not recompile both towers.
@functools.partial(jax.jit, static_argnums=0)
def _encode_image(graphdef: nnx.GraphDef, state: nnx.State, pixels: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).encode_image(pixels)


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).encode_text(tokens)


class Embedder:
    """Runs `encode_image` / `encode_text` over arrays of any length in batches of `batch_size`.

    A short last batch is padded to `batch_size`, reusing the program the full batches compiled; an input
    shorter than one batch runs at its own size (one compile, and no work on padding rows).
    """

    def __init__(self, model: CLIP, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        graphdef, state = nnx.split(for_inference(model))
        self._state = state
        self._image = functools.partial(_encode_image, graphdef)
        self._text = functools.partial(_encode_text, graphdef)
        self.logit_scale = float(np.asarray(model.scale()))

    def images(self, batches: Iterable[np.ndarray]) -> np.ndarray:
        """Features of (N, H, W, 3) pixel batches, projected and not normalised."""
        return self._run(self._image, batches)

    def texts(self, batches: Iterable[np.ndarray]) -> np.ndarray:
        """Features of (N, L) int32 token batches, projected and not normalised."""
        return self._run(self._text, batches)

    def _run(self, fn: Callable, batches: Iterable[np.ndarray]) -> np.ndarray:
        out = []
        for batch in batches:
            n = batch.shape[0]
            if n < self.batch_size and out:  # the last, short batch: pad rather than compile another shape
                pad = np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)
                batch = np.concatenate([batch, pad])
            out.append(np.asarray(fn(self._state, batch))[:n])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def chunks(array: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(array), size):
        yield array[start:start + size]
