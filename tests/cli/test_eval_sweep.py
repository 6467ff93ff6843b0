"""clipup-eval on a training workdir (its own config, another, or a CLIP_benchmark set by name), and
clipup-sweep's validation and launch commands."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image

from clipup_jax.cli.eval import main as eval_main
from clipup_jax.cli.sweep import main as sweep_main
from clipup_jax.train.recipes import demo_config
from clipup_jax.train.run import run_experiment
from tests.cli_helpers import invoke

EXPERIMENTS = pathlib.Path(__file__).parents[2] / "experiments"


def test_eval_a_training_workdir(tmp_path, capsys):
    config = demo_config()
    config.total_steps, config.batch_size, config.eval_every, config.checkpoint_every = 2, 16, 0, 2
    config.data.synthetic_size = 500
    run_experiment(config, tmp_path / "run")
    code, out, err = invoke(eval_main, ["--checkpoint", tmp_path / "run", "--config", EXPERIMENTS / "demo.py",
                                        "--config.data.eval_size=24", "--out", tmp_path / "m.json"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["step"] == 2 and 0 <= metrics["text_to_image_R@10"] <= 1 and "zero_shot_top1" in metrics
    assert "24 images / 72 captions" in out
    table = out.split("24 images / 72 captions:\n")[1].splitlines()
    shown = {line.split()[0]: float(line.split()[1]) for line in table if line.startswith("  ")}
    assert shown["text_to_image_R@10"] == round(metrics["text_to_image_R@10"], 4)  # the same units as training

    # Without --config the run's own saved config.json names the eval set; --out may name new directories.
    code, out, err = invoke(eval_main, ["--checkpoint", tmp_path / "run", "--config.data.eval_size=24",
                                        "--out", tmp_path / "new" / "dir" / "m.json"], capsys)
    assert code == 0, err
    assert f"evaluating on synthetic:eval (config {tmp_path / 'run' / 'config.json'})" in out
    assert json.loads((tmp_path / "new" / "dir" / "m.json").read_text()) == metrics

    # A CLIP_benchmark set by name: COCO's Karpathy test split as CLIP_benchmark ships it, its result record out.
    coco = tmp_path / "coco"
    (coco / "val2014").mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i in range(3):
        Image.fromarray(rng.randint(0, 256, (40, 30, 3), dtype=np.uint8)).save(coco / "val2014" / f"{i}.jpg")
    (coco / "coco_test_karpathy.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"val2014/{i}.jpg"} for i in range(3)],
        "annotations": [{"image_id": i, "id": 10 * i + j, "caption": f"a {c} shape"}
                        for i, c in enumerate(("red", "blue", "green")) for j in range(5 + i)]}))
    code, out, err = invoke(eval_main, ["--checkpoint", tmp_path / "run", "--task", "retrieval", "--dataset",
                                        "mscoco_captions", "--data-root", coco, "--out", tmp_path / "cb.json"], capsys)
    assert code == 0, err
    assert "3 images / 18 captions" in out and "[eval] 1/1 batches" in out  # 7 captions of the last image kept
    result = json.loads((tmp_path / "cb.json").read_text())
    assert {k: v for k, v in result.items() if k != "metrics"} == {
        "dataset": "mscoco_captions", "model": str(tmp_path / "run"), "pretrained": "step 2",
        "task": "zeroshot_retrieval", "language": "en",
        "preprocessing": {"resize_mode": "shortest", "interpolation": "bicubic", "caption_case": "lower"}}
    assert "images: shortest resize, bicubic; captions lowercased" in out
    assert sorted(result["metrics"]) == sorted(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10))
    assert result["metrics"]["image_retrieval_recall@5"] == 1.0  # 3 images: every caption's image is in the top 5
    assert 0.0 <= result["metrics"]["text_retrieval_recall@1"] <= result["metrics"]["text_retrieval_recall@10"] <= 1.0
    # How the 40x30 images become square is the user's choice, recorded with the result.
    code, out, err = invoke(eval_main, ["--checkpoint", tmp_path / "run", "--task", "retrieval", "--dataset",
                                        "mscoco_captions", "--data-root", coco, "--resize-mode", "squash",
                                        "--out", tmp_path / "squash.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "squash.json").read_text())["preprocessing"]["resize_mode"] == "squash"
    for argv, match in ((["--task", "zeroshot", "--dataset", "mscoco_captions", "--data-root", coco],
                         "is a zeroshot_retrieval set"),
                        (["--resize-mode", "squash"], "--config.data.eval_resize"),
                        (["--config.data.eval_resize=crop"], "resize mode 'crop'"),
                        (["--task", "retrieval", "--dataset", "flickr30k", "--data-root", coco],
                         "flickr30k_test_karpathy.txt"),
                        (["--dataset", "mscoco_captions", "--data-root", coco, "--config", EXPERIMENTS / "demo.py"],
                         "drop --config"),
                        (["--task", "retrieval"], "go with --dataset")):
        code, _, err = invoke(eval_main, ["--checkpoint", tmp_path / "run", *argv], capsys)
        assert code == 2 and match in err, err


def test_sweep_dry_run_and_bad_override(tmp_path, capsys):
    code, out, err = invoke(sweep_main, [EXPERIMENTS / "sweeps" / "clipup_demo_ablations.py",
                                         "--workdir", tmp_path, "--dry-run"], capsys)
    assert code == 0, err
    assert out.count("clipup-train --config") == 10 and "--config.model.shared_backbone=True" in out
    bad = tmp_path / "bad.py"
    bad.write_text(f"BASE = {str(EXPERIMENTS / 'demo.py')!r}\n"
                   "def get_sweep():\n    return [{'name': 'x', 'overrides': ['--config.optim.lrr=1']}]\n")
    code, out, err = invoke(sweep_main, [bad, "--workdir", tmp_path / "w"], capsys)
    assert code == 2 and "optim.lrr" in err and not (tmp_path / "w").exists()
