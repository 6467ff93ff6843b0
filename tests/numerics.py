"""Tolerances for float32 comparisons, derived from the computation instead of tuned to one machine's rounding.

Two programs that evaluate the same algebra in a different order (sharded vs global loss, scan vs loop, expert
parallel vs one device, two processes vs one) differ by rounding, and how much depends on the CPU and the kernels
XLA picks for it. A sum of n float32 terms is off by at most gamma_n = n * u times the sum of the terms' magnitudes
(u = 2**-24; Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 4.4), and a chain of such
reductions adds its links' errors to first order. So the bound is on the error *relative to the tensor's scale*
(its largest magnitude), never element by element: an entry that is a near-cancelling sum (a gradient close to
zero) carries an absolute error set by its summands, and an element-wise relative tolerance on it is a bet.

`reduction_bound(n, chain)` is that first-order bound, times `SAFETY` for what the scale stands in for: the sum of
the summands' magnitudes can exceed the largest output where terms cancel (softmax gradients sum to zero).
Real errors (a wrong sign, a dropped term, a swapped axis, a wrong expert) move a tensor by a sizeable fraction
of its scale, orders of magnitude above these bounds.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

U32 = 2.0 ** -24  # float32 unit roundoff
SAFETY = 8.0  # scale-vs-summands and second-order terms; measured errors sit well below the bound (see callers)


def reduction_bound(terms: int, chain: int = 1) -> float:
    """First-order float32 error of `chain` dependent reductions of at most `terms` terms each, relative to scale."""
    return SAFETY * chain * terms * U32


def scaled_error(got: Any, want: Any, scale: float | None = None) -> float:
    """max |got - want| / scale, the scale being max |want| unless given (float64; 0 when both are all zero).

    Give the scale where `want` is mathematically zero (a gradient the math cancels): its float value is then
    rounding noise, and the summands that cancelled set the scale."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = float(np.abs(want).max(initial=0.0)) if scale is None else scale
    err = float(np.abs(got - want).max(initial=0.0))
    return err / scale if scale else err


def assert_close(got: Any, want: Any, bound: float, what: str = "", scale: float | None = None) -> float:
    """Fails when `got` is off by more than `bound` of the scale (see `scaled_error`); returns the error."""
    err = scaled_error(got, want, scale)
    print(f"{what}: error {err:.3g} of scale, bound {bound:.3g}")  # shown by `pytest -rP`: the margin
    assert err <= bound, f"{what}: error {err:.3g} of the tensor's scale exceeds the rounding bound {bound:.3g}"
    return err


def _leaves(tree: Any) -> list[tuple[str, np.ndarray]]:
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "dtype") and jax.numpy.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append((jax.tree_util.keystr(path), np.asarray(leaf)))
    return out


def _paired_leaves(got: Any, want: Any, what: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(path, got leaf, want leaf) of two trees that must have the same paths."""
    got_leaves, want_leaves = _leaves(got), _leaves(want)
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves], what
    return [(path, a, b) for (path, a), (_, b) in zip(got_leaves, want_leaves)]


def assert_trees_close(got: Any, want: Any, bound: float, what: str = "") -> float:
    """`assert_close` leaf by leaf (same structure required); returns the largest measured error."""
    return max((assert_close(a, b, bound, f"{what}{path}") for path, a, b in _paired_leaves(got, want, what)),
               default=0.0)


def assert_trees_equal(got: Any, want: Any, what: str = "") -> None:
    """Bitwise, for what is not rounded: integers, RNG keys and counters, the same program on the same inputs."""
    for path, a, b in _paired_leaves(got, want, what):
        np.testing.assert_array_equal(a, b, err_msg=f"{what}{path}")


def assert_update_close(new: Any, want_new: Any, old: Any, bound: float, what: str = "") -> float:
    """Parameters after an optimizer step: the error is judged against the step's size, not the parameter's,
    plus the rounding of the parameter itself (one ulp of its scale per side). Returns the measured error
    relative to the update's scale."""
    new, want_new, old = (np.asarray(a, np.float64) for a in (new, want_new, old))
    update = float(np.abs(want_new - old).max(initial=0.0))
    assert update > 0, f"{what}: the step did not move these parameters"
    err = float(np.abs(new - want_new).max(initial=0.0))
    allowed = bound * update + 2 * U32 * float(np.abs(old).max(initial=0.0))
    print(f"{what}: error {err / update:.3g} of the update's scale, bound {bound:.3g}")
    assert err <= allowed, (f"{what}: error {err:.3g} exceeds {allowed:.3g} (rounding bound {bound:.3g} of the "
                            f"update's scale {update:.3g}, plus the parameter's own rounding)")
    return err / update
