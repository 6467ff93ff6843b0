"""Reading a `clipup-train` work directory as a checkpoint: its latest complete step's parameters.

The trainer writes `clipup.json`, `config.json` and `tokenizer/` at the top of the workdir and Orbax
steps under `checkpoints/<step>/state` (params, optimizer state, step, RNG state).
Orbax publishes a step only once every file is written, so the latest listed step
is complete. Only the params subtree is read.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.models.param_tree import nest
from clipup_jax.storage import Path, absolute

CHECKPOINTS_DIR = "checkpoints"
SAVED_CONFIG = "config.json"  # the run's experiment config, as `clipup-eval` reads it back
STATE_ITEM = "state"
ITEMS = (STATE_ITEM, "data")


def is_train_workdir(path: Path) -> bool:
    return (path / CHECKPOINTS_DIR).is_dir()


def read_train_params(path: Path, shapes: Mapping[str, jax.ShapeDtypeStruct]) -> tuple[dict[str, np.ndarray], int]:
    """(flat params as host arrays, step) of the latest complete step."""
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    manager = ocp.CheckpointManager(absolute(path / CHECKPOINTS_DIR), options=options, item_names=ITEMS)
    steps = sorted(manager.all_steps(), reverse=True)
    manager.close()
    if not steps:
        raise CheckpointError(f"{path}: training workdir has no complete checkpoint yet")
    # nnx.State layout: nested modules, each Param a {'value': array}.
    item = {"params": nest({k: {"value": jax.ShapeDtypeStruct(v.shape, v.dtype)} for k, v in shapes.items()})}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    first_error = None
    for step in steps:  # newest first; a damaged step is reported and skipped, as the trainer's resume does
        directory = path / CHECKPOINTS_DIR / str(step) / STATE_ITEM
        try:
            restored = ocp.PyTreeCheckpointer().restore(
                absolute(directory), args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                 partial_restore=True))
        except Exception as e:  # Orbax/tensorstore raise many types for damaged files
            first_error = first_error or CheckpointError(f"{directory}: cannot restore params "
                                                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            warnings.warn(f"{first_error}; trying an earlier step", stacklevel=2)
            continue
        flat = {}
        for name in shapes:
            node = restored["params"]
            for part in name.split("/"):
                node = node[part]
            flat[name] = np.asarray(node["value"])
        return flat, step
    raise first_error
