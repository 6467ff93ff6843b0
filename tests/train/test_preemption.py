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
