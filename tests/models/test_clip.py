"""Model behaviour that the import comparisons do not pin down on their own."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipup_jax.models.param_tree import abstract_params, logical_axes
from clipup_jax.config import preset
from clipup_jax.models import CLIP
from tests.numerics import assert_close, reduction_bound


@pytest.fixture(scope="module")
def model():
    return CLIP(preset("tiny"), nnx.Rngs(0))


def _tokens(eot_at: int, length: int = 16, vocab: int = 512, seed: int = 0) -> np.ndarray:
    row = np.random.RandomState(seed).randint(1, vocab - 1, (1, length)).astype(np.int32)
    row[0, eot_at] = vocab - 1
    return row


def test_text_features_ignore_tokens_after_eot(model):
    """Causal mask + EOT pooling: what follows the EOT token cannot change the features."""
    a = _tokens(5)
    b = a.copy()
    b[0, 6:] = np.arange(10) + 3
    np.testing.assert_array_equal(model.encode_text(a), model.encode_text(b))
    c = a.copy()
    c[0, 2] += 1  # ...while anything before it does
    assert not np.allclose(model.encode_text(a), model.encode_text(c))


def test_shorter_token_rows_match_padded_ones(model):
    a = _tokens(5)
    # Masked positions add exact zeros to the attention sums; only the kernels' blocking over the sequence (16 vs
    # 8 positions) differs, through the text tower's ~12 chained reductions of <= its MLP width.
    assert_close(model.encode_text(a[:, :8]), model.encode_text(a), reduction_bound(80, chain=12), "text features")


def test_logit_scale_init_and_clamp(model):
    assert float(model.scale()) == pytest.approx(1 / 0.07, rel=1e-5)
    m = CLIP(preset("tiny"), nnx.Rngs(0))
    m.logit_scale[...] = jnp.asarray(6.0)
    assert float(m.scale()) == pytest.approx(100.0, rel=1e-6)


def test_call_returns_normalised_features(model):
    out = model(jnp.zeros((2, 32, 32, 3)), jnp.asarray(np.concatenate([_tokens(3), _tokens(9, seed=1)])))
    np.testing.assert_allclose(np.linalg.norm(out.image_features, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out.text_features, axis=-1), 1.0, rtol=1e-5)
    assert out.logit_bias is None


def test_wrong_image_size_is_refused(model):
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
        model.encode_image(jnp.zeros((1, 28, 28, 3)))


def test_every_parameter_has_logical_axes_of_its_rank():
    cfg = preset("ViT-B-16")
    shapes, axes = abstract_params(cfg), logical_axes(cfg)
    assert shapes.keys() == axes.keys()
    for name, shape in shapes.items():
        assert len(axes[name]) == len(shape.shape), name
    assert axes["visual/encoder/layers/0/0/mlp/fc1_kernel"] == ("layers", "embed", "mlp")
    assert shapes["visual/encoder/layers/0/0/mlp/fc1_kernel"].shape == (12, 768, 3072)  # the 12 blocks, stacked
    assert axes["text/token_embed"] == ("vocab", "embed")


def test_bf16_compute_stays_close_to_float32():
    cfg = preset("tiny")
    f32 = CLIP(cfg, nnx.Rngs(0))
    bf16 = CLIP(cfg, nnx.Rngs(0), dtype=jnp.bfloat16)
    pixels = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    a, b = f32.encode_image(pixels), bf16.encode_image(pixels)
    assert b.dtype == jnp.float32
    assert float(jnp.abs(a - b).max() / jnp.abs(a).max()) < 0.05


def test_gap_pool_without_class_token_has_no_cls_params():
    cfg = preset("tiny")
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, pool="gap", class_token=False))
    params = abstract_params(cfg)
    assert "visual/class_embedding" not in params
    assert params["visual/pos_embed"].shape == (16, 48)
