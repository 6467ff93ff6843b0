"""The shard_map contrastive losses equal the global ones (value and gradients) and never hold B x B logits."""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from clipup_jax.config import ModelConfig, TextConfig, VisionConfig
from clipup_jax.models import CLIP
from clipup_jax.parallel.mesh import make_mesh
from clipup_jax.parallel.sharding import batch_spec
from clipup_jax.train.losses import make_contrastive_loss
from clipup_jax.train.recipes import base_config, continued_training
from clipup_jax.train.step import init_state, make_train_step
from tests.numerics import assert_close, assert_update_close, reduction_bound

assert len(jax.devices()) >= 8, "run under tests/conftest.py (8 simulated CPU devices)"

B, E = 512, 32
SCALE, BIAS = np.float32(7.0), np.float32(-3.0)
# Logits (E terms), the row/column softmax and the backward pass (B terms each): three chained reductions of <= B.
LOSS_BOUND = reduction_bound(B, chain=3)
MESHES = ({"data": 8}, {"data": 2, "expert": 4}, {"data": 2, "fsdp": 2, "expert": 2})


def _embeddings(batch: int = B) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(0)
    image, text = rng.randn(batch, E), rng.randn(batch, E) + 0.5 * rng.randn(batch, E)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return unit(image), unit(image + text)  # correlated pairs: a loss well below log(B)


def _value_and_grads(loss: str, impl: str):
    """jit(value_and_grad) w.r.t. image, text, scale (and bias for siglip)."""
    fn = make_contrastive_loss(loss, impl)
    if loss == "clip":
        return jax.jit(jax.value_and_grad(lambda i, t, s: fn(i, t, s), argnums=(0, 1, 2)))
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))


def _args(loss: str, image, text) -> tuple:
    return (image, text, SCALE) if loss == "clip" else (image, text, SCALE, BIAS)


@functools.cache
def _reference(loss: str):
    """The global loss on one device, no mesh: the independent reference."""
    return jax.device_get(_value_and_grads(loss, "global")(*_args(loss, *_embeddings())))


def _assert_same(got, want):
    (value, grads), (want_value, want_grads) = jax.device_get(got), want
    assert_close(value, want_value, LOSS_BOUND, "loss")
    for name, g, w in zip(("image", "text", "scale", "bias"), grads, want_grads):
        assert_close(g, w, LOSS_BOUND, f"gradient w.r.t. {name}")


def _no_global_logits(compiled, batch: int = B) -> None:
    """Per-device (SPMD-partitioned) program: no (B, B) float32 buffer, and temporaries well below one."""
    assert f"f32[{batch},{batch}]" not in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < batch * batch * 4 // 2


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_sharded_equals_global(loss, shape, axis_types):
    mesh = make_mesh(shape, axis_types=axis_types)
    with jax.set_mesh(mesh):
        rows = NamedSharding(mesh, batch_spec(mesh, 2))
        args = _args(loss, *(jax.device_put(x, rows) for x in _embeddings()))
        fn = _value_and_grads(loss, "sharded")
        got = fn(*args)
        compiled = fn.lower(*args).compile()
    _assert_same(got, _reference(loss))
    _no_global_logits(compiled)
    assert "all-gather" in compiled.as_text()


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_memory_check_sees_global_logits(loss):
    """With features replicated on every device, GSPMD computes the global loss as (B, B) per device; the
    sharded loss still splits the rows. This is what `_no_global_logits` catches in the test above."""
    mesh = make_mesh({"data": 8})
    with jax.set_mesh(mesh):
        args = _args(loss, *(jax.device_put(x, NamedSharding(mesh, P())) for x in _embeddings()))
        compiled = {impl: _value_and_grads(loss, impl).lower(*args).compile() for impl in ("global", "sharded")}
        got = _value_and_grads(loss, "sharded")(*args)
    assert f"f32[{B},{B}]" in compiled["global"].as_text()
    assert compiled["global"].memory_analysis().temp_size_in_bytes >= B * B * 4
    _no_global_logits(compiled["sharded"])
    _assert_same(got, _reference(loss))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_one_device_falls_back_to_global_math(loss):
    args = _args(loss, *_embeddings())
    want = jax.device_get(_value_and_grads(loss, "global")(*args))
    for mesh in (None, make_mesh({"data": 1, "expert": 1}, devices=jax.devices()[:1])):
        if mesh is None:
            got = _value_and_grads(loss, "sharded")(*args)
        else:
            with jax.set_mesh(mesh):
                got = _value_and_grads(loss, "sharded")(*args)
        for g, w in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(want)):
            np.testing.assert_array_equal(g, w)  # the same program, so the same bits


