"""Training checkpoints: an Orbax CheckpointManager over the train state and the data iterator.

    WORKDIR/
      clipup.json, tokenizer/    the model config and tokenizer (as in a converted checkpoint)
      checkpoints/<step>/state   params, optimizer state, step (Orbax; any mesh can restore it)
      checkpoints/<step>/data    the grain iterator position, one file per process

Saves are asynchronous; Orbax commits a step only when every file is written, so
a kill mid-save leaves the previous step as the latest complete one.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from clipup_jax.checkpoints.train_workdir import CHECKPOINTS_DIR, ITEMS, STATE_ITEM
from clipup_jax.models.param_tree import path_shapes
from clipup_jax.storage import Path, absolute

def _data_args():
    import grain

    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


class TrainCheckpoints:
    def __init__(self, workdir: Path, *, keep: int, every: int, async_save: bool = True):
        # Every `every` steps (and the last, forced): not Orbax's default extra save at a run's first step, a
        # full state write that no schedule asked for. Preemption notices (jax's multi-host sync) still save.
        policy = ocp.checkpoint_managers.AnySavePolicy([ocp.checkpoint_managers.FixedIntervalPolicy(every),
                                                        ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_decision_policy=policy,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(absolute(workdir / CHECKPOINTS_DIR), options=options,
                                             item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None, force: bool = False) -> bool:
        save_data, _ = _data_args()
        items = {"state": ocp.args.StandardSave(state)}
        if hasattr(data_iterator, "get_state"):
            items["data"] = save_data(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for restoring into another mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
