"""Scanning repeated blocks is only an execution strategy: the same stacked parameters give the same outputs,
gradients, MoE metrics and RNG updates as the python loop, under every remat policy and on an expert-parallel
mesh, and the scanned program does not grow with depth."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from clipup_jax.config import ModelConfig, MoEPlan, TextConfig, VisionConfig
from clipup_jax.models import CLIP
from clipup_jax.models.encoder import Block, Encoder, Segment, for_inference, plan_segments
from clipup_jax.models.moe import moe_aux
from clipup_jax.models.towers import VisionTower
from clipup_jax.parallel.mesh import make_mesh
from clipup_jax.parallel.sharding import batch_spec, param_shardings
from clipup_jax.train.step import TrainState, make_train_step
from tests.numerics import assert_close, assert_trees_close, assert_trees_equal, reduction_bound

PLAN = MoEPlan(layers="every_2", num_experts=4, top_k=2, capacity_factor=1.0, eval_capacity_factor=1.0,
               router_noise_std=0.5, load_balancing_weight=0.1, z_loss_weight=0.01)
VISION = VisionConfig(image_size=16, patch_size=8, width=32, depth=4, heads=2, mlp_dim=64)
TEXT = TextConfig(vocab_size=64, context_length=8, width=32, depth=4, heads=2, mlp_dim=64)
# Longest reduction: the patch embedding (8 * 8 * 3 terms); a 4-block tower chains ~4 reductions per block plus
# embedding, pooling and loss, twice over for the backward pass.
FWD_BOUND = reduction_bound(8 * 8 * 3, chain=4 * 4 + 4)
GRAD_BOUND = reduction_bound(8 * 8 * 3, chain=2 * (4 * 4 + 4))
# Equality tests, not speed tests: XLA's cheapest CPU codegen keeps each compile of these tiny models short.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _cfg(plan: MoEPlan | None = PLAN, depth: int = 4) -> ModelConfig:
    return ModelConfig(vision=dataclasses.replace(VISION, depth=depth, moe=plan),
                       text=dataclasses.replace(TEXT, depth=depth, moe=plan), embed_dim=16)


def _inputs(batch: int = 8) -> tuple[jax.Array, jax.Array]:
    pixels = jnp.asarray(np.random.RandomState(0).randn(batch, 16, 16, 3), jnp.float32)
    tokens = jnp.asarray(np.random.RandomState(1).randint(1, 64, (batch, 8)), jnp.int32)
    return pixels, tokens


def _run(f, *args):
    lowered = jax.jit(f).lower(*args)
    return lowered.as_text(), lowered.compile(FAST_COMPILE)(*args)


def _build(cfg: ModelConfig | VisionConfig, scan: bool, remat: str) -> nnx.Module:
    if isinstance(cfg, VisionConfig):
        return VisionTower(cfg, 16, "quick_gelu", 1e-5, nnx.Rngs(0, router=1), scan=scan, remat=remat)
    return CLIP(cfg, nnx.Rngs(0, router=1), scan=scan, remat=remat)


@functools.cache
def _split(cfg: ModelConfig | VisionConfig, scan: bool = False, remat: str = "none"):
    """(graphdef, params, rest) of a CLIP (or a vision tower); a scanned model reuses the loop model's state,
    after checking that its parameter tree (names, shapes) is the loop model's: the layout does not change."""
    if not scan and remat == "none":
        return nnx.split(_build(cfg, False, "none"), nnx.Param, ...)
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: _build(cfg, scan, remat)), nnx.Param, ...)
    _, own_params, own_rest = _split(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(own_params)
    assert [a.shape for a in jax.tree.leaves(params)] == [a.shape for a in jax.tree.leaves(own_params)]
    return graphdef, own_params, own_rest




def test_plan_segments():
    assert plan_segments((False,) * 6) == (Segment(0, 1, 6),)
    assert plan_segments((False, True) * 3) == (Segment(0, 2, 3),)  # every_2: dense+MoE pairs
    assert plan_segments((True,) * 4) == (Segment(0, 1, 4),)
    assert plan_segments((False, True) * 2 + (False,)) == (Segment(0, 2, 2), Segment(4, 1, 1))  # odd depth
    assert plan_segments((False,) * 3 + (True,)) == (Segment(0, 1, 3), Segment(3, 1, 1))  # last_1: scan + loop
    assert plan_segments((False, False, True, True)) == (Segment(0, 1, 2), Segment(2, 1, 2))  # last_2
    assert plan_segments((False, True, True, False)) == (Segment(0, 1, 1), Segment(1, 1, 2), Segment(3, 1, 1))


def test_bad_remat_policy_names_the_config_field():
    with pytest.raises(ValueError, match=r"config\.remat.*'none', 'full', 'dots'"):
        Encoder(32, 2, 64, 2, "gelu", 1e-5, nnx.Rngs(0), remat="everything")


@functools.cache  # the loop reference is shared by the remat cases
def _tower_value_and_grad(cfg: VisionConfig, **flags):
    graphdef, params, rest = _split(cfg, **flags)
    pixels = _inputs()[0]

    def loss(p):
        tower = nnx.merge(graphdef, p, rest)
        tower.set_attributes(records=("moe",), raise_if_not_found=False)
        out, records = tower(pixels)
        per_layer = {i: r["moe"] for i, r in records.items() if r}
        return jnp.sum(jnp.sin(3 * out)) + moe_aux(records), per_layer

    return nnx.merge(graphdef, params, rest), _run(jax.value_and_grad(loss, has_aux=True), params)[1]


DENSE_TOWER = dataclasses.replace(VISION, depth=3)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_dense_tower_scan_equals_loop_under_each_remat_policy(remat):
    _, ((want, _), want_grads) = _tower_value_and_grad(DENSE_TOWER)
    tower, ((got, _), got_grads) = _tower_value_and_grad(DENSE_TOWER, scan=True, remat=remat)
    assert tower.encoder.segments == (Segment(0, 1, 3),) and tower.encoder.remat == remat
    assert_close(got, want, FWD_BOUND, "value")
    assert_trees_close(got_grads, want_grads, GRAD_BOUND, "grad")


def test_last_n_plan_mixes_scan_and_loop():
    """last_1: dense blocks 0-2 scanned, the MoE block 3 in the loop (remat applies to both)."""
    cfg = dataclasses.replace(VISION, moe=dataclasses.replace(PLAN, layers="last_1"))
    _, ((want, want_layers), want_grads) = _tower_value_and_grad(cfg)
    tower, ((got, got_layers), got_grads) = _tower_value_and_grad(cfg, scan=True, remat="dots")
    assert tower.encoder.segments == (Segment(0, 1, 3), Segment(3, 1, 1))
    assert_close(got, want, FWD_BOUND, "value")
    assert list(got_layers) == [3]
    assert_trees_close(got_layers, want_layers, FWD_BOUND, "moe metrics")
    assert_trees_close(got_grads, want_grads, GRAD_BOUND, "grad")


def _clip_value_and_grad(cfg: ModelConfig, scan: bool):
    """Loss (contrastive-like + MoE aux), per-layer metrics, the non-Param state after the call, and gradients,
    in train mode (train capacity, router noise)."""
    graphdef, params, rest = _split(cfg, scan=scan)
    pixels, tokens = _inputs()
    mix = jnp.asarray(np.random.RandomState(2).randn(8, 8), jnp.float32)

    def loss(params):
        model = nnx.merge(graphdef, params, rest, copy=True)  # copy: the call advances RNG counters in place
        model.set_attributes(deterministic=False, records=("moe",), raise_if_not_found=False)
        out = model(pixels, tokens)
        per_layer = {layer: r["moe"] for layer, r in out.records.items()}
        aux = moe_aux(out.records)
        value = jnp.sum(out.image_features @ out.text_features.T * mix) + aux
        return value, (aux, per_layer, nnx.state(model, nnx.Not(nnx.Param)))

    return _run(jax.value_and_grad(loss, has_aux=True), params)[1]


def test_sparse_clip_every_2_scan_equals_loop():
    """Top-2 MoE every other block of both towers: value, gradients, aux total, every layer's metrics (same
    names) and the advanced router RNG counters all match."""
    want_value, (want_aux, want_layers, want_rest) = (want := _clip_value_and_grad(_cfg(), False))[0]
    got_value, (got_aux, got_layers, got_rest) = (got := _clip_value_and_grad(_cfg(), True))[0]
    assert sorted(got_layers) == sorted(want_layers) == [
        f"{t}/encoder/blocks/{i}/mlp" for t in ("text", "visual") for i in (1, 3)]
    assert float(want_aux) > 0
    assert_close(got_value, want_value, FWD_BOUND, "value")
    assert_close(got_aux, want_aux, FWD_BOUND, "aux")
    assert_trees_close(got_layers, want_layers, FWD_BOUND, "moe metrics")
    assert_trees_equal(got_rest, want_rest, "rng state")  # counters and keys: exact
    counts = [leaf for leaf in jax.tree.leaves(got_rest) if leaf.dtype == jnp.uint32]
    # One stacked counter per tower's MoE stack, one entry per layer: each MoE layer drew its noise once.
    assert [c.tolist() for c in counts] == [[1, 1], [1, 1]]
    assert_trees_close(got[1], want[1], GRAD_BOUND, "grad")


def test_train_step_on_expert_parallel_mesh_scanned_equals_loop():
    """`make_train_step`, jitted on data 2 x expert 4: the all-to-all expert-parallel MoE runs inside the scan
    body, and loss, aux loss, every MoE metric and the gradients (recovered from one SGD step) match the loop."""
    cfg = _cfg(dataclasses.replace(PLAN, router_noise_std=0.0))
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, moe=None))  # text MoE: covered above
    mesh = make_mesh({"data": 2, "expert": 4})
    shardings = param_shardings(cfg, mesh)
    tx = optax.sgd(1.0)  # new params = params - gradients
    pixels, tokens = _inputs()
    batch = {"pixels": jax.device_put(pixels, NamedSharding(mesh, batch_spec(mesh, 4))),
             "tokens": jax.device_put(tokens, NamedSharding(mesh, batch_spec(mesh, 2)))}
    _, params, _ = _split(cfg)  # built outside the mesh: eager init ops reuse their single-device compiles
    params = nnx.from_flat_state([(path, var.replace(jax.device_put(var.get_value(), shardings[
        "/".join(map(str, path))]))) for path, var in nnx.to_flat_state(params)])
    results = []
    with jax.set_mesh(mesh):
        for scan in (False, True):
            graphdef, _, rest = _split(cfg, scan=scan)
            state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), rest)
            step = make_train_step(graphdef, tx, "clip", optax.constant_schedule(1.0))

            def step_and_grads(state, batch):
                new_state, metrics, _ = step(state, batch)
                return metrics, jax.tree.map(jnp.subtract, state.params, new_state.params)

            text, (metrics, grads) = _run(step_and_grads, state, batch)
            results.append((text, metrics, grads))
    (_, want, want_grads), (text, got, got_grads) = results
    assert "all_to_all" in text and "stablehlo.while" in text
    assert sorted(got) == sorted(want) and sum(k.startswith("moe/") for k in got) == 2 * 5  # 2 layers x 5 metrics
    assert float(want["aux_loss"]) > 0
    assert_trees_close(got, want, FWD_BOUND, "metrics")
    assert_trees_close(got_grads, want_grads, GRAD_BOUND, "grad")
    kernel = got_grads["visual"]["encoder"]["layers"][0][1]["mlp"]["fc1_kernel"][...]
    assert kernel.shape[:2] == (2, 4) and tuple(kernel.sharding.spec)[:2] == (None, "expert")  # layers, experts


