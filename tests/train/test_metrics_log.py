"""MetricsLog: one JSONL file across resumed runs; each run's history is read back from disk, not kept in memory."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from etils import epath
from tensorboard.backend.event_processing import event_accumulator

from clipup_jax.train.metrics_log import MetricsLog
from tests.gcs_emulator import gcs_bucket  # noqa: F401 (the fixture)


def _run(workdir, steps, eval_at=()):
    log = MetricsLog(workdir, total_steps=10, stream=io.StringIO())
    for step in steps:
        log.write(step, {"loss": 1.0 / step, "lr": 0.1})
        if step in eval_at:
            log.write(step, {"eval/text_to_image_R@1": step / 10})
    log.close()
    return log.this_run()


def test_each_run_reads_back_only_its_own_records(tmp_path):
    first = _run(tmp_path, [1, 2, 3], eval_at=[2])
    # A relaunch after a kill repeats steps 3.. (the last save was step 2): only its own lines come back.
    second = _run(tmp_path, [3, 4, 5], eval_at=[4])
    assert [r["step"] for r in first["train"]] == [1, 2, 3]
    assert first["eval"] == [{"step": 2, "text_to_image_R@1": 0.2}]
    assert [r["step"] for r in second["train"]] == [3, 4, 5]
    assert second["train"][0] == {"step": 3, "loss": 1 / 3, "lr": 0.1}
    assert second["eval"] == [{"step": 4, "text_to_image_R@1": 0.4}]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 8  # the file keeps every run's records


def test_non_finite_values_survive_the_round_trip(tmp_path):
    log = MetricsLog(tmp_path, total_steps=2, stream=io.StringIO())
    log.write(1, {"loss": float("nan"), "grad_norm": float("inf")})
    history = log.this_run()  # readable while the log is open (flushed first)
    log.close()
    assert math.isnan(history["train"][0]["loss"]) and history["train"][0]["grad_norm"] == math.inf


def test_disabled_log_has_no_history(tmp_path):
    log = MetricsLog(tmp_path, total_steps=2, enabled=False, stream=io.StringIO())
    log.write(1, {"loss": 1.0})
    assert log.this_run() == {"train": [], "eval": []}
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("store", ["local", "gs"])
def test_tensorboard_reads_every_run_and_flush(tmp_path, store, request):
    """TensorBoard sees every logged step of two runs, each flushed twice, on local disk and on a bucket (where
    tensorboard's own writer, appending through gcsfs, kept only the last record)."""
    workdir = tmp_path / "run" if store == "local" else epath.Path(request.getfixturevalue("gcs_bucket")) / "run"
    for steps in ([1, 2, 3, 4], [5, 6]):
        log = MetricsLog(workdir, total_steps=6, stream=io.StringIO())
        for step in steps:
            log.write(step, {"loss": 1.0 / step})
            if step % 2 == 0:
                log.flush()
        log.close()
    local = tmp_path / "tb"  # TensorBoard's loader reads local files: the store's objects, names kept
    local.mkdir()
    for part in (workdir / "tb").iterdir():
        (local / part.name).write_bytes(part.read_bytes())
    tb = event_accumulator.EventAccumulator(str(local))
    tb.Reload()
    assert [(e.step, e.value) for e in tb.Scalars("loss")] == [(s, np.float32(1.0 / s)) for s in range(1, 7)]