@pytest.mark.parametrize("shape, batch", [({"data": 8}, 12), ({"data": 2, "expert": 4}, 20)])
def test_batch_not_divisible_by_the_batch_axes(shape, batch):
    mesh = make_mesh(shape)
    image, text = _embeddings(batch)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=rf"batch size {batch} .*{re.escape(str(dict(mesh.shape)))}"):
        make_contrastive_loss("clip", "sharded")(image, text, SCALE)


def test_config_and_bad_names():
    assert base_config("tiny").loss_impl == "global"
    assert continued_training("tiny").loss_impl == "sharded"
    with pytest.raises(ValueError, match=r"config\.loss_impl .*'blocked'"):
        make_contrastive_loss("clip", "blocked")
    with pytest.raises(ValueError, match=r"config\.loss .*'infonce'"):
        make_contrastive_loss("infonce", "global")
    image, text = _embeddings(8)
    with pytest.raises(ValueError, match="logit_bias"):
        make_contrastive_loss("siglip", "sharded")(image, text, SCALE)


TINY = ModelConfig(vision=VisionConfig(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64),
                   text=TextConfig(vocab_size=64, context_length=8, width=32, depth=1, heads=2, mlp_dim=64),
                   embed_dim=16)


PROJ = ("visual", "proj", "kernel")
# The tiny CLIP's longest reduction is the patch embedding (8 * 8 * 3 = 192 terms); forward and backward chain
# about 12 of them (embedding, attention, MLP, projection, loss in each direction).
STEP_BOUND = reduction_bound(8 * 8 * 3, chain=12)


def test_train_step_sharded_equals_global():
    """One jitted SGD step of a tiny CLIP on a (data=2, expert=4) mesh: same loss and updated params."""
    rng = np.random.RandomState(0)
    batch = {"pixels": rng.randn(16, 16, 16, 3).astype(np.float32),
             "tokens": rng.randint(1, 64, (16, 8)).astype(np.int32)}
    tx, schedule = optax.sgd(0.5), optax.constant_schedule(0.5)
    mesh = make_mesh({"data": 2, "expert": 4})
    with jax.set_mesh(mesh):
        graphdef, state = init_state(CLIP(TINY, nnx.Rngs(0)), tx)
        batch = {k: jax.device_put(v, NamedSharding(mesh, batch_spec(mesh, v.ndim))) for k, v in batch.items()}
        steps = {impl: make_train_step(graphdef, tx, "clip", schedule, loss_impl=impl) for impl in ("global", "sharded")}
        # One program for both steps: ~1/3 less compile time on CPU, and the identical forward passes are shared.
        both = jax.jit(lambda state, batch: {impl: step(state, batch) for impl, step in steps.items()})(state, batch)
    results = {impl: jax.device_get((new.params, metrics["loss"], metrics["grad_norm"]))
               for impl, (new, metrics, _) in both.items()}
    (want_params, want_loss, want_norm), (params, loss, norm) = results["global"], results["sharded"]
    assert want_loss > 1.0  # a real loss (log 16 = 2.77 at random init)
    assert_close(loss, want_loss, STEP_BOUND, "loss")
    assert_close(norm, want_norm, STEP_BOUND, "gradient norm")
    flat, want_flat = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(want_params))
    old = dict(nnx.to_flat_state(jax.device_get(state.params)))
    assert set(flat) == set(want_flat) == set(old)
    assert np.abs(flat[PROJ][...] - old[PROJ][...]).max() > 1e-4  # the step did update the weights being compared
    for path, want in want_flat.items():  # SGD: the update is lr * gradient, so its error is the gradient's
        assert_update_close(flat[path][...], want[...], old[path][...], STEP_BOUND, str(path))
