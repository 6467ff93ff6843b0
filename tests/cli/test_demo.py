"""The README's main command, at a few steps: every stage runs and the outputs a person looks at exist."""

import json

from clipup_jax.cli.demo import main as demo
from tests.cli_helpers import invoke


def test_demo_end_to_end(tmp_path, capsys):
    code, out, err = invoke(demo, ["--workdir", tmp_path / "demo", "--pretrain-steps", "8", "--arm-steps", "6"], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results) == {"parent (dense)", "dense (+6 steps)", "clip-up (+6 steps)"}
    sparse, dense = results["clip-up (+6 steps)"], results["dense (+6 steps)"]
    assert sparse["total_params"] > sparse["active_params"] > dense["active_params"] == dense["total_params"]
    assert 0.0 <= sparse["eval"]["text_to_image_R@1"] <= 1.0
    assert (tmp_path / "demo" / "results.png").stat().st_size > 10_000
    assert "T->I R@1" in out and "wins here" in out
    code, out, err = invoke(demo, ["--workdir", tmp_path / "demo"], capsys)
    assert code == 2 and "--force" in err  # never clobbers a previous run silently
