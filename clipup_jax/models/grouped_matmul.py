"""Grouped matmuls for the sorted dispatches: rows sorted by expert times that expert's weight.

`lhs` (R, K) rows are grouped contiguously by expert, `group_sizes` (E,) sums to at
most R (rows past the sum belong to no expert, and what a kernel writes there is not
defined: Megablox leaves them unwritten, so callers cover every row), `rhs` is
(E, K, N). Backends:

* `ragged_dot`: `jax.lax.ragged_dot`. XLA:TPU and XLA:GPU (cuDNN) have grouped
  kernels; XLA:CPU lowers it to a masked dense matmul costing about E times more,
  so it is not the CPU choice.
* `pallas`: the Megablox grouped-matmul Pallas kernel (TPU). Elsewhere it runs in
  interpret mode, which is for tests only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=lhs.dtype)


def _tile(dim: int, preferred: int = 128) -> int:
    """The largest tile <= preferred dividing `dim`, at least 8 (Megablox needs exact tiling)."""
    for t in (preferred, 64, 32, 16, 8):
        if dim % t == 0:
            return t
    raise ValueError(f"pallas grouped matmul needs dimensions divisible by 8, got {dim}")


def pallas_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.megablox import ops

    m, k = lhs.shape
    n = rhs.shape[-1]
    pad = (-m) % 8
    if pad:
        lhs = jnp.pad(lhs, ((0, pad), (0, 0)))
    tiling = (_tile(m + pad), _tile(k), _tile(n))
    interpret = jax.default_backend() != "tpu"
    out = ops.gmm(lhs, rhs, group_sizes.astype(jnp.int32), lhs.dtype, tiling, None, None, False, interpret)
    return out[:m]


GROUPED_MATMULS = {"ragged_dot": ragged_dot, "pallas": pallas_gmm}
