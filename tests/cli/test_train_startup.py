"""What clipup-train says while it starts: a warmup as long as the run, how it got its train state (and how long
that took), that it is compiling and then the compile time, and, relaunched on a finished run, that the run is finished; a training data
path that does not exist fails before anything is written."""

from __future__ import annotations

import pathlib
import re

from clipup_jax.cli.train import main as train_main
from tests.cli_helpers import invoke

EXPERIMENT = str(pathlib.Path(__file__).parents[2] / "experiments" / "demo.py")
TINY = ["--config.model.vision.width=32", "--config.model.vision.mlp_dim=64", "--config.model.vision.heads=2",
        "--config.model.vision.depth=1", "--config.model.text.width=32", "--config.model.text.mlp_dim=64",
        "--config.model.text.heads=2", "--config.model.text.depth=1", "--config.model.embed_dim=16",
        "--config.batch_size=16", "--config.eval_every=0", "--config.log_every=1", "--config.checkpoint_every=2",
        "--config.data.synthetic_size=64", "--config.optim.warmup_steps=1", "--config.total_steps=2"]


def test_start_up_says_what_it_does_and_a_finished_run_says_so(tmp_path, capsys):
    argv = ["--config", EXPERIMENT, "--workdir", tmp_path / "run", *TINY, "--config.optim.warmup_steps=2"]
    code, out, err = invoke(train_main, argv, capsys)
    assert code == 0, err
    assert ("warning: config.optim.warmup_steps=2 is not shorter than config.total_steps=2: the learning rate is "
            "still rising at the last step") in out
    lines = out.splitlines()
    state = next(i for i, line in enumerate(lines) if line.startswith("train state from a random init (config.seed=0) in "))
    compiling = lines.index("compiling the train step ...")
    compiled = next(i for i, line in enumerate(lines) if re.fullmatch(
        r"compiled the train step in \d+\.\ds \([\d.e+]+ GFLOP per step\)", line))
    first_step = next(i for i, line in enumerate(lines) if line.startswith("[step 1/2]"))
    assert state < compiling < compiled < first_step

    code, out, err = invoke(train_main, argv, capsys)
    assert code == 0, err
    assert re.search(r"resumed from .*checkpoints at step 2 \(restored in \d+\.\ds\)", out)
    assert f"{tmp_path / 'run'}: finished, at step 2 of config.total_steps=2: nothing to train" in out
    assert "[step" not in out and "compiling" not in out


def test_a_missing_training_table_fails_before_anything_is_written(tmp_path, capsys):
    argv = ["--config", EXPERIMENT, "--workdir", tmp_path / "run", *TINY, f"--config.data.train=csv:{tmp_path}/gone.tsv"]
    code, out, err = invoke(train_main, argv, capsys)
    assert code == 2 and "gone.tsv does not exist" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # no workdir, no tokenizer_trained in it


def test_the_trained_tokenizer_learns_the_configured_training_captions(tmp_path):
    """With config.data.tokenizer="", BPE is trained on the run's own training data (a user's table here), not on
    the embedded set's captions: the table's made-up word becomes one token; the embedded set's words do not."""
    import numpy as np
    from PIL import Image

    from clipup_jax.data.tokenizer import Tokenizer
    from clipup_jax.train.configs import load_config
    from clipup_jax.train.run import tokenizer_for, train_source

    rows = []
    for i in range(12):
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png\ta zorblax number {i} on a quuxfoo table")
    (tmp_path / "captions.tsv").write_text("\n".join(rows) + "\n")
    config = load_config(pathlib.Path(EXPERIMENT), [f"--config.data.train=csv:{tmp_path}/captions.tsv"])
    tokenizer = Tokenizer.from_path(tokenizer_for(config, tmp_path / "run", train_source(config)))
    context = config.model.text.context_length
    assert int((tokenizer(["zorblax"], context)[0] > 0).sum()) == 3  # SOT, one word token, EOT
    assert int((tokenizer(["triangle"], context)[0] > 0).sum()) > 3  # a word of the embedded set, never seen here


def test_a_checkpoint_is_enough_its_model_comes_from_its_clipup_json(tmp_path, capsys):
    """experiments/clipup_demo.py (a 64-wide, 4-block recipe) from a dense 32-wide, 2-block checkpoint: no model
    override needed; the run trains the checkpoint's architecture with the recipe's MoE plan, upcycled on the fly."""
    import json

    import numpy as np

    from clipup_jax.checkpoints.format import save_checkpoint
    from clipup_jax.config import TOWERS, ModelConfig, TextConfig, VisionConfig
    from clipup_jax.models.param_tree import abstract_params
    from clipup_jax.train.recipes import DEMO_PLAN

    small = ModelConfig(vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64),
                        text=TextConfig(vocab_size=768, context_length=24, width=32, depth=2, heads=2, mlp_dim=64),
                        embed_dim=16)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.02, v.shape).astype(np.float32) for k, v in abstract_params(small).items()}
    save_checkpoint(tmp_path / "small", small, params, source={"format": "test"})
    sparse_demo = str(pathlib.Path(EXPERIMENT).with_name("clipup_demo.py"))
    steps = ["--config.batch_size=16", "--config.eval_every=0", "--config.checkpoint_every=1",
             "--config.data.synthetic_size=64", "--config.optim.warmup_steps=1", "--config.total_steps=1"]
    argv = ["--config", sparse_demo, "--workdir", tmp_path / "run", *steps,
            f"--config.init.checkpoint={tmp_path / 'small'}"]
    code, out, err = invoke(train_main, argv, capsys)
    assert code == 0, err
    assert f"train state from {tmp_path / 'small'}" in out
    model = ModelConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())["model"])
    assert model == small.with_moe(DEMO_PLAN, tuple(TOWERS))
