"""Whether a train step was sound, and what the loop does when it was not (`config.nonfinite`).

The step returns a `Health` beside its metrics: flags the host reads, never logged. `nonfinite` names every
tensor it checked ("batch/pixels", "loss", "grad/<param>", "update/<param>"), so the guard reports the culprits
by reading the names from the tree itself.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipup_jax.models.param_tree import tree_path_name

NONFINITE_POLICIES = ("stop", "skip")
_REPORT_ORDER = {"batch": 0, "loss": 1, "grad": 2, "update": 3}  # pytrees sort dict keys; culprits read in step order


@flax.struct.dataclass
class Health:
    finite: jax.Array  # inputs, loss, gradients and the new parameters all finite
    applied: jax.Array  # the update was applied (its inputs, loss and gradients were finite)
    nonfinite: dict[str, jax.Array]  # per checked tensor: True where it held NaN/Inf (all False on a good step)


def _per_leaf(prefix: str, tree: Any) -> dict[str, jax.Array]:
    return {f"{prefix}/{tree_path_name(path)}": ~jnp.all(jnp.isfinite(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def step_health(pixels: jax.Array, loss: jax.Array, grads: Any, params: Any, applied: jax.Array,
                params_finite: jax.Array) -> Health:
    """The step's `Health`; the per-tensor flags are computed only when something was not finite."""
    finite = applied & params_finite

    def culprits():
        return {"batch/pixels": ~jnp.all(jnp.isfinite(pixels)), "loss": ~jnp.isfinite(loss),
                **_per_leaf("grad", grads), **_per_leaf("update", params)}

    nonfinite = jax.lax.cond(finite, lambda: jax.tree.map(jnp.zeros_like, jax.eval_shape(culprits)), culprits)
    return Health(finite=finite, applied=applied, nonfinite=nonfinite)


class NonFiniteLoss(RuntimeError):
    """A step's input pixels, loss, gradients or update held NaN/Inf (config.nonfinite="stop"), or more than
    config.max_nonfinite_skips such steps came in a row ("skip"). That step was not applied and never saved:
    the last good checkpoint is kept as it is."""


class NonFiniteGuard:
    """Applies config.nonfinite to every step's `Health`. A step is checked once the next one is launched (one
    step late), so the host never waits on the step it just launched; `check(now=True)` before anything that
    reads the state (log, eval, save) keeps a bad step out of checkpoints."""

    def __init__(self, config: ml_collections.ConfigDict, latest_good: Callable[[], int | None], verbose: bool):
        self.policy, self.limit = config.nonfinite, config.max_nonfinite_skips
        self.latest_good, self.verbose = latest_good, verbose
        self.pending: tuple[int, Health] | None = None
        self.skipped = 0  # steps skipped in this run
        self.in_row = 0

    def check(self, step: int, health: Health, now: bool) -> None:
        self.flush()
        self.pending = (step, health)
        if now:
            self.flush()

    def flush(self) -> None:
        if self.pending is None:
            return
        step, health = self.pending
        self.pending = None
        if bool(health.finite):
            self.in_row = 0
            return
        bad = sorted((name for name, flag in jax.device_get(health.nonfinite).items() if np.asarray(flag)),
                     key=lambda name: _REPORT_ORDER[name.split("/")[0]])
        culprits = ", ".join(bad[:4]) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "")
        good = f"latest good checkpoint: step {self.latest_good()}"
        if bool(health.applied):  # finite inputs and gradients, yet the update overflowed: no skip can undo it
            raise NonFiniteLoss(f"step {step}: the update from finite gradients made parameters non-finite "
                                f"({culprits}); lower config.optim.lr or config.optim.grad_clip_norm; {good}")
        if self.policy == "stop":
            raise NonFiniteLoss(f"step {step}: not finite: {culprits}; the step was not applied "
                                f"(config.nonfinite='stop'); {good}")
        self.skipped += 1
        self.in_row += 1
        if self.in_row > self.limit:
            raise NonFiniteLoss(f"step {step}: {self.in_row} non-finite steps in a row, more than "
                                f"config.max_nonfinite_skips={self.limit} (last: {culprits}); {good}")
        if self.verbose:
            print(f"warning: step {step}: not finite: {culprits}; update skipped "
                  f"({self.skipped} skipped in this run)", flush=True)
