"""clipup-sweep --seeds --report on a real (tiny) sweep: every (arm, seed) trains, a failing arm is listed rather
than dropped, the report's numbers are the runs' own, a rerun skips finished runs and writes the same report."""

from __future__ import annotations

import json
import textwrap

import pytest

from clipup_jax.cli.sweep import main as sweep_main
from tests.cli_helpers import invoke

CONFIG = textwrap.dedent('''
    from clipup_jax.config import ModelConfig, TextConfig, VisionConfig
    from clipup_jax.train.recipes import base_config

    def get_config():
        model = ModelConfig(vision=VisionConfig(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64),
                            text=TextConfig(vocab_size=768, context_length=16, width=32, depth=1, heads=2,
                                            mlp_dim=64), embed_dim=16)
        config = base_config(model)
        config.data.synthetic_size, config.data.eval_size = 256, 32
        config.batch_size, config.total_steps, config.eval_every, config.checkpoint_every = 16, 3, 3, 3
        config.eval_batch_size, config.log_every, config.optim.warmup_steps = 32, 1, 1
        return config
    ''')


def _sweep_file(tmp_path, arms: str):
    (tmp_path / "tiny.py").write_text(CONFIG)
    path = tmp_path / "sweep.py"
    path.write_text(f"BASE = 'tiny.py'\nBASELINE = 'base'\n\ndef get_sweep():\n    return {arms}\n")
    return path


def test_seeds_report_and_resume(tmp_path, capsys):
    sweep = _sweep_file(tmp_path, "[{'name': 'base', 'overrides': []}, "
                                  "{'name': 'hot', 'overrides': ['--config.optim.lr=3e-3']}, "
                                  "{'name': 'broken', 'overrides': ['--config.optim.lr=1e30']}]")
    workdir = tmp_path / "w"
    code, out, err = invoke(sweep_main, [sweep, "--workdir", workdir, "--seeds", "2", "--report"], capsys)
    assert code == 0, err
    assert "[6/6] broken seed 1 (ETA " in out and "FAILED" in out and "[1/6] base seed 0: " in out
    report = json.loads((workdir / "report.json").read_text())
    assert report["baseline"] == "base" and "Student t" in report["interval"]
    runs = {(r["arm"], r["seed"]): r for r in report["runs"]}
    assert set(runs) == {(a, s) for a in ("base", "hot", "broken") for s in (0, 1)}
    assert sorted((r["arm"], r["seed"]) for r in report["not_finished"]) == [("broken", 0), ("broken", 1)]
    for arm in ("base", "hot"):
        row = report["arms"][arm]
        assert row["seeds_finished"] == [0, 1] and row["train_flops"] > 0 and row["train_time_s"] > 0
        r1 = row["metrics"]["text_to_image_R@1"]
        assert r1["mean"] == pytest.approx((runs[arm, 0]["text_to_image_R@1"] + runs[arm, 1]["text_to_image_R@1"]) / 2)
        assert r1["n"] == 2 and r1["low"] <= r1["mean"] <= r1["high"]
    assert report["arms"]["broken"]["seeds_finished"] == [] and "metrics" not in report["arms"]["broken"]
    diff = report["differences"]["hot - base"]
    assert diff["seeds"] == [0, 1]
    want = sum(runs["hot", s]["image_to_text_R@1"] - runs["base", s]["image_to_text_R@1"] for s in (0, 1)) / 2
    assert diff["metrics"]["image_to_text_R@1"]["mean"] == pytest.approx(want)
    assert report["differences"]["broken - base"]["seeds"] == []
    md = (workdir / "report.md").read_text()
    assert "| base | 2/2 |" in md and "| hot | 2/2 |" in md and "| broken | 0/2 |" in md
    assert "`broken` seed 0: unfinished at step" in md
    assert (workdir / "report.png").stat().st_size > 10_000

    code, out, err = invoke(sweep_main, [sweep, "--workdir", workdir, "--seeds", "2", "--report"], capsys)
    assert code == 0, err
    assert out.count("finished earlier") == 4  # only the broken arm trains again
    assert (workdir / "report.md").read_text() == md  # the same runs give the same report


def test_arms_from_a_parent(tmp_path, capsys):
    """A parent arm runs once; arms `from` it start from its checkpoint (model and tokenizer), with their own
    config file and seeds; the report compares them with the baseline, never with the parent."""
    sparse = CONFIG.replace("config = base_config(model)", "config = base_config(sparse(model, PLAN))").replace(
        "from clipup_jax.train.recipes import base_config",
        "from clipup_jax.train.recipes import DEMO_PLAN as PLAN, base_config, sparse")
    (tmp_path / "tiny_sparse.py").write_text(sparse)
    sweep = _sweep_file(tmp_path, "[{'name': 'parent', 'overrides': []}, "
                                  "{'name': 'base', 'overrides': [], 'from': 'parent'}, "
                                  "{'name': 'up', 'config': 'tiny_sparse.py', 'overrides': [], 'from': 'parent'}]")
    workdir = tmp_path / "w"
    code, out, err = invoke(sweep_main, [sweep, "--workdir", workdir, "--seeds", "2", "--report"], capsys)
    assert code == 0, err
    assert "[5/5] up seed 1" in out and "tiny_sparse.py" in out
    report = json.loads((workdir / "report.json").read_text())
    assert sorted((r["arm"], r["seed"]) for r in report["runs"] if r["state"] == "finished") == [
        ("base", 0), ("base", 1), ("parent", 0), ("up", 0), ("up", 1)]
    assert list(report["differences"]) == ["up - base"]
    for arm in ("base", "up"):
        saved = json.loads((workdir / arm / "seed_1" / "config.json").read_text())
        assert saved["init"]["checkpoint"] == str(workdir / "parent" / "seed_0")
        assert saved["data"]["tokenizer"] == ""  # the parent's, read from its checkpoint
        assert not (workdir / arm / "seed_1" / "tokenizer_trained").exists()
    assert json.loads((workdir / "up" / "seed_0" / "config.json").read_text())["model"]["vision"]["moe"]


def test_arms_on_different_eval_sets_are_refused_before_training(tmp_path, capsys):
    sweep = _sweep_file(tmp_path, "[{'name': 'base', 'overrides': []}, "
                                  "{'name': 'other', 'overrides': ['--config.data.eval_size=16']}]")
    code, out, err = invoke(sweep_main, [sweep, "--workdir", tmp_path / "w", "--report"], capsys)
    assert code == 2 and "different eval sets" in err and "'other'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()
    code, out, err = invoke(sweep_main, [sweep, "--workdir", tmp_path / "w", "--seeds", "0"], capsys)
    assert code == 2 and "--seeds 0" in err and not (tmp_path / "w").exists()
