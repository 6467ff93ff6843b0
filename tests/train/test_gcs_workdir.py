"""A training workdir in a `gs://` bucket, on a real GCS emulator (fake-gcs-server, started on loopback by the
fixture and found by every client through the standard variables): checkpoints, metrics, tokenizer and metadata
all land in the bucket, and a resume from it (after a clean stop, or a `kill -9`) ends bitwise equal to an
uninterrupted local run."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from clipup_jax.checkpoints.format import load_checkpoint
from clipup_jax.checkpoints.train_workdir import CHECKPOINTS_DIR, ITEMS
from clipup_jax.config import ModelConfig, TextConfig, VisionConfig
from clipup_jax.train.recipes import base_config
from clipup_jax.train.run import run_experiment
from tests.cli_helpers import xla_flags
from tests import gcs_emulator
from tests.gcs_emulator import gcs_bucket  # noqa: F401 (the fixture)
from tests.train.test_preemption import ROOT, SMALL, kill_at_step

TINY = ModelConfig(vision=VisionConfig(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64),
                   text=TextConfig(vocab_size=768, context_length=16, width=32, depth=1, heads=2, mlp_dim=64),
                   embed_dim=16)


def _config(steps: int):
    config = base_config(TINY)
    config.data.synthetic_size = 500
    config.batch_size, config.total_steps, config.optim.warmup_steps = 16, steps, 1
    config.log_every, config.eval_every, config.checkpoint_every = 1, 0, 2
    return config


def test_gcs_workdir_resume_equals_an_uninterrupted_local_run(tmp_path, gcs_bucket, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # a gs:// path taken for a local one would appear here as ./gs:
    run_experiment(_config(3), tmp_path / "straight")
    remote = f"{gcs_bucket}/run"
    run_experiment(_config(2), remote)
    history = run_experiment(_config(3), remote)
    assert [h["step"] for h in history["train"]] == [3]  # resumed from the bucket's step 2
    want, got = load_checkpoint(tmp_path / "straight"), load_checkpoint(remote)
    assert got.metadata["step"] == 3
    for name, value in want.params.items():
        np.testing.assert_array_equal(got.params[name], value, err_msg=name)
    run = epath.Path(remote)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3]
    assert {"clipup.json", "config.json", "tokenizer_trained", "checkpoints"} <= {p.name for p in run.iterdir()}
    assert not pathlib.Path("gs:").exists()


def _complete_steps(workdir: str) -> list[int]:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(epath.Path(workdir) / CHECKPOINTS_DIR, options=options, item_names=ITEMS) as manager:
        return list(manager.all_steps())


def test_sigkill_on_a_gcs_workdir_then_relaunch_equals_an_uninterrupted_run(tmp_path, gcs_bucket):  # noqa: F811
    """clipup-train on gs://, saving every step, `kill -9`ed at step 3 or later once a step is complete (the kill
    lands mid-save, or just after one): the relaunch resumes from the bucket's latest complete step and ends
    bitwise where a local run ends."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "PYTHONUNBUFFERED": "1"}  # the emulator's variables included
    base = [sys.executable, "-m", "clipup_jax.cli.train", "--config", str(ROOT / "experiments" / "demo.py"), *SMALL]
    straight = subprocess.Popen([*base, "--config.total_steps=5", "--workdir", str(tmp_path / "straight")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    remote = f"{gcs_bucket}/run"
    try:
        killed_at = kill_at_step([*base, "--config.total_steps=1000", "--config.checkpoint_every=1", "--workdir",
                                  remote], env, 3, ready=lambda: bool(_complete_steps(remote)))
        latest = load_checkpoint(remote).metadata["step"]  # complete, whatever the kill interrupted
        assert 1 <= latest <= int(killed_at.split("[step ")[-1].split("/")[0])
        _relaunch_ends_as_straight(base, env, remote, latest, straight, tmp_path / "straight")
    finally:
        if straight.poll() is None:
            straight.kill()


def _relaunch_ends_as_straight(base: list[str], env: dict, remote: str, latest: int, straight: subprocess.Popen,
                               straight_dir) -> None:
    """The relaunch on `remote` resumes at `latest` and ends at step 5 bitwise where the uninterrupted run
    (`straight`, writing to `straight_dir`) ends."""
    resumed = subprocess.run([*base, "--config.total_steps=5", "--workdir", remote],
                             capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {remote}/checkpoints at step {latest} (" in resumed.stdout
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out
    want, got = load_checkpoint(straight_dir), load_checkpoint(remote)
    assert got.metadata["step"] == want.metadata["step"] == 5
    for name in want.params:
        np.testing.assert_array_equal(got.params[name], want.params[name], err_msg=name)


def test_the_store_lost_mid_save_fails_the_run_and_a_relaunch_resumes_bitwise(tmp_path, gcs_bucket):  # noqa: F811
    """The emulator is killed (`kill -9`) while clipup-train saves every step on gs://: the run fails with one
    line naming the path, within its checkpoint timeout plus the clients' retries, instead of hanging; the step
    being saved never appears complete; with the emulator back (same objects), the relaunch resumes from the
    latest complete step and ends bitwise where an uninterrupted local run ends."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "clipup_jax.cli.train", "--config", str(ROOT / "experiments" / "demo.py"), *SMALL]
    straight = subprocess.Popen([*base, "--config.total_steps=5", "--workdir", str(tmp_path / "straight")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    remote = f"{gcs_bucket}/run"
    proc = subprocess.Popen([*base, "--config.total_steps=1000", "--config.checkpoint_every=1",
                             "--config.checkpoint_timeout_s=5", "--workdir", remote],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen, lost = [], None
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("[step ") and int(line[6:line.index("/")]) >= 3 and _complete_steps(remote):
                gcs_emulator.kill()
                lost = time.monotonic()
                break
        seen += proc.communicate(timeout=300)[0]
        failed_after = time.monotonic() - lost
    finally:
        if lost is not None:
            gcs_emulator.restart()
        if proc.poll() is None:
            proc.kill()
    output = "".join(seen)
    assert proc.returncode == 2, output
    errors = [line for line in output.splitlines() if line.startswith("clipup-train: error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"clipup-train: error: {remote}") and " failed (" in errors[0]
    print(f"failed {failed_after:.1f}s after the store was lost: {errors[0]}")  # pytest -rP shows it
    assert failed_after < 120, failed_after  # the checkpoint timeout, then the clients' retries (~30 s)
    latest = load_checkpoint(remote).metadata["step"]
    assert latest in _complete_steps(remote) and max(_complete_steps(remote)) == latest
    try:
        _relaunch_ends_as_straight(base, env, remote, latest, straight, tmp_path / "straight")
    finally:
        if straight.poll() is None:
            straight.kill()
