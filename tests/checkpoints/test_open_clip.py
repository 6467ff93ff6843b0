"""open_clip hub checkpoints in and out, against open_clip's own model code: one architecture per variant its
native ViT configs use, built by open_clip from its bundled config (shrunk), imported through the CLI with the
same features, upcycled function-preserving, exported back to a directory open_clip loads."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clipup_jax.checkpoints.format import load_checkpoint, save_checkpoint
from clipup_jax.checkpoints.params import model_from_params
from clipup_jax.cli.convert import main as convert
from clipup_jax.config import preset
from clipup_jax.models.param_tree import abstract_params
from tests import open_clip_reference as ref
from tests.cli_helpers import invoke
from tests.numerics import scaled_error

# variant -> (open_clip config name, changes to its vision_cfg / text_cfg, weights file). The changes make a
# variant open_clip can express that no bundled config uses: avg pooling with ln_post before it, tanh GELU and
# another LayerNorm eps (both towers), a text projection bias, first-token text pooling.
_TANH_EPS = {"act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6}}
VARIANTS = {
    "plain": ("ViT-B-32", {}, "open_clip_model.safetensors"),
    "quickgelu": ("ViT-B-16-quickgelu", {}, "open_clip_model.safetensors"),
    "clipa": ("ViT-L-14-CLIPA", {}, "open_clip_model.safetensors"),  # avg pool, LN after it; bidirectional, last
    "worldwide": ("ViT-H-14-worldwide", {}, "open_clip_pytorch_model.bin"),  # pool at the first eos_id
    "layerscale": ("ViT-M-16-alt", {}, "open_clip_model.safetensors"),
    "fractional-mlp": ("ViT-bigG-14", {}, "open_clip_model.safetensors"),  # mlp_ratio 4.9231
    "avg-tanh-eps-bias-first": ("ViT-B-32", {"vision_cfg": {"pool_type": "avg", **_TANH_EPS},
                                             "text_cfg": {"proj_bias": True, "pool_type": "first", **_TANH_EPS}},
                                "open_clip_model.safetensors"),
}
# Scaled error of float32 features. Not tests/numerics.py's first-order bound: with a 3,072-term patch embedding
# and ~20 dependent reductions per tower it allows 3e-2, far above a real mistake such as tanh-for-exact GELU
# (7e-5 here). Measured instead: the worst of all 45 native configs at full width is 2.4e-06
# (benchmarks/open_clip_configs.py); this is 4x that, below every mistake the tests were checked against.
TOLERANCE = 1e-5


def _model_cfg(variant: str) -> dict:
    name, changes, _ = VARIANTS[variant]
    cfg = ref.shrunk(ref.load().get_model_config(name))
    for section, fields in changes.items():
        cfg[section].update(fields)
    return cfg


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def imported(request, tmp_path_factory):
    """(variant, model config, open_clip model, clipup checkpoint imported from its hub layout by the CLI)."""
    cfg = _model_cfg(request.param)
    model = ref.build(cfg, seed=len(request.param))
    root = tmp_path_factory.mktemp(request.param)
    weights = ref.save_hub(model, cfg, root / "hub", VARIANTS[request.param][2])
    printed = io.StringIO()  # capsys is per test
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(printed):
        convert(["import", "--from", "open_clip", str(weights), "--out", str(root / "ckpt")])
    assert not exit_info.value.code
    # CLIPA's and -worldwide's text towers read another tokenizer's ids: the import says so
    assert ("Hugging Face tokenizer" in printed.getvalue()) == ("hf_tokenizer_name" in cfg["text_cfg"])
    return request.param, cfg, model, root / "ckpt"


def _import(weights, out, capsys) -> None:
    code, _, err = invoke(convert, ["import", "--from", "open_clip", weights, "--out", out], capsys)
    assert code == 0, err


def _features(ckpt_dir, pixels, tokens) -> tuple[np.ndarray, np.ndarray]:
    ckpt = load_checkpoint(ckpt_dir)
    model = model_from_params(ckpt.config, ckpt.params)
    return np.asarray(model.encode_image(jnp.asarray(pixels))), np.asarray(model.encode_text(jnp.asarray(tokens)))


def test_imports_with_open_clips_features(imported):
    variant, cfg, model, ckpt = imported
    pixels, tokens = ref.inputs(cfg)
    want, got = ref.features(model, pixels, tokens), _features(ckpt, pixels, tokens)
    assert scaled_error(got[0], want[0]) < TOLERANCE and scaled_error(got[1], want[1]) < TOLERANCE


def test_exports_to_a_directory_open_clip_loads(imported, tmp_path, capsys):
    variant, cfg, model, ckpt = imported
    code, out, err = invoke(convert, ["export", "--to", "open_clip", ckpt, "--out", tmp_path / "oc"], capsys)
    assert code == 0, err
    assert "local-dir:" in out
    reloaded = ref.load().create_model(f"local-dir:{tmp_path / 'oc'}")
    pixels, tokens = ref.inputs(cfg)
    want, got = ref.features(model, pixels, tokens), ref.features(reloaded.eval(), pixels, tokens)
    assert scaled_error(got[0], want[0]) < TOLERANCE and scaled_error(got[1], want[1]) < TOLERANCE
    if variant != "layerscale":  # folded into the weights at import: open_clip gets the model without LayerScale
        original, written = model.state_dict(), load_file(str(tmp_path / "oc" / "open_clip_model.safetensors"))
        assert set(written) == set(original)
        for key, value in original.items():
            torch.testing.assert_close(written[key], value, rtol=0, atol=0, msg=key)


def test_an_upcycled_layerscale_model_computes_what_open_clip_does(tmp_path, capsys):
    cfg = _model_cfg("layerscale")
    model = ref.build(cfg)
    _import(ref.save_hub(model, cfg, tmp_path / "hub"), tmp_path / "dense", capsys)
    code, _, err = invoke(convert, ["upcycle", tmp_path / "dense", "--out", tmp_path / "sparse", "--num-experts", 3,
                                    "--top-k", 2, "--moe-layers", "every_2", "--towers", "vision",
                                    "--eval-capacity-factor", "none"],
                          capsys)
    assert code == 0, err
    assert load_checkpoint(tmp_path / "sparse").config.vision.moe is not None
    pixels, tokens = ref.inputs(cfg)
    want, got = ref.features(model, pixels, tokens), _features(tmp_path / "sparse", pixels, tokens)
    assert scaled_error(got[0], want[0]) < TOLERANCE and scaled_error(got[1], want[1]) < TOLERANCE


@pytest.mark.parametrize("section, field, value", [
    ("vision_cfg", "attentional_pool", True),
    ("vision_cfg", "pool_type", "none"),
    ("text_cfg", "qk_norm", True),
    ("text_cfg", "embed_cls", True),
    ("text_cfg", "norm_kwargs", {"elementwise_affine": False}),
])
def test_an_unimplemented_field_is_refused_by_name(section, field, value, tmp_path, capsys):
    cfg = _model_cfg("plain")
    weights = ref.save_hub(ref.build(cfg), cfg, tmp_path / "hub")
    config_file = tmp_path / "hub" / "open_clip_config.json"
    raw = json.loads(config_file.read_text())
    raw["model_cfg"][section][field] = value
    config_file.write_text(json.dumps(raw))
    code, _, err = invoke(convert, ["import", "--from", "open_clip", weights, "--out", tmp_path / "ckpt"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{config_file}: {section}.{field}=" in err
    assert not (tmp_path / "ckpt").exists()


def test_a_sparse_checkpoint_is_not_exported(tmp_path, capsys):
    cfg = _model_cfg("plain")
    _import(ref.save_hub(ref.build(cfg), cfg, tmp_path / "hub"), tmp_path / "dense", capsys)
    code, _, err = invoke(convert, ["upcycle", tmp_path / "dense", "--out", tmp_path / "sparse", "--num-experts", 2,
                                    "--top-k", 1, "--moe-layers", "every_2", "--towers", "text"], capsys)
    assert code == 0, err
    code, _, err = invoke(convert, ["export", "--to", "open_clip", tmp_path / "sparse", "--out", tmp_path / "oc"],
                          capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"text\.moe=.*sparse \(MoE\) towers have no Hugging Face or open_clip format", err), err
    assert not (tmp_path / "oc").exists()


def _random_params(cfg) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(5)
    return {k: np.asarray(0.1 * rng.randn(*a.shape), np.float32) for k, a in abstract_params(cfg).items()}


def test_a_model_made_here_loads_in_open_clip_with_the_same_features(tmp_path, capsys):
    cfg = preset("tiny").replace(activation="gelu_tanh", ln_eps=1e-6, logit_bias=True)
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, pool="gap", ln_post_after_pool=True, ln_pre=False))
    params = _random_params(cfg)
    save_checkpoint(tmp_path / "ckpt", cfg, params, source={})
    code, _, err = invoke(convert, ["export", "--to", "open_clip", tmp_path / "ckpt", "--out", tmp_path / "oc"],
                          capsys)
    assert code == 0, err
    reloaded = ref.load().create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    pixels, tokens = ref.inputs(json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["model_cfg"])
    want, got = _features(tmp_path / "ckpt", pixels, tokens), ref.features(reloaded, pixels, tokens)
    assert scaled_error(got[0], want[0]) < TOLERANCE and scaled_error(got[1], want[1]) < TOLERANCE
    assert reloaded.logit_bias.item() == params["logit_bias"]


def test_what_open_clip_cannot_express_is_refused_and_nothing_written(tmp_path, capsys):
    cfg = preset("tiny")
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, pool="gap", class_token=False))
    save_checkpoint(tmp_path / "ckpt", cfg, _random_params(cfg), source={})
    code, _, err = invoke(convert, ["export", "--to", "open_clip", tmp_path / "ckpt", "--out", tmp_path / "oc"],
                          capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "vision.class_token=False: open_clip's CLIP has no such variant" in err
    assert not (tmp_path / "oc").exists()
