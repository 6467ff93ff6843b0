"""SIGTERM (what a preempted pod VM or SLURM sends) saves the current step and exits cleanly; a relaunch resumes."""

from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from typing import Callable

import numpy as np

from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.checkpoints.format import load_checkpoint
from tests.cli_helpers import xla_flags

ROOT = pathlib.Path(__file__).parents[2]
ARGS = ["--config", str(ROOT / "experiments" / "demo.py"), "--config.total_steps=400", "--config.batch_size=16",
        "--config.checkpoint_every=1000", "--config.eval_every=0", "--config.log_every=1",
        "--config.data.synthetic_size=1000"]


def test_sigterm_saves_and_resume_finishes(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "clipup_jax.cli.train", *ARGS, "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    try:
        deadline = time.time() + 900  # hang guards: generous, a loaded machine is several times slower
        for line in proc.stdout:  # wait until training is under way, past the compile
            seen.append(line)
            if line.startswith("[step 5/"):
                proc.send_signal(signal.SIGTERM)
                break
            assert time.time() < deadline, "".join(seen[-20:])
        rest, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(seen) + rest
    assert proc.returncode == 0, output
    assert "SIGTERM: saved step" in output
    saved = load_checkpoint(workdir).metadata["step"]
    assert 5 <= saved < 400  # not the end: the save came from the signal, not the schedule
    resumed = subprocess.run([*cmd[:-2], "--workdir", str(workdir), "--config.total_steps=" + str(saved + 2)],
                             capture_output=True, text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {workdir / 'checkpoints'} at step {saved}" in resumed.stdout
    assert load_checkpoint(workdir).metadata["step"] == saved + 2


SMALL = ["--config.model.vision.width=32", "--config.model.vision.mlp_dim=64", "--config.model.vision.heads=2",
         "--config.model.vision.depth=1", "--config.model.text.width=32", "--config.model.text.mlp_dim=64",
         "--config.model.text.heads=2", "--config.model.text.depth=1", "--config.model.embed_dim=16",
         "--config.batch_size=16", "--config.eval_every=0", "--config.log_every=1", "--config.checkpoint_every=3",
         "--config.data.synthetic_size=1000", "--config.optim.warmup_steps=2",
         "--config.optim.schedule=constant"]  # killed launches run with a larger total_steps: same LRs


def kill_at_step(cmd: list[str], env: dict[str, str], step: int, ready: Callable[[], bool] = lambda: True) -> str:
    """Runs `cmd` (a clipup-train) until it prints the progress line of step `step`, or of the first later step at
    which `ready()` holds, then `kill -9`s it; its output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[step ") and int(line[6:line.index("/")]) >= step and ready():
                proc.kill()
                break
        seen += proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(seen)
    assert proc.returncode == -signal.SIGKILL, output
    return output


def test_repeated_sigkill_then_relaunch_equals_an_uninterrupted_run(tmp_path):
    """kill -9 three times, at steps drawn from a seeded RNG, relaunching each time: every relaunch resumes from
    the latest complete checkpoint, and the run ends bitwise where an uninterrupted one ends (params, optimizer
    state and data stream position all came back each time)."""
    # One compile for five launches: they share JAX's persistent compilation cache (the same program each time).
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "PYTHONUNBUFFERED": "1",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    base = [sys.executable, "-m", "clipup_jax.cli.train", "--config", str(ROOT / "experiments" / "demo.py"), *SMALL]
    total, workdir = 14, tmp_path / "killed"
    straight = subprocess.Popen([*base, f"--config.total_steps={total}", "--workdir", str(tmp_path / "straight")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    rng = random.Random(0)
    latest = None
    try:
        for _ in range(3):
            # Kill 1-4 steps past the resume point, saving every step: the kill lands during a save (Orbax commits
            # a step asynchronously, while the next one runs), so the latest complete step is one before, or earlier.
            target = (latest or 0) + rng.randint(1, 4)
            output = kill_at_step([*base, "--config.total_steps=1000", "--config.checkpoint_every=1",
                                   "--workdir", str(workdir)], env, target)
            if latest is not None:
                assert f"resumed from {workdir / 'checkpoints'} at step {latest} (" in output, output
            else:
                assert "resumed from" not in output, output
            try:
                ckpt = load_checkpoint(workdir)  # complete, whatever the kill interrupted
            except CheckpointError:  # killed before the first save was complete: the relaunch starts over
                assert latest is None
                continue
            latest = ckpt.metadata["step"]
            print(f"killed at step {target}: latest complete checkpoint step {latest}")  # pytest -rP shows them
            assert latest <= target and all(np.isfinite(v).all() for v in ckpt.params.values())
        assert latest is not None, "no kill left a complete checkpoint: the relaunches resumed nothing"
        resumed = subprocess.run([*base, f"--config.total_steps={total}", "--workdir", str(workdir)],
                                 capture_output=True, text=True, env=env, timeout=900)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"resumed from {workdir / 'checkpoints'} at step {latest} (" in resumed.stdout
        out, _ = straight.communicate(timeout=900)
        assert straight.returncode == 0, out
    finally:
        if straight.poll() is None:
            straight.kill()
    want, got = load_checkpoint(tmp_path / "straight"), load_checkpoint(workdir)
    assert got.metadata["step"] == want.metadata["step"] == total
    for name in want.params:
        assert (got.params[name] == want.params[name]).all(), name
