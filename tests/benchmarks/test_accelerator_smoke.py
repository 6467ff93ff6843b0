"""`benchmarks/accelerator.py --smoke` in-process on CPU: every row is present, measured and correct.

The script is shipped to a GPU/TPU host as is, so it must keep working where it cannot be run daily."""

import json

import numpy as np

from benchmarks import accelerator, inference


def accelerator_models():
    return inference.models(quick=True)


def test_smoke_run_reports_every_row_correct(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert accelerator.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(r["kind"], r["path"]): r for r in report["rows"]}
    assert set(rows) == {("dense", "-")} | {("sparse", p) for p in accelerator.PATHS}
    for (kind, path), row in rows.items():
        if path == "pallas":  # CPU: the Megablox kernel would only run in interpret mode
            assert "TPU-only" in row["skipped"]
            continue
        assert "skipped" not in row, row
        assert row["correct"] and 0 < row["max_feature_err"] <= accelerator.TOLERANCE, row
        assert ("untimed" in row) == (kind == "sparse"), row  # smoke mode times the dense step only
    dense = rows[("dense", "-")]
    assert dense["batch"] == 8 and dense["step_ms"] > 0 and np.isfinite(dense["tflops"]), dense
    assert dense["model_tflop"] == accelerator.model_flops(accelerator.sizes(True, 8).dense, 8) / 1e12
    table = capsys.readouterr().out
    assert table.count("\n| tiny ") == len(rows)
    assert "not judged" in table  # smoke runs never claim an MFU goal
    inference = report["inference"]
    rows = [line for line in inference if line.startswith("| ") and not line.startswith("| model ")]
    assert not any("FAILED" in line for line in inference) and len(rows) == len(accelerator_models()), inference


def test_peak_table_matches_device_kinds():
    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    assert accelerator.peak_flops(Device("NVIDIA H200")) == 989e12
    assert accelerator.peak_flops(Device("NVIDIA A100-SXM4-80GB")) == 312e12
    assert accelerator.peak_flops(Device("TPU v5 lite")) == 197e12
    assert accelerator.peak_flops(Device("TPU v5p")) == 459e12
    assert accelerator.peak_flops(Device("cpu")) is None
