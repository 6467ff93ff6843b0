"""The MoE layer: every dispatch path computes the same function, upcycled experts preserve it,
aux losses reach the router, and train/eval behave differently where they should."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipup_jax.config import ConfigError, ModelConfig, MoEPlan, preset
from clipup_jax.models.param_tree import abstract_params
from clipup_jax.models import CLIP
from clipup_jax.models.layers import Mlp
from clipup_jax.models.moe import MoeMlp, moe_aux
from tests.numerics import assert_close, assert_trees_close, reduction_bound

G, S, D, F, E = 3, 10, 16, 24, 4
# One layer: reductions over F (the widest) and over the G * S tokens (expert gradients); forward, gate and
# combine, then backward: about 6 chained.
LAYER_BOUND = reduction_bound(G * S, chain=6)
PATHS = ["einsum", "padded", "ragged_dot", "pallas", "expert_loop"]


def _on(plan: MoEPlan, path: str) -> MoEPlan:
    """`plan` running `path` in both modes (these tests differentiate the layer in eval mode too)."""
    return dataclasses.replace(plan, dispatch=path, eval_dispatch=path)


def _layer(plan: MoEPlan, seed: int = 0) -> MoeMlp:
    layer = MoeMlp(D, F, 2, "gelu", plan, nnx.Rngs(seed, router=seed + 1))
    rng = np.random.RandomState(seed)
    layer.fc1_bias[...] = jnp.asarray(rng.randn(E, F) * 0.1, jnp.float32)  # zero biases would hide bias bugs
    layer.fc2_bias[...] = jnp.asarray(rng.randn(E, D) * 0.1, jnp.float32)
    layer.router_kernel[...] = jnp.asarray(rng.randn(D, E), jnp.float32)
    return layer


def _x(seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (G, S, D))


def _loss_and_grads(plan: MoEPlan, x: jax.Array):
    layer = _layer(plan)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
        y = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(jnp.sin(y) * y)

    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


@pytest.mark.parametrize("capacity_factor", [None, 0.5], ids=["dropless", "dropping"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("path", PATHS)
def test_paths_equal_dense_reference_forward_and_backward(path, top_k, capacity_factor):
    base = _on(MoEPlan(num_experts=E, top_k=top_k, eval_capacity_factor=capacity_factor), "dense_reference")
    plan = _on(base, path)
    x = _x()
    (want, want_grads), (got, got_grads) = _loss_and_grads(base, x), _loss_and_grads(plan, x)
    assert_close(got, want, LAYER_BOUND, "loss")
    if top_k == 1:  # a renormalised top-1 gate is p / p = 1: the router's gradient is zero up to rounding, whose
        # scale is that of the expert gradients it is made of
        scale = float(np.abs(np.asarray(want_grads[0]["fc1_kernel"][...])).max())
        for grads in (got_grads, want_grads):
            router = grads[0].pop("router_kernel")
            assert_close(router[...], np.zeros(router.shape), LAYER_BOUND, "router grad", scale=scale)
    assert_trees_close(got_grads, want_grads, LAYER_BOUND, "grad")


def test_expert_loop_covers_every_chunk_size():
    """Experts with more rows than the largest chunk, remainders of several sizes, and no rows at all: forward and
    the hand-written backward against the dense reference."""
    from clipup_jax.models import dispatch, routing

    rng = np.random.RandomState(0)
    g, s, d, f, e = 5, 40, 8, 12, 3
    x = jnp.asarray(rng.randn(g, s, d), jnp.float32)
    logits = jnp.asarray(rng.randn(g, s, e) + np.array([4.0, 0.0, -50.0]), jnp.float32)  # expert 2 gets no token
    r = jax.vmap(lambda lg: routing.top_k_routing(lg, 1, s))(logits)
    w = dispatch.ExpertWeights(*(jnp.asarray(rng.randn(*shape), jnp.float32)
                                 for shape in ((e, d, f), (e, f), (e, f, d), (e, d))))
    def loss(path):
        return lambda x, w: jnp.sum(jnp.sin(path(x, w)))

    reference = jax.value_and_grad(loss(lambda x, w: dispatch.dense_reference(
        x, dispatch.combine_weights(r, e), w, jax.nn.gelu)), argnums=(0, 1))(x, w)
    bound = reduction_bound(g * s, chain=6)
    # (16, 1) runs coarsened to step 4 (`for_rows`: narrow experts), so a remainder reads rows past its end.
    for chunks in (dispatch.ChunkSchedule(64, 4), dispatch.ChunkSchedule(7, 7), dispatch.ChunkSchedule(24, 3),
                   dispatch.ChunkSchedule(16, 1)):
        got = jax.jit(jax.value_and_grad(loss(lambda x, w: dispatch.expert_loop(x, r, w, jax.nn.gelu, chunks)),
                                         argnums=(0, 1)))(x, w)
        assert_close(got[0], reference[0], bound, f"loss, chunks {chunks}")
        assert_trees_close(got[1], reference[1], bound, f"grads, chunks {chunks}")


def test_chunk_steps_coarsen_only_where_rows_are_many_or_cheap():
    from clipup_jax.models.dispatch import INFERENCE_CHUNKS, TRAIN_CHUNKS, WASTE_FLOPS, ChunkSchedule

    b16_text, b16_image, demo = 4 * 512 * 2048, 4 * 768 * 3072, 4 * 64 * 128  # FLOPs of an expert MLP row
    assert INFERENCE_CHUNKS.for_rows(100, 8, b16_text) == ChunkSchedule(112, 16)  # no chunk larger than the rows
    assert INFERENCE_CHUNKS.for_rows(8 * 77 * 2, 8, b16_text).step == 16  # B/16 text at batch 8: the finest step
    assert INFERENCE_CHUNKS.for_rows(48 * 24 * 2, 8, demo).step == 128  # narrow experts: rows cost next to nothing
    for n in (8 * 197 * 2, 64 * 77 * 2, 64 * 197 * 2, 256 * 197 * 2, 10**7):
        chunks = INFERENCE_CHUNKS.for_rows(n, 8, b16_image)
        assert chunks.step == 16 or chunks.step <= n / 8 / 32, (n, chunks)  # a remainder wastes < 1/32 of the rows
        assert chunks.step <= 128 and 512 % chunks.step == 0, (n, chunks)
    assert INFERENCE_CHUNKS.for_rows(256 * 197 * 2, 8, b16_image).step == 128
    assert ChunkSchedule(512, 1).for_rows(64, 8, WASTE_FLOPS // 8).step == 8  # 8 rows of that width: the budget
    assert TRAIN_CHUNKS.for_rows(10**7, 8, b16_image) == TRAIN_CHUNKS
    assert ChunkSchedule(7, 7).for_rows(10**7, 1, 1) == ChunkSchedule(7, 7)


@pytest.mark.parametrize("path", PATHS)
def test_empty_experts_get_exactly_zero_gradient(path):
    plan = _on(MoEPlan(num_experts=E, top_k=1, eval_capacity_factor=None), path)
    layer = _layer(plan)
    layer.router_kernel[...] = jnp.zeros((D, E)).at[:, 2].set(0.0)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params):
        params = dict(params)
        return jnp.sum(nnx.merge(graphdef, params, rest)(jnp.abs(_x())) ** 2)

    # Bias the router so expert 2 takes every token: the other experts must see exactly zero gradient.
    layer.router_kernel[...] = jnp.zeros((D, E)).at[:, 2].set(1.0)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(jnp.abs(_x())) ** 2))(params)
    for name in ("fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias"):
        g = np.asarray(grads[name][...])
        assert np.all(g[[0, 1, 3]] == 0.0), name
        assert np.any(g[2] != 0.0), name


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("path", PATHS + ["dense_reference"])
def test_identical_experts_preserve_the_dense_mlp(path, top_k):
    """Function preservation: copies of one MLP, renormalised gates, no drops -> the dense output."""
    dense = Mlp(D, F, 2, "quick_gelu", nnx.Rngs(3))
    dense.fc1_bias[...] = jnp.linspace(-0.5, 0.5, F)
    plan = MoEPlan(num_experts=E, top_k=top_k, eval_capacity_factor=None, eval_dispatch=path)
    moe = MoeMlp(D, F, 2, "quick_gelu", plan, nnx.Rngs(4))
    for name in ("fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias"):
        getattr(moe, name)[...] = jnp.broadcast_to(getattr(dense, name)[...], getattr(moe, name)[...].shape)
    x = _x(5)
    assert_close(moe(x), dense(x), LAYER_BOUND, "output")  # the k gates sum to 1 up to rounding


def test_expert_choice_matches_its_dense_reference():
    plan = MoEPlan(num_experts=E, router="expert_choice", eval_capacity_factor=1.0)
    want = _loss_and_grads(_on(plan, "dense_reference"), _x())
    got = _loss_and_grads(plan, _x())
    assert_close(got[0], want[0], LAYER_BOUND, "loss")
    assert_trees_close(got[1], want[1], LAYER_BOUND, "grad")


def test_train_mode_uses_train_capacity_and_noise():
    plan = MoEPlan(num_experts=E, top_k=2, capacity_factor=0.25, eval_capacity_factor=None, router_noise_std=1.0)
    layer = _layer(plan)
    x = _x()
    forward = functools.partial(layer.forward, metrics=True)
    layer.eval()
    eval_out, metrics = forward(x)
    assert float(metrics["drop_fraction"]) == 0.0
    layer.train()
    (a, metrics), b = forward(x), layer(x)
    assert float(metrics["drop_fraction"]) > 0.1  # capacity 4 of 10 tokens x 2 choices over 4 experts
    assert not np.allclose(a, b)  # fresh router noise each call
    layer.eval()
    np.testing.assert_array_equal(layer(x), eval_out)


def _sparse_tiny(**plan_fields) -> ModelConfig:
    cfg = preset("tiny")
    plan = MoEPlan(**{"num_experts": E, "top_k": 2, **plan_fields})
    return cfg.replace(vision=dataclasses.replace(cfg.vision, moe=plan), text=dataclasses.replace(cfg.text, moe=plan))


def test_aux_loss_sums_every_layer_and_reaches_the_router():
    cfg = _sparse_tiny(layers=(0, 1), load_balancing_weight=0.5, z_loss_weight=0.1)
    model = CLIP(cfg, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pixels = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 1, 511)

    def loss(params, aux_scale):
        model = nnx.merge(graphdef, params, rest)
        model.set_attributes(records=("moe",), raise_if_not_found=False)
        out = model(pixels, tokens)
        assert len(out.records) == 4  # two MoE blocks in each tower
        return jnp.sum(out.image_features * out.text_features) + aux_scale * moe_aux(out.records)

    grad = jax.jit(jax.grad(loss))  # one compile; the aux scale is traced
    with_aux, without = grad(params, 1.0), grad(params, 0.0)
    router = ("visual", "encoder", "layers", 0, 0, "mlp", "router_kernel")  # blocks 0 and 1: one stack of 2
    flat_a = dict(nnx.to_flat_state(with_aux))
    flat_b = dict(nnx.to_flat_state(without))
    assert not np.allclose(flat_a[router][...], flat_b[router][...])
    expert = ("visual", "encoder", "layers", 0, 0, "mlp", "fc1_kernel")
    assert np.all(np.isfinite(flat_a[expert][...]))


@pytest.mark.parametrize("path", ["expert_loop", "padded"])
def test_text_tokens_after_the_pooled_one_are_not_dispatched(path):
    """At inference a causal text tower routes only the tokens up to its EOT: they alone reach the features."""
    cfg = _sparse_tiny(layers=(0, 1), eval_capacity_factor=None, eval_dispatch=path)
    model = CLIP(cfg, nnx.Rngs(0))
    t = cfg.text
    ends = np.array([3, 9, t.context_length - 1])
    tokens = np.random.RandomState(0).randint(1, t.vocab_size - 1, (len(ends), t.context_length)).astype(np.int32)
    tokens[np.arange(len(ends)), ends] = t.vocab_size - 1  # the EOT: the largest id, where the text is pooled

    def text_tower(train: bool, records: tuple[str, ...] = ()):
        model.train() if train else model.eval()
        model.set_attributes(records=records, raise_if_not_found=False)
        graphdef, state = nnx.split(model)
        return jax.jit(lambda state, tokens: nnx.merge(graphdef, state).text(tokens))

    def drop_fractions(train: bool) -> list[float]:
        _, records = text_tower(train, ("moe",))(nnx.state(model), tokens)
        return [float(r["moe"]["drop_fraction"]) for r in records.values()]

    unrouted = np.mean(1 - (ends + 1) / t.context_length)  # the captions' mean share of tokens after the EOT
    # Each MoE block drops those tokens, and only those.
    assert drop_fractions(train=False) == pytest.approx([unrouted] * 2)
    encode = text_tower(train=False)
    got = encode(nnx.state(model), tokens)[0]
    # Reference: each caption cut after its EOT, where every token is routed.
    want = np.concatenate([encode(nnx.state(model), tokens[i:i + 1, :end + 1])[0] for i, end in enumerate(ends)])
    # The widest reduction is the MLP's (mlp_dim terms), chained about 12 times through the tower, as in
    # test_clip's truncation test; the MoE blocks add no longer one (gates over k=2).
    assert_close(got, want, reduction_bound(t.mlp_dim, chain=12), "text features")
    # Training routes every token (the recipe's capacity and aux losses count them all): masking there would drop
    # at least the unrouted share; capacity alone drops less.
    assert max(drop_fractions(train=True)) < unrouted


def test_shared_backbone_holds_one_encoder():
    cfg = preset("tiny")
    text = dataclasses.replace(cfg.text, width=48, heads=3, mlp_dim=96)
    plan = MoEPlan(num_experts=E, top_k=1)
    shared = cfg.replace(vision=dataclasses.replace(cfg.vision, moe=plan), text=dataclasses.replace(text, moe=plan),
                         shared_backbone=True)
    names = abstract_params(shared)
    prefixes = {n.split("/encoder/")[0] for n in names if "/encoder/" in n}
    assert len(prefixes) == 1  # the shared encoder is stored once, under one tower
    assert sum("router_kernel" in n for n in names) == 1
    model = CLIP(shared, nnx.Rngs(0))
    model.set_attributes(records=("moe",), raise_if_not_found=False)
    out = model(jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 16), jnp.int32))
    assert sorted(out.records) == ["visual/encoder/blocks/1/mlp", "visual/encoder/blocks/1/mlp#1"]  # per modality
    with pytest.raises(ConfigError, match="shared_backbone"):
        cfg.replace(shared_backbone=True).validate()


@pytest.mark.parametrize("fields, match", [
    ({"dispatch": "magic"}, "moe.dispatch"),
    ({"router": "hash"}, "moe.router"),
    ({"capacity_factor": 0.0}, "moe.capacity_factor"),
    ({"eval_capacity_factor": -1.0}, "moe.eval_capacity_factor"),
    ({"top_k": 5}, "moe.top_k"),
    ({"eval_dispatch": "cutlass"}, "moe.eval_dispatch"),
    ({"load_weight": 0.1}, "router_noise_std"),
])
def test_bad_moe_config(fields, match):
    with pytest.raises(ConfigError, match=match):
        _sparse_tiny(**fields).validate()


def test_text_tower_refuses_expert_choice():
    cfg = preset("tiny")
    plan = MoEPlan(num_experts=E, router="expert_choice")
    with pytest.raises(ConfigError, match="causal"):
        cfg.replace(text=dataclasses.replace(cfg.text, moe=plan)).validate()


def test_remat_changes_memory_not_results():
    cfg = _sparse_tiny(layers=(1,))
    pixels = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    tokens = jnp.ones((2, 16), jnp.int32)
    results = []
    for remat in ("none", "full"):
        graphdef, params, rest = nnx.split(CLIP(cfg, nnx.Rngs(0), remat=remat), nnx.Param, ...)

        def loss(params):
            model = nnx.merge(graphdef, params, rest)
            model.set_attributes(records=("moe",), raise_if_not_found=False)
            out = model(pixels, tokens)
            return jnp.sum(out.image_features * out.text_features) + moe_aux(out.records)

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    # Remat recomputes the same forward ops; XLA may fuse them differently. The tiny preset's longest reduction is
    # its patch embedding (8 * 8 * 3), chained ~2 x 12 times through both towers and back.
    bound = reduction_bound(8 * 8 * 3, chain=24)
    assert_close(results[1][0], results[0][0], bound, "loss")
    assert_trees_close(results[1][1], results[0][1], bound, "grad")
