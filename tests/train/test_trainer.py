"""The training loop for real: synthetic data through grain, Orbax checkpoints on disk, resume, failures."""

from __future__ import annotations

import json
import warnings
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from clipup_jax.checkpoints.format import load_checkpoint
from clipup_jax.cli.train import main as train_main
from clipup_jax.config import ModelConfig, MoEPlan, TextConfig, VisionConfig
from clipup_jax.models.param_tree import abstract_params
from clipup_jax.train.configs import ConfigFileError, apply_override, load_config
from clipup_jax.train.recipes import base_config, sparse
from clipup_jax.train.run import run_experiment
from clipup_jax.train.health import NonFiniteLoss
from clipup_jax.train.trainer import lower_train_step
from tests.cli_helpers import invoke
from tests.damage import truncate_array_data

TINY = ModelConfig(vision=VisionConfig(image_size=16, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64),
                   text=TextConfig(vocab_size=768, context_length=16, width=32, depth=2, heads=2, mlp_dim=64),
                   embed_dim=16)


def _config(model: ModelConfig = TINY, steps: int = 6):
    config = base_config(model)
    config.data.synthetic_size = 2000
    config.data.eval_size = 40
    config.batch_size = 16
    config.total_steps = steps
    config.optim.warmup_steps = 2
    config.log_every = 1
    config.eval_every = 0
    config.checkpoint_every = 3
    return config


