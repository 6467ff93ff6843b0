"""The on-disk format: round trip, self-description, atomic writes, refusals."""

import json

import numpy as np
import pytest
from flax import nnx

from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.checkpoints.format import load_checkpoint, save_checkpoint
from clipup_jax.checkpoints.params import model_from_params
from clipup_jax.models.param_tree import params_of
from clipup_jax.config import preset
from clipup_jax.models import CLIP
from tests.cli_helpers import leftovers


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny").replace(activation="gelu", ln_eps=1e-6)
    return cfg, params_of(CLIP(cfg, nnx.Rngs(7)))


def test_round_trip_is_exact_and_self_describing(tiny, tmp_path):
    cfg, params = tiny
    save_checkpoint(tmp_path / "c", cfg, params, source={"format": "test"})
    ckpt = load_checkpoint(tmp_path / "c")
    assert ckpt.config == cfg  # activation and eps come back from clipup.json alone
    assert ckpt.params.keys() == params.keys()
    assert all(np.array_equal(ckpt.params[k], params[k]) for k in params)
    model = model_from_params(ckpt.config, ckpt.params)
    assert model.cfg.activation == "gelu"


def test_refuses_existing_output_and_force_replaces(tiny, tmp_path):
    cfg, params = tiny
    save_checkpoint(tmp_path / "c", cfg, params, source={"format": "a"})
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(tmp_path / "c", cfg, params, source={"format": "b"})
    assert json.loads((tmp_path / "c" / "clipup.json").read_text())["source"]["format"] == "a"
    save_checkpoint(tmp_path / "c", cfg, params, source={"format": "b"}, force=True)
    assert json.loads((tmp_path / "c" / "clipup.json").read_text())["source"]["format"] == "b"
    assert leftovers(tmp_path) == []


def test_error_mid_write_leaves_nothing(tiny, tmp_path):
    cfg, params = tiny
    with pytest.raises(FileNotFoundError):
        save_checkpoint(tmp_path / "c", cfg, params, source={"format": "a"},
                        tokenizer_files=[tmp_path / "missing-vocab.json"])
    assert list(tmp_path.iterdir()) == []


def test_error_mid_force_keeps_the_old_checkpoint(tiny, tmp_path):
    cfg, params = tiny
    save_checkpoint(tmp_path / "c", cfg, params, source={"format": "a"})
    with pytest.raises(FileNotFoundError):
        save_checkpoint(tmp_path / "c", cfg, params, source={"format": "b"}, force=True,
                        tokenizer_files=[tmp_path / "missing"])
    assert load_checkpoint(tmp_path / "c").metadata["source"]["format"] == "a"
    assert leftovers(tmp_path) == []


def test_mis_shaped_params_are_listed(tiny, tmp_path):
    cfg, params = tiny
    bad = dict(params)
    bad["text/token_embed"] = np.zeros((3, 3), np.float32)
    del bad["visual/ln_post/scale"]
    bad["visual/extra"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path / "c", cfg, bad, source={"format": "a"})
    message = str(info.value)
    assert "visual/ln_post/scale" in message and "visual/extra" in message and "text/token_embed (3, 3)" in message
    assert not (tmp_path / "c").exists()


def test_metadata_paths_cannot_escape(tiny, tmp_path):
    cfg, params = tiny
    save_checkpoint(tmp_path / "c", cfg, params, source={"format": "a"})
    (tmp_path / "secret").write_text("x")
    meta_file = tmp_path / "c" / "clipup.json"
    meta = json.loads(meta_file.read_text())
    meta["tokenizer"] = "../secret"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="escapes"):
        load_checkpoint(tmp_path / "c")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="clipup.json"):
        load_checkpoint(tmp_path)
