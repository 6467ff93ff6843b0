"""Export back to Hugging Face: an imported CLIP round-trips bit for bit, a model made here loads in
`transformers.CLIPModel` with the same features, and what HF cannot express is refused with nothing written."""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import CLIPModel

from clipup_jax.checkpoints.format import load_checkpoint, save_checkpoint
from clipup_jax.cli.convert import main as convert
from clipup_jax.config import MoEPlan, preset
from clipup_jax.models import CLIP
from clipup_jax.models.param_tree import params_of
from tests import reference_models as ref
from tests.cli_helpers import invoke
from tests.numerics import scaled_error

VISION = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3, image_size=30,
              patch_size=6, hidden_act="gelu")
TEXT = dict(vocab_size=99, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5,
            max_position_embeddings=13, hidden_act="gelu")


def test_an_imported_hf_clip_exports_bit_for_bit(tmp_path, capsys):
    model = ref.hf_clip(VISION, TEXT, 24)
    src = ref.save_hf(model, tmp_path / "hf")
    code, _, err = invoke(convert, ["import", "--from", "hf", src, "--out", tmp_path / "ckpt"], capsys)
    assert code == 0, err
    code, out, err = invoke(convert, ["export", "--to", "hf", tmp_path / "ckpt", "--out", tmp_path / "back"], capsys)
    assert code == 0, err
    assert "CLIPModel.from_pretrained" in out
    want = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if not k.endswith("position_ids")}
    got = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    reloaded = CLIPModel.from_pretrained(tmp_path / "back").eval()
    pixels, tokens = ref.inputs(model)
    for a, b in zip(ref.features(reloaded, pixels, tokens), ref.features(model, pixels, tokens)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu_tanh"])
def test_a_model_made_here_loads_in_transformers_with_the_same_features(activation, tmp_path, capsys):
    cfg = preset("tiny").replace(activation=activation, ln_eps=1e-6)
    model = CLIP(cfg, nnx.Rngs(3))
    save_checkpoint(tmp_path / "ckpt", cfg, params_of(model), source={})
    code, _, err = invoke(convert, ["export", "--to", "hf", tmp_path / "ckpt", "--out", tmp_path / "hf"], capsys)
    assert code == 0, err
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    rng = np.random.RandomState(0)
    pixels = rng.randn(3, 32, 32, 3).astype(np.float32)
    tokens = rng.randint(1, cfg.text.vocab_size - 1, (3, cfg.text.context_length)).astype(np.int32)
    tokens[:, 5] = cfg.text.vocab_size - 1  # pooled at argmax, as these towers pool
    want_image, want_text = np.asarray(model.encode_image(jnp.asarray(pixels))), np.asarray(
        model.encode_text(jnp.asarray(tokens)))
    got_image, got_text = ref.features(hf, pixels, tokens)
    assert scaled_error(got_image, want_image) < 1e-5 and scaled_error(got_text, want_text) < 1e-5
    with torch.no_grad():
        assert float(hf.logit_scale) == pytest.approx(float(model.logit_scale[...]))


@pytest.mark.parametrize("change, match", [
    (lambda c: c.with_moe(MoEPlan(num_experts=2, top_k=1), ("vision",)), "vision.moe=.*no Hugging Face or open_clip"),
    (lambda c: c.replace(vision=dataclasses.replace(c.vision, pool="gap", class_token=False)), "vision.pool='gap'"),
    (lambda c: c.replace(logit_bias=True), "logit_bias=True"),
])
def test_what_hf_cannot_express_is_refused_and_nothing_written(change, match, tmp_path, capsys):
    cfg = change(preset("tiny"))
    save_checkpoint(tmp_path / "ckpt", cfg, params_of(CLIP(cfg, nnx.Rngs(0))), source={})
    code, _, err = invoke(convert, ["export", "--to", "hf", tmp_path / "ckpt", "--out", tmp_path / "hf"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert not (tmp_path / "hf").exists()
    assert load_checkpoint(tmp_path / "ckpt").config == cfg