def _params(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    return load_checkpoint(workdir).params


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """3 steps + resume 3 steps == 6 straight steps, bitwise: params, optimizer and data position restored. No
    random init ever runs on the host, and a resume computes none at all: it restores into the abstract state."""
    eager, computed = [], []  # initialiser draws that ran outside a trace; traced draws whose values were computed
    draw = jax.random.normal

    def spy_draw(*args, **kwargs):
        out = draw(*args, **kwargs)
        if isinstance(out, jax.core.Tracer):  # an abstract trace (eval_shape) never runs the callback
            jax.debug.callback(lambda: computed.append(1))
        else:
            eager.append(out.shape)
        return out

    monkeypatch.setattr(jax.random, "normal", spy_draw)
    straight = _config(steps=6)
    run_experiment(straight, tmp_path / "straight")
    first = _config(steps=3)
    run_experiment(first, tmp_path / "resumed")
    assert computed  # the spy sees a fresh init
    computed.clear()
    history = run_experiment(_config(steps=6), tmp_path / "resumed")
    assert computed == [] and eager == []
    assert [h["step"] for h in history["train"]] == [4, 5, 6]
    want, got = _params(tmp_path / "straight"), _params(tmp_path / "resumed")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    meta = json.loads((tmp_path / "resumed" / "clipup.json").read_text())
    assert meta["kind"] == "dense" and meta["tokenizer"] == "tokenizer"
    assert load_checkpoint(tmp_path / "resumed").metadata["step"] == 6
    # saves on the config's schedule only: no extra one at a run's first step (Orbax's default InitialSavePolicy)
    assert sorted(int(p.name) for p in (tmp_path / "straight" / "checkpoints").iterdir()) == [3, 6]


def test_sparse_from_dense_checkpoint_upcycles_and_learns(tmp_path, capsys):
    run_experiment(_config(steps=3), tmp_path / "dense")
    config = _config(sparse(TINY, MoEPlan(num_experts=4, top_k=2)), steps=4)
    config.init.checkpoint = str(tmp_path / "dense")
    config.data.tokenizer = str(tmp_path / "dense" / "tokenizer")
    config.eval_every = 4
    # The initialisations beyond tiling, through the config (their values: tests/checkpoints/test_router_init.py).
    config.upcycle.router_init, config.upcycle.calibration_size = "kmeans", 8
    config.upcycle.multiplet, config.upcycle.shared_from = str(tmp_path / "dense"), "average"
    history = run_experiment(config, tmp_path / "sparse")
    assert (f"upcycled {tmp_path / 'dense'}: 4 experts top-2 in vision and text, router init kmeans on 8 "
            "calibration examples, experts from 2 checkpoints (the rest: average)") in capsys.readouterr().out
    assert history["train"][-1]["aux_loss"] > 0
    assert any(k.endswith("/expert_load/3") for k in history["train"][-1])
    assert {"text_to_image_R@1", "image_to_text_R@10", "zero_shot_top1"} <= set(history["eval"][-1])
    ckpt = load_checkpoint(tmp_path / "sparse")
    assert ckpt.metadata["kind"] == "sparse"
    assert ckpt.params["visual/encoder/layers/1/0/mlp/fc1_kernel"].shape == (1, 4, 32, 64)  # block 1, 4 experts


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run_experiment(_config(steps=3), tmp_path / "run")
    good = _params(tmp_path / "run")
    config = _config(steps=6)
    config.optim.lr = 1e30  # the next update blows the parameters up
    # Either the update itself overflows (stopped whatever the policy), or it leaves huge finite parameters
    # whose next loss is NaN (stopped by the default "stop" policy); nothing non-finite is ever saved.
    with pytest.raises(NonFiniteLoss, match="made parameters non-finite|not finite"):
        run_experiment(config, tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.metadata["step"] in (3, 4)
    assert all(np.all(np.isfinite(v)) for v in ckpt.params.values())
    if ckpt.metadata["step"] == 3:
        for name in good:
            np.testing.assert_array_equal(ckpt.params[name], good[name])


def test_overrides_refuse_typos_and_wrong_types(tmp_path):
    config = _config()
    apply_override(config, "--config.optim.lr=3e-4")
    assert config.optim.lr == 3e-4
    apply_override(config, "--config.mesh.data=2")
    assert config.mesh.data == 2
    apply_override(config, "--config.loss=none")  # a string field takes the text as written, never None
    assert config.loss == "none"
    with pytest.raises(ConfigFileError, match="optim.lrr"):
        apply_override(config, "--config.optim.lrr=1")
    with pytest.raises(ConfigFileError, match="int"):
        apply_override(config, "--config.total_steps=many")
    with pytest.raises(ConfigFileError, match="not found"):
        load_config(tmp_path / "nope.py")


def test_cli_errors_are_one_line(tmp_path, capsys):
    cfg_file = pathlib.Path(__file__).parents[2] / "experiments" / "demo.py"
    code, out, err = invoke(train_main, ["--config", cfg_file, "--workdir", tmp_path / "w",
                                         "--config.optim.lrr=1"], capsys)
    assert code == 2 and "optim.lrr" in err and len(err.strip().splitlines()) == 1
    code, out, err = invoke(train_main, ["--config", cfg_file, "--workdir", tmp_path / "w",
                                         "--config.batch_size=63"], capsys)  # 8 simulated devices on `data`
    assert code == 2 and "batch_size=63" in err


@pytest.mark.parametrize("name", ["clip_b16_dense", "clipup_b16", "clipup_b32", "clipup_l14"])
def test_recipes_build_their_models(name):
    """Production recipes load and their model configs validate (shapes are checked abstractly in parallel tests)."""
    config = load_config(pathlib.Path(__file__).parents[2] / "experiments" / f"{name}.py")
    cfg = ModelConfig.from_dict(config.model.to_dict())
    assert cfg.is_sparse == name.startswith("clipup")
    assert config.batch_size % 256 == 0
    routers = [k for k in abstract_params(cfg) if k.startswith("visual/encoder/") and k.endswith("router_kernel")]
    assert bool(routers) == cfg.is_sparse


def test_clipup_b16_recipe_lowers_on_its_mesh():
    """The full CLIP-UP B/16 recipe's train step (bf16, remat, AdamW, 8 experts over the expert axis) traced and
    lowered with abstract state: shapes and shardings check out without allocating 0.9 B parameters."""
    config = load_config(pathlib.Path(__file__).parents[2] / "experiments" / "clipup_b16.py",
                         ["--config.batch_size=64"])  # the recipe's 32768 needs no different code, only devices
    text = lower_train_step(config).as_text()
    assert "all-to-all" in text or "all_to_all" in text
    assert "bf16" in text


def test_resume_into_a_different_mesh(tmp_path):
    """Saved on (data=8), resumed on (data=2, fsdp=4): Orbax reshards the train state on restore."""
    run_experiment(_config(steps=3), tmp_path / "run")
    config = _config(steps=5)
    config.mesh = ml_collections.ConfigDict({"data": 2, "fsdp": 4, "expert": 1})
    history = run_experiment(config, tmp_path / "run")
    assert [h["step"] for h in history["train"]] == [4, 5]
    assert np.isfinite(history["train"][-1]["loss"])
    kernel = history["final_params"]["visual"]["encoder"]["layers"][0][0]["mlp"]["fc1_kernel"][...]
    assert tuple(kernel.sharding.spec)[:2] == (None, "fsdp")  # restored straight into the new layout


def test_damaged_latest_checkpoint_falls_back_to_the_previous_step(tmp_path):
    """Disk trouble after a save: the newest step's array data is truncated. Resume warns, naming the step,
    restores the previous complete step, and finishes; the damaged step is never loaded as garbage."""
    run_experiment(_config(steps=6), tmp_path / "run")  # saves at 3 and 6
    damaged = tmp_path / "run" / "checkpoints" / "6" / "state"
    assert truncate_array_data(damaged), sorted(str(p) for p in damaged.rglob("*"))
    with pytest.warns(UserWarning, match="step 6 .* unreadable"):
        history = run_experiment(_config(steps=7), tmp_path / "run")
    assert [h["step"] for h in history["train"]] == [4, 5, 6, 7]


def test_loading_a_workdir_skips_a_damaged_step(tmp_path):
    run_experiment(_config(steps=6), tmp_path / "run")
    truncate_array_data(tmp_path / "run" / "checkpoints" / "6" / "state")
    with pytest.warns(UserWarning, match="trying an earlier step"):
        ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.metadata["step"] == 3


def test_resume_with_another_model_names_the_difference_and_does_not_fall_back(tmp_path):
    """A checkpoint of another model is not a damaged one: one error naming what differs, no step-by-step fallback
    through every checkpoint (each reported 'unreadable'), no traceback from Orbax."""
    run_experiment(_config(steps=3), tmp_path / "run")
    other = _config(TINY.replace(embed_dim=8), steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an 'unreadable, falling back' warning fails the test
        with pytest.raises(ValueError, match=r"step 3 holds another model: params/\S+proj/kernel: checkpoint "
                                             r"\(32, 16\), config \(32, 8\)") as info:
            run_experiment(other, tmp_path / "run")
    assert "\n" not in str(info.value)
