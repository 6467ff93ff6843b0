"""Contrastive losses by hand, and the optimizer's masks, freezing and LR multipliers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clipup_jax.config import preset
from clipup_jax.models import CLIP
from clipup_jax.train.losses import clip_softmax_loss, siglip_sigmoid_loss
from clipup_jax.train.optimizer import warmup_note, make_optimizer, schedule
from clipup_jax.train.recipes import base_config


def test_clip_loss_by_hand():
    image = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    text = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    scale = 2.0
    logits = np.array([[2.0, 1.2], [0.0, 1.6]])
    i2t = -np.mean([logits[0, 0] - np.log(np.exp(logits[0]).sum()), logits[1, 1] - np.log(np.exp(logits[1]).sum())])
    t2i = -np.mean([logits[0, 0] - np.log(np.exp(logits[:, 0]).sum()), logits[1, 1] - np.log(np.exp(logits[:, 1]).sum())])
    assert float(clip_softmax_loss(image, text, scale)) == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_siglip_loss_by_hand():
    image = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    text = jnp.array([[1.0, 0.0], [0.6, 0.8]])
    logits = 2.0 * np.array([[1.0, 0.6], [0.0, 0.8]]) - 1.0
    signs = np.array([[1, -1], [-1, 1]])
    want = -np.sum(np.log(1 / (1 + np.exp(-signs * logits)))) / 2
    assert float(siglip_sigmoid_loss(image, text, 2.0, -1.0)) == pytest.approx(want, rel=1e-6)


def _params():
    _, params, _ = nnx.split(CLIP(preset("tiny"), nnx.Rngs(0)), nnx.Param, ...)
    return params


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(str(p) for p in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(tree)}


def test_freeze_no_decay_and_lr_multipliers():
    cfg = base_config("tiny").optim
    cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.weight_decay = 0.1, 0, "constant", 0.5
    cfg.freeze = [r"^text/token_embed$"]
    cfg.lr_mults = [(r"^visual/proj/", 0.0)]
    params = _params()
    tx, _ = make_optimizer(cfg, params, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)  # zero gradient: only weight decay moves a parameter
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = _flat(optax.apply_updates(params, updates))
    old = _flat(params)
    assert np.array_equal(new["text/token_embed"], old["text/token_embed"])  # frozen
    assert np.array_equal(new["visual/proj/kernel"], old["visual/proj/kernel"])  # LR multiplier 0
    assert np.array_equal(new["visual/ln_post/scale"], old["visual/ln_post/scale"])  # no decay on norms
    assert np.array_equal(new["logit_scale"], old["logit_scale"])  # nor on the temperature
    k = "visual/encoder/layers/0/0/mlp/fc1_kernel"
    np.testing.assert_allclose(new[k], old[k] * (1 - 0.1 * 0.5), rtol=1e-6)  # decoupled decay on kernels


def test_schedules():
    cfg = base_config("tiny").optim
    cfg.lr, cfg.warmup_steps, cfg.end_lr_fraction = 1.0, 10, 0.1
    cosine = schedule(cfg, 110)
    assert float(cosine(0)) == 0.0 and float(cosine(10)) == pytest.approx(1.0) and float(cosine(110)) == pytest.approx(0.1)
    cfg.schedule = "rsqrt"
    rsqrt = schedule(cfg, 110)
    assert float(rsqrt(5)) == pytest.approx(0.5) and float(rsqrt(40)) == pytest.approx(0.5)
    cfg.schedule = "linear-ish"
    with pytest.raises(ValueError, match="optim.schedule"):
        schedule(cfg, 10)


def test_a_warmup_as_long_as_the_run_is_reported_not_changed():
    """The learning rate would still be rising at the last step; the schedule itself stays as configured, so a
    run continued to more steps is on the schedule it started with."""
    cfg = base_config("tiny").optim
    cfg.lr, cfg.warmup_steps, cfg.schedule = 1.0, 30, "constant"
    assert warmup_note(cfg, 31) is None
    assert "never reaches config.optim.lr=1" in warmup_note(cfg, 30)
    assert float(schedule(cfg, 30)(15)) == pytest.approx(0.5)
