"""SIGTERM (what a preempted pod VM or SLURM sends) saves the current step and exits cleanly; a relaunch resumes."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

from clipup_jax.checkpoints.format import load_checkpoint

ROOT = pathlib.Path(__file__).parents[2]
ARGS = ["--config", str(ROOT / "experiments" / "demo.py"), "--config.total_steps=400", "--config.batch_size=16",
        "--config.checkpoint_every=1000", "--config.eval_every=0", "--config.log_every=1",
        "--config.data.synthetic_size=1000"]


def test_sigterm_saves_and_resume_finishes(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "clipup_jax.cli.train", *ARGS, "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    try:
        deadline = time.time() + 240
        for line in proc.stdout:  # wait until training is under way, past the compile
            seen.append(line)
            if line.startswith("[step 5/"):
                proc.send_signal(signal.SIGTERM)
                break
            assert time.time() < deadline, "".join(seen[-20:])
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(seen) + rest
    assert proc.returncode == 0, output
    assert "SIGTERM: saved step" in output
    saved = load_checkpoint(workdir).metadata["step"]
    assert 5 <= saved < 400  # not the end: the save came from the signal, not the schedule
    resumed = subprocess.run([*cmd[:-2], "--workdir", str(workdir), "--config.total_steps=" + str(saved + 2)],
                             capture_output=True, text=True, env=env, timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {workdir / 'checkpoints'} at step {saved}" in resumed.stdout
    assert load_checkpoint(workdir).metadata["step"] == saved + 2


SMALL = ["--config.model.vision.width=32", "--config.model.vision.mlp_dim=64", "--config.model.vision.heads=2",
         "--config.model.vision.depth=2", "--config.model.text.width=32", "--config.model.text.mlp_dim=64",
         "--config.model.text.heads=2", "--config.model.text.depth=2", "--config.model.embed_dim=16",
         "--config.batch_size=16", "--config.eval_every=0", "--config.log_every=1", "--config.checkpoint_every=4",
         "--config.data.synthetic_size=1000", "--config.optim.warmup_steps=2"]


def test_sigkill_then_relaunch_equals_an_uninterrupted_run(tmp_path):
    """A kill -9 mid-run loses only the steps since the last save; relaunching ends bitwise where an
    uninterrupted run ends (params, optimizer state and data position all came back)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "clipup_jax.cli.train", "--config", str(ROOT / "experiments" / "demo.py"), *SMALL,
            "--config.total_steps=10"]
    straight = subprocess.run([*base, "--workdir", str(tmp_path / "straight")], capture_output=True, text=True,
                              env=env, timeout=240)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    proc = subprocess.Popen([*base, "--config.total_steps=1000", "--workdir", str(tmp_path / "killed")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("[step 7/"):  # past the step-4 save, before the step-8 one
                proc.kill()
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Saves are asynchronous: the step-4 save may still have been in flight when the kill came, in which case
    # the latest complete checkpoint is the first one. Either way it is complete and loads.
    assert load_checkpoint(tmp_path / "killed").metadata["step"] in (1, 4)
    resumed = subprocess.run([*base, "--workdir", str(tmp_path / "killed")], capture_output=True, text=True,
                             env=env, timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    want, got = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "killed")
    assert got.metadata["step"] == want.metadata["step"] == 10
    for name in want.params:
        assert (got.params[name] == want.params[name]).all(), name