def _lowered_size(depth: int, scan: bool) -> tuple[int, str]:
    """Length of the StableHLO of a sparse (every_2) vision tower's forward+backward, lowered abstractly."""
    cfg = dataclasses.replace(VISION, depth=depth, moe=PLAN)
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: _build(cfg, scan, "none")), nnx.Param, ...)
    pixels = _inputs()[0]

    def loss(p, r):
        tower = nnx.merge(graphdef, p, r)
        tower.set_attributes(records=("moe",), raise_if_not_found=False)
        out, records = tower(pixels)
        return jnp.sum(out) + moe_aux(records)

    text = jax.jit(jax.grad(loss)).lower(params, rest).as_text()
    return len(text), text


def test_scanned_program_does_not_grow_with_depth():
    scanned = {d: _lowered_size(d, True) for d in (4, 8)}
    unrolled = {d: _lowered_size(d, False)[0] for d in (4, 8)}
    assert "stablehlo.while" in scanned[8][1]
    scanned_growth, unrolled_growth = scanned[8][0] / scanned[4][0], unrolled[8] / unrolled[4]
    assert unrolled_growth > 1.6, unrolled_growth  # the comparison can tell: unrolled doubles with depth
    assert scanned_growth < 1.25, scanned_growth


def test_inference_form_computes_the_same_features_without_slicing_a_stack():
    """`for_inference` (XLA:CPU): each layer gets its own buffers, and each expert of a layer `expert_loop` runs,
    so the inference program slices no stacked parameter (a copy of the weights per call there); the features
    are the stacked model's, bitwise."""
    model = _build(_cfg(), False, "none")
    inference = for_inference(model)
    pixels, tokens = _inputs()
    np.testing.assert_array_equal(inference.encode_image(pixels), model.encode_image(pixels))
    np.testing.assert_array_equal(inference.encode_text(tokens), model.encode_text(tokens))
    assert isinstance(model.visual.encoder.layers[0][1], Block)  # the given model keeps its stacks
    experts = inference.visual.encoder.layers[0][1][1].mlp.fc1_kernel  # block 3's experts
    assert [e[...].shape for e in experts] == [(32, 64)] * 4

    def sliced_arguments(m: nnx.Module) -> int:
        graphdef, state = nnx.split(m)
        text = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x)).lower(state, pixels).as_text()
        return len(re.findall(r"stablehlo\.slice %arg", text))

    assert sliced_arguments(model) > 0 and sliced_arguments(inference) == 0
