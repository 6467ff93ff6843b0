"""Bad input to clipup-train, clipup-eval, clipup-sweep and clipup-demo: one line naming the culprit, a non-zero
exit, nothing written, and all of it before any compile (no case trains)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from clipup_jax.checkpoints.format import save_checkpoint
from clipup_jax.cli.demo import main as demo_main
from clipup_jax.cli.eval import main as eval_main
from clipup_jax.cli.sweep import main as sweep_main
from clipup_jax.cli.train import main as train_main
from clipup_jax.models.param_tree import abstract_params
from clipup_jax.train.recipes import DEMO_MODEL, DEMO_PLAN, sparse
from tests.cli_helpers import invoke

EXPERIMENTS = pathlib.Path(__file__).parents[2] / "experiments"
DENSE, SPARSE = str(EXPERIMENTS / "demo.py"), str(EXPERIMENTS / "clipup_demo.py")


def _sweep(base: str, arms: str) -> str:
    return f"BASE = {base!r}\ndef get_sweep():\n    return {arms}\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("inputs")
    cfg = sparse(DEMO_MODEL, DEMO_PLAN)  # what experiments/clipup_demo.py trains
    zeros = {k: np.zeros(v.shape, np.float32) for k, v in abstract_params(cfg).items()}
    save_checkpoint(root / "sparse_ckpt", cfg, zeros, source={"format": "test"})
    dense = {k: np.zeros(v.shape, np.float32) for k, v in abstract_params(DEMO_MODEL).items()}
    save_checkpoint(root / "dense_ckpt", DEMO_MODEL, dense, source={"format": "test"})
    (root / "no_get_config.py").write_text("X = 1\n")
    (root / "broken.py").write_text("raise RuntimeError('boom in the config file')\n")
    (root / "not_a_ckpt").mkdir()
    (root / "not_a_ckpt" / "notes.txt").write_text("not a checkpoint")
    (root / "a_file").write_text("a file, not a directory")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "keep.txt").write_text("precious")
    one_arm = "[{'name': 'x', 'overrides': %s}]"
    (root / "sweep_bad_override.py").write_text(_sweep(DENSE, one_arm % "['--config.optim.lrr=1']"))
    (root / "sweep_bad_mesh.py").write_text(_sweep(DENSE, one_arm % "['--config.mesh.data=3']"))
    (root / "sweep_no_base.py").write_text("def get_sweep():\n    return []\n")
    (root / "sweep_broken.py").write_text(_sweep(DENSE, "1 / 0"))
    (root / "sweep_duplicate.py").write_text(_sweep(DENSE, "[{'name': 'a', 'overrides': []}] * 2"))
    (root / "sweep_missing_base.py").write_text(_sweep("missing_base.py", one_arm % "[]"))
    (root / "sweep_not_a_list.py").write_text(_sweep(DENSE, "{'name': 'x'}"))
    (root / "sweep_from_later.py").write_text(_sweep(DENSE, "[{'name': 'a', 'overrides': [], 'from': 'b'}, "
                                                            "{'name': 'b', 'overrides': []}]"))
    (root / "sweep_unknown_key.py").write_text(_sweep(DENSE, "[{'name': 'a', 'overrides': [], 'seeds': 1}]"))
    (root / "sweep_parent_baseline.py").write_text(_sweep(DENSE, "[{'name': 'p', 'overrides': []}, "
                                                                 "{'name': 'a', 'overrides': [], 'from': 'p'}]"))
    return root


TRAIN = ["--config", DENSE, "--workdir", "{out}"]
TRAIN_SPARSE = ["--config", SPARSE, "--workdir", "{out}"]
EVAL = ["--checkpoint", "{sparse_ckpt}", "--config", DENSE, "--out", "{out}.json"]
CASES = [
    # (id, CLI, argv: {name} = a file of the fixture, {out} = where output would go; the culprit the error names)
    ("train-typo", train_main, [*TRAIN, "--config.optim.lrr=1"], "optim.lrr"),
    ("train-wrong-type", train_main, [*TRAIN, "--config.total_steps=many"], "total_steps is int, got str"),
    ("train-float-for-int", train_main, [*TRAIN, "--config.batch_size=1.5"], "batch_size is int, got float"),
    ("train-no-equals", train_main, [*TRAIN, "--config.optim.lr"], "--config.optim.lr"),
    ("train-unknown-loss", train_main, [*TRAIN, "--config.loss=clipp"], "'clipp'"),
    ("train-unknown-loss-impl", train_main, [*TRAIN, "--config.loss_impl=ring"], "'ring'"),
    ("train-unknown-nonfinite", train_main, [*TRAIN, "--config.nonfinite=ignore"], "config.nonfinite='ignore'"),
    ("train-negative-skips", train_main, [*TRAIN, "--config.max_nonfinite_skips=-1"], "max_nonfinite_skips=-1"),
    ("train-compute-dtype", train_main, [*TRAIN, "--config.compute_dtype=fp8"], "compute_dtype='fp8'"),
    ("train-schedule", train_main, [*TRAIN, "--config.optim.schedule=linear"], "'linear'"),
    ("train-log-every-zero", train_main, [*TRAIN, "--config.log_every=0"], "config.log_every=0"),
    ("train-mesh-device-count", train_main, [*TRAIN, "--config.mesh.data=3"], "8 are available"),
    ("train-mesh-rest", train_main, [*TRAIN, "--config.mesh.fsdp=3"], "'data' (-1) cannot take the rest"),
    ("train-batch-vs-mesh", train_main, [*TRAIN, "--config.batch_size=60"], "batch_size=60"),
    # Neither 3 % 2 nor 2 % 3: 4 experts on expert=8 (each on 2 devices) trains, and the planner agrees.
    ("train-experts-vs-axis", train_main, [*TRAIN_SPARSE, "--config.model.vision.moe.num_experts=3",
                                           "--config.model.text.moe.num_experts=3", "--config.mesh.expert=2"],
     "num_experts=3 is incompatible with the 'expert' mesh axis of size 2"),
    ("train-model-typo", train_main, [*TRAIN, "--config.model.vision.widht=3"], "vision.widht"),
    ("train-model-shape", train_main, [*TRAIN, "--config.model.vision.patch_size=5"], "patch_size=5"),
    ("train-top-k", train_main, [*TRAIN_SPARSE, "--config.model.text.moe.top_k=9"], "top_k=9"),
    ("train-missing-config", train_main, ["--config", "{not_a_ckpt}/exp.py", "--workdir", "{out}"], "exp.py"),
    ("train-no-get-config", train_main, ["--config", "{no_get_config.py}", "--workdir", "{out}"], "get_config"),
    ("train-broken-config", train_main, ["--config", "{broken.py}", "--workdir", "{out}"], "boom in the config"),
    ("train-init-missing", train_main, [*TRAIN, "--config.init.checkpoint={not_a_ckpt}/gone"], "gone"),
    ("train-init-not-a-checkpoint", train_main, [*TRAIN, "--config.init.checkpoint={not_a_ckpt}"], "clipup.json"),
    # The checkpoint gives the model: a --config.model.* override it contradicts names both values.
    ("train-init-other-plan", train_main, [*TRAIN_SPARSE, "--config.model.vision.moe.num_experts=2",
                                           "--config.init.checkpoint={sparse_ckpt}"],
     "these overrides contradict it (override -> checkpoint): model.vision.moe.num_experts: 2 -> 8"),
    ("train-init-dense-other-dims", train_main, [*TRAIN_SPARSE, "--config.model.embed_dim=32",
                                                 "--config.model.text.depth=2", "--config.init.checkpoint={dense_ckpt}"],
     "model.embed_dim: 32 -> 64; model.text.depth: 2 -> 4"),
    ("train-missing-tokenizer", train_main, [*TRAIN, "--config.data.tokenizer={not_a_ckpt}/bpe.txt.gz"],
     "bpe.txt.gz"),
    ("train-workdir-is-a-file", train_main, ["--config", DENSE, "--workdir", "{a_file}"], "not a directory"),
    ("train-no-workdir", train_main, ["--config", DENSE], "--workdir"),
    ("eval-not-a-checkpoint", eval_main, ["--checkpoint", "{not_a_ckpt}", "--config", DENSE], "clipup.json"),
    ("eval-missing-checkpoint", eval_main, ["--checkpoint", "{not_a_ckpt}/gone", "--config", DENSE], "gone"),
    ("eval-typo", eval_main, [*EVAL, "--config.data.evall=x"], "data.evall"),
    ("eval-no-tokenizer", eval_main, EVAL, "has no tokenizer"),
    ("eval-no-saved-config", eval_main, ["--checkpoint", "{sparse_ckpt}"],
     "not a training workdir with a saved config.json"),
    ("eval-tokenizer-missing", eval_main, [*EVAL, "--tokenizer", "{not_a_ckpt}/tok"], "tok: no such file"),
    ("eval-missing-config", eval_main, ["--checkpoint", "{sparse_ckpt}", "--config", "{a_file}.py"], "a_file.py"),
    ("sweep-missing", sweep_main, ["{not_a_ckpt}/sweep.py", "--workdir", "{out}"], "sweep.py"),
    ("sweep-bad-override", sweep_main, ["{sweep_bad_override.py}", "--workdir", "{out}"], "optim.lrr"),
    ("sweep-bad-mesh", sweep_main, ["{sweep_bad_mesh.py}", "--workdir", "{out}"], "arm 'x': mesh"),
    ("sweep-no-base", sweep_main, ["{sweep_no_base.py}", "--workdir", "{out}"], "BASE"),
    ("sweep-broken", sweep_main, ["{sweep_broken.py}", "--workdir", "{out}"], "ZeroDivisionError"),
    ("sweep-duplicate-names", sweep_main, ["{sweep_duplicate.py}", "--workdir", "{out}"], "unique"),
    ("sweep-missing-base", sweep_main, ["{sweep_missing_base.py}", "--workdir", "{out}"], "missing_base.py"),
    ("sweep-not-a-list", sweep_main, ["{sweep_not_a_list.py}", "--workdir", "{out}"], "get_sweep() must return"),
    ("sweep-from-later-arm", sweep_main, ["{sweep_from_later.py}", "--workdir", "{out}"],
     "arm 'a' starts from 'b', which is not an earlier arm"),
    ("sweep-unknown-arm-key", sweep_main, ["{sweep_unknown_key.py}", "--workdir", "{out}"], "unknown keys ['seeds']"),
    ("sweep-parent-as-baseline", sweep_main, ["{sweep_parent_baseline.py}", "--workdir", "{out}"],
     "BASELINE 'p' is an arm others start from"),
    ("demo-non-empty-workdir", demo_main, ["--workdir", "{nonempty}"], "--force"),
    ("demo-workdir-is-a-file", demo_main, ["--workdir", "{a_file}"], "not a directory"),
    ("demo-zero-steps", demo_main, ["--workdir", "{out}", "--pretrain-steps", "0"], "--pretrain-steps 0"),
    ("demo-not-a-number", demo_main, ["--workdir", "{out}", "--arm-steps", "many"], "--arm-steps"),
    ("demo-zero-seeds", demo_main, ["--workdir", "{out}", "--seeds", "0"], "--seeds 0"),
    ("demo-negative-seed", demo_main, ["--workdir", "{out}", "--seed", "-1"], "--seed -1"),
    ("demo-tiny-eval", demo_main, ["--workdir", "{out}", "--eval-size", "1"], "--eval-size 1"),
    ("demo-eval-beyond-catalogue", demo_main, ["--workdir", "{out}", "--world", "catalogue", "--species", "50",
                                               "--eval-size", "60"], "--eval-size 60 > --species 50"),
    ("demo-tiny-catalogue", demo_main, ["--workdir", "{out}", "--world", "catalogue", "--species", "1"],
     "--species 1"),
]


def _snapshot(root: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line_and_writes_nothing(case, files, tmp_path, capsys):
    _, main, argv, culprit = case
    names = {p.name: str(p) for p in files.iterdir()} | {"out": str(tmp_path / "out")}
    for name, path in names.items():
        argv = [a.replace("{" + name + "}", path) for a in argv]
    before = _snapshot(files)
    code, out, err = invoke(main, argv, capsys)
    assert code != 0, out + err
    assert len(err.strip().splitlines()) == 1, err
    assert culprit in err, err
    assert list(tmp_path.iterdir()) == [] and _snapshot(files) == before  # nothing written, nothing touched
