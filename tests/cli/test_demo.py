"""The README's main command, at a few steps and two seeds: every stage runs and the outputs a person looks at
exist and agree with each other."""

import json

import pytest

from clipup_jax.cli.demo import main as demo
from tests.cli_helpers import invoke


def test_demo_end_to_end(tmp_path, capsys):
    argv = ["--workdir", tmp_path / "demo", "--pretrain-steps", "8", "--arm-steps", "4", "--seeds", "2", "--seed", "3",
            "--eval-size", "48"]
    code, out, err = invoke(demo, argv, capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["world"] == "catalogue" and results["species"] == 1024  # the demo's own world, by default
    parent = results["parent"]  # evaluated as it trained, and tested for a plateau
    assert [e["step"] for e in parent["curve"]] == [2, 4, 6, 8] and parent["last_steps"] == 2
    last, before = (e["text_to_image_R@1"] for e in parent["curve"][:-3:-1])
    assert parent["last_gain"] == pytest.approx(last - before)
    assert parent["plateaued"] == (100 * parent["last_gain"] < 1.0)
    assert "parent held-out T->I R@1 by step: 2: " in out
    arms = results["arms"]
    assert list(arms) == ["parent", "dense", "dense-equal-flops", "clip-up"]
    sparse, dense, equal = arms["clip-up"], arms["dense"], arms["dense-equal-flops"]
    assert sparse["total_params"] > sparse["active_params"] > dense["active_params"] == dense["total_params"]
    assert sparse["steps"] == dense["steps"] == 4 < equal["steps"]  # more dense steps for the same FLOPs
    assert abs(equal["train_flops"] - sparse["train_flops"]) <= dense["train_flops"] / 4 / 2  # within half a step
    runs = results["runs"]
    assert sorted((r["arm"], r["seed"]) for r in runs) == sorted(
        [("parent", 3)] + [(arm, s) for arm in ("dense", "dense-equal-flops", "clip-up") for s in (4, 5)])
    for r in runs:
        assert {"arm", "seed", "steps", "train_flops", "text_to_image_R@1", "image_to_text_R@1"} <= set(r)
        assert 0.0 <= r["text_to_image_R@1"] <= 1.0
    key = "text_to_image_R@1"
    by_seed = {(r["arm"], r["seed"]): r[key] for r in runs}
    diffs = [by_seed["clip-up", s] - by_seed["dense", s] for s in (4, 5)]
    d = results["differences"]["clip-up - dense"]
    assert d["seeds"] == [4, 5] and set(results["differences"]) == {"clip-up - dense", "clip-up - dense-equal-flops"}
    d = d["metrics"][key]
    assert d["n"] == 2 and d["mean"] == pytest.approx(sum(diffs) / 2)
    assert d["low"] <= d["mean"] <= d["high"]
    assert sparse["metrics"][key]["mean"] == pytest.approx((by_seed["clip-up", 4] + by_seed["clip-up", 5]) / 2)
    assert all(r["state"] == "finished" for r in runs) and not results["not_finished"]
    assert "Student t" in results["interval"]
    assert (tmp_path / "demo" / "results.png").stat().st_size > 10_000
    assert "T->I R@1" in out and "clip-up - dense" in out and ("interval" in out)
    code, out, err = invoke(demo, ["--workdir", tmp_path / "demo"], capsys)
    assert code == 2 and "--force" in err  # never clobbers a previous run silently
