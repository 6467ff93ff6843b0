"""A training workdir in a `gs://` bucket, on a real GCS emulator (fake-gcs-server, started on loopback by the
fixture and found by every client through the standard variables): checkpoints, metrics, tokenizer and metadata
all land in the bucket, and a resume from it ends bitwise equal to an uninterrupted local run."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from etils import epath

from clipup_jax.checkpoints.format import load_checkpoint
from clipup_jax.config import ModelConfig, TextConfig, VisionConfig
from clipup_jax.train.recipes import base_config
from clipup_jax.train.run import run_experiment
from tests.gcs_emulator import gcs_bucket  # noqa: F401 (the fixture)

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
