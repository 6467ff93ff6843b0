"""Checkpoints written in format 1 (one subtree per block, before the model kept repeated blocks stacked) still
load, into the stacked layout, and compute what the code that wrote them computed. The fixtures were written by
commit 15be120 (tests/fixtures/format_v1/make.py says how)."""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
import pytest

from clipup_jax.checkpoints.format import FORMAT_VERSION, load_checkpoint, read_metadata
from clipup_jax.checkpoints.params import check_params, model_from_params, to_blocks
from clipup_jax.config import ModelConfig
from clipup_jax.train.configs import load_config
from clipup_jax.train.trainer import check_config
from tests.fixtures.format_v1.make import inputs
from tests.numerics import assert_close, reduction_bound

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "format_v1"
# Same float32 operations as the writer, grouped into different XLA fusions: a rounding bound over the longest
# reduction (the patch embedding, 8 * 8 * 3 terms) chained through three blocks.
BOUND = reduction_bound(8 * 8 * 3, chain=4 * 3 + 4)


def _features(cfg: ModelConfig, params: dict) -> tuple[np.ndarray, np.ndarray]:
    model = model_from_params(cfg, params)
    pixels, tokens = inputs()
    return np.asarray(model.encode_image(pixels)), np.asarray(model.encode_text(tokens))


@pytest.mark.parametrize("name", ["sparse", "workdir"])
def test_format_1_loads_stacked_and_computes_what_its_writer_did(name):
    assert read_metadata(FIXTURES / name)[0]["format_version"] == 1 < FORMAT_VERSION
    ckpt = load_checkpoint(FIXTURES / name)
    check_params(ckpt.params, ckpt.config, name)  # the stacked layout of this version
    assert any("/encoder/layers/" in k for k in ckpt.params)
    expected = np.load(FIXTURES / "expected.npz")
    image, text = _features(ckpt.config, ckpt.params)
    assert_close(image, expected[f"{name}_image"], BOUND, f"{name} image features")
    assert_close(text, expected[f"{name}_text"], BOUND, f"{name} text features")


def test_format_1_adam_moments_are_stacked_like_the_params():
    ckpt = load_checkpoint(FIXTURES / "sparse")
    assert ckpt.opt_state is not None and ckpt.opt_state.count == 3
    for tree in (ckpt.opt_state.mu, ckpt.opt_state.nu):
        assert {k: v.shape for k, v in tree.items()} == {k: v.shape for k, v in ckpt.params.items()}
    assert all((v >= 0).all() for v in ckpt.opt_state.nu.values())
    # Block 2 of the image tower is a segment of its own: its moments are those of no other block.
    blocks = to_blocks(ckpt.opt_state.mu, ckpt.config)
    assert not np.array_equal(blocks["visual/encoder/blocks/2/mlp/fc1_kernel"],
                              blocks["visual/encoder/blocks/0/mlp/fc1_kernel"])


def test_resuming_a_format_1_workdir_is_refused_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(FIXTURES / "workdir", workdir)
    config = load_config(str(workdir / "config.json"), ["--config.batch_size=8"])  # the tests' 8 devices
    with pytest.raises(ValueError, match=r"format 1, which this version reads but does not resume.*"
                                         r"--config.init.checkpoint=") as e:
        check_config(config, workdir)
    assert "\n" not in str(e.value)
