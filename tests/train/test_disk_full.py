"""A local workdir fills up during a save (a real 4 MiB tmpfs, mounted by the test; skipped where mounting is not
allowed): clipup-train ends with one line naming the path and "no space left on device", and the steps saved
before are complete and loadable."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
import warnings

import pytest

from clipup_jax.checkpoints.format import load_checkpoint
from tests.cli_helpers import xla_flags
from tests.train.test_gcs_workdir import _complete_steps
from tests.train.test_preemption import ROOT, SMALL


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB file system of its own: room for the run's files and about five checkpoints of the tiny model."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_earlier_steps(small_disk):
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "PYTHONUNBUFFERED": "1"}
    workdir = small_disk / "run"
    demo = ROOT / "experiments" / "demo.py"
    run = subprocess.run([sys.executable, "-m", "clipup_jax.cli.train", "--config", str(demo),
                          *SMALL, "--config.total_steps=40", "--config.checkpoint_every=1",
                          "--config.keep_checkpoints=40", "--workdir", str(workdir)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-4000:]
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith(f"clipup-train: error: {workdir}") and "no space left on device" in error, error
    steps = _complete_steps(str(workdir))
    assert steps and max(steps) < 40, steps
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no 'unreadable step, falling back': the latest is whole
        assert load_checkpoint(workdir).metadata["step"] == max(steps)
