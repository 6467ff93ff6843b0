"""Training checkpoints: an Orbax CheckpointManager over the train state and the data iterator.

    WORKDIR/
      clipup.json, tokenizer/    the model config and tokenizer (as in a converted checkpoint)
      checkpoints/<step>/state   params, optimizer state, step (Orbax; any mesh can restore it)
      checkpoints/<step>/data    the grain iterator position, one file per process

Saves are asynchronous; Orbax commits a step only when every file is written, so
a kill mid-save leaves the previous step as the latest complete one.
"""

from __future__ import annotations

import contextlib
import errno
import warnings
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.checkpoints.train_workdir import CHECKPOINTS_DIR, ITEMS, STATE_ITEM
from clipup_jax.models.param_tree import path_shapes
from clipup_jax.storage import Path, absolute
from clipup_jax.train.recipes import SAVE_TIMEOUT_S

class SaveFailed(CheckpointError):
    """A checkpoint (or the metrics written with it) could not be written: the store failed or filled up."""


def error_reason(e: BaseException) -> str:
    """One line: what failed, "no space left on device" first when that is why (TensorStore says it late in a
    long message)."""
    reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
    no_space = getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)
    return f"no space left on device; {reason}" if no_space else reason


def _data_args():
    import grain

    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


class TrainCheckpoints:
    def __init__(self, workdir: Path, *, keep: int, every: int, async_save: bool = True,
                 timeout_s: int = SAVE_TIMEOUT_S):
        """`timeout_s`: a save not complete by then fails (`SaveFailed`), so an unreachable store is an error, not
        a hang (TensorStore retries a dead GCS endpoint for many minutes)."""
        # Every `every` steps (and the last, forced): not Orbax's default extra save at a run's first step, a
        # full state write that no schedule asked for. Preemption notices (jax's multi-host sync) still save.
        policy = ocp.checkpoint_managers.AnySavePolicy([ocp.checkpoint_managers.FixedIntervalPolicy(every),
                                                        ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
        # cleanup_tmp_directories: a relaunch deletes what a failed or killed save left (its space, on a full disk)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_decision_policy=policy,
                                               enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=True,
                                               async_options=ocp.AsyncOptions(timeout_secs=timeout_s))
        self.timeout_s = timeout_s
        self.manager = ocp.CheckpointManager(absolute(workdir / CHECKPOINTS_DIR), options=options,
                                             item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None, force: bool = False) -> bool:
        """Starts saving `step` if the policy (or `force`) says so; raises SaveFailed when an earlier save failed
        (Orbax reports a background save's failure at the next call)."""
        save_data, _ = _data_args()
        items = {"state": ocp.args.StandardSave(state)}
        if hasattr(data_iterator, "get_state"):
            items["data"] = save_data(data_iterator)
        with self._reporting():
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    @contextlib.contextmanager
    def _reporting(self) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            reason = error_reason(e)
            if isinstance(e, TimeoutError):
                reason = (f"not done within config.checkpoint_timeout_s={self.timeout_s}: is the store reachable? "
                          f"{reason}")
            raise SaveFailed(f"{self.manager.directory}: saving a checkpoint failed ({reason}); the step "
                             "being saved is not complete, earlier ones are intact and a relaunch resumes from the "
                             "latest") from e

    def restore(self, abstract_state: Any, data_iterator: Any | None) -> tuple[Any, int]:
        """Restores the newest readable step into `abstract_state`'s shardings (any mesh), and the iterator in
        place; returns (state, step).

        A step that fails to read (a truncated or missing file after a crash or disk trouble) is reported and
        the previous one is tried, so a damaged checkpoint never becomes a crash loop; if none reads, the error of
        the newest is raised. A step that reads but holds another model (its arrays' names or shapes differ from
        `abstract_state`'s) is not damaged: that is one ValueError naming the differences, and no fallback.
        """
        _, restore_data = _data_args()
        steps = sorted(self.manager.all_steps(), reverse=True)
        if steps:
            self._check_same_state(steps[0], abstract_state)
        first_error: Exception | None = None
        for step in steps:
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if hasattr(data_iterator, "get_state"):
                items["data"] = restore_data(data_iterator)
            try:
                return self.manager.restore(step, args=ocp.args.Composite(**items))["state"], step
            except Exception as e:  # Orbax/tensorstore raise many types for damaged files
                first_error = first_error or e
                reason = str(e).splitlines()[0][:200]
                warnings.warn(f"checkpoint step {step} in {self.manager.directory} is unreadable "
                              f"({type(e).__name__}: {reason}); falling back to an earlier step", stacklevel=2)
        raise first_error if first_error else FileNotFoundError(f"{self.manager.directory}: no checkpoint steps")

    def _check_same_state(self, step: int, abstract_state: Any) -> None:
        directory = absolute(self.manager.directory) / str(step) / STATE_ITEM
        try:
            tree = ocp.StandardCheckpointer().metadata(directory).item_metadata.tree
        except Exception:  # unreadable metadata: a damaged step, which restore's fallback handles
            return
        saved, want = path_shapes(tree), path_shapes(abstract_state)
        if saved == want:
            return
        differ = [f"{k}: checkpoint {saved[k]}, config {want[k]}" for k in sorted(saved.keys() & want.keys())
                  if saved[k] != want[k]]
        differ += [f"{k}: only in the checkpoint" for k in sorted(saved.keys() - want.keys())]
        differ += [f"{k}: only in the config" for k in sorted(want.keys() - saved.keys())]
        params = [d for d in differ if d.startswith("params/")] or differ
        more = f" (and {len(params) - 4} more)" if len(params) > 4 else ""
        raise ValueError(f"step {step} holds another model: {'; '.join(params[:4])}{more}")

    def wait(self) -> None:
        with self._reporting():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._reporting():  # close() waits again, on the step metadata writes too: they can fail as late
            self.manager.wait_until_finished()
            self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for restoring into another mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
