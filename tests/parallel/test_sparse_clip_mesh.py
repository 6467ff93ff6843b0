"""A sparse CLIP on simulated 8-device meshes computes what it computes on one device."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from clipup_jax.checkpoints.params import model_from_params
from clipup_jax.config import MoEPlan, preset
from clipup_jax.models import CLIP
from clipup_jax.models.moe import moe_aux
from clipup_jax.models.param_tree import params_of
from clipup_jax.parallel.mesh import make_mesh
from clipup_jax.parallel.sharding import batch_spec, logical_to_spec, param_shardings, shard_params
from tests.numerics import assert_close, reduction_bound

assert len(jax.devices()) >= 8, (
    f"these tests need 8 devices, got {len(jax.devices())}: run under tests/conftest.py, which sets "
    "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported")


# The tiny preset, forward and backward: longest reduction the patch embedding (8 * 8 * 3), ~2 x 12 chained.
GRAD_BOUND = reduction_bound(8 * 8 * 3, chain=24)


def _sparse_cfg(transport: str, imbalanced: bool = False):
    cfg = preset("tiny")
    plan = MoEPlan(num_experts=8, top_k=2, eval_capacity_factor=0.5 if imbalanced else None, ep_transport=transport,
                   load_balancing_weight=0.1, z_loss_weight=0.01)
    return cfg.replace(vision=dataclasses.replace(cfg.vision, moe=plan), text=dataclasses.replace(cfg.text, moe=plan))


def _loss_fn(graphdef, rest):
    def loss(params, pixels, tokens):
        model = nnx.merge(graphdef, params, rest)
        model.set_attributes(records=("moe",), raise_if_not_found=False)
        out = model(pixels, tokens)
        aux = moe_aux(out.records)
        logits = out.logit_scale * out.image_features @ out.text_features.T
        labels = jnp.arange(logits.shape[0])
        ce = -jnp.mean(jax.nn.log_softmax(logits)[labels, labels]) - jnp.mean(jax.nn.log_softmax(logits.T)[labels, labels])
        return ce + aux
    return loss


def _inputs():
    pixels = jnp.asarray(np.random.RandomState(0).randn(8, 32, 32, 3), jnp.float32)
    tokens = jnp.asarray(np.random.RandomState(1).randint(1, 511, (8, 16)), jnp.int32)
    return pixels, tokens


def _single_device(cfg, params):
    model = model_from_params(cfg, params)
    graphdef, p, rest = nnx.split(model, nnx.Param, ...)
    return jax.jit(jax.value_and_grad(_loss_fn(graphdef, rest)))(p, *_inputs())


def _skew_routers(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Peaky routers that favour low-numbered experts, so a small capacity drops many tokens.

    No exact ties between experts: under GSPMD the router's top-k may be computed sharded, and a
    tie may then be broken differently than on one device (a different, equally valid routing).
    """
    params = dict(params)
    rng = np.random.RandomState(3)
    for name in params:
        if name.endswith("router_kernel"):
            *layers, d, e = params[name].shape
            params[name] = (rng.randn(*layers, d, e) + np.linspace(3.0, -3.0, e) * rng.rand(*layers, d, 1)
                            ).astype(np.float32)
    return params


@pytest.mark.parametrize("shape, transport, imbalanced", [
    ({"data": 2, "expert": 4}, "all_to_all", False),
    ({"data": 1, "expert": 8}, "all_to_all", True),
    ({"data": 4, "expert": 2}, "allgather", False),
    ({"fsdp": 2, "expert": 4}, "allgather", True),
])
def test_mesh_equals_single_device(shape, transport, imbalanced):
    cfg = _sparse_cfg(transport, imbalanced)
    params = params_of(CLIP(cfg, nnx.Rngs(0)))
    if imbalanced:
        params = _skew_routers(params)
    want_loss, want_grads = _single_device(cfg, params)
    if imbalanced:
        model = model_from_params(cfg, params)
        model.set_attributes(records=("moe",), raise_if_not_found=False)
        drops = [float(r["moe"]["drop_fraction"]) for r in model(*_inputs()).records.values()]
        assert min(drops) > 0.1, drops  # the case exercises dropping for real

    mesh = make_mesh(shape)
    shardings = param_shardings(cfg, mesh)
    with jax.set_mesh(mesh):
        model = model_from_params(cfg, shard_params(params, shardings))
        graphdef, p, rest = nnx.split(model, nnx.Param, ...)
        pixels, tokens = _inputs()
        pixels = jax.device_put(pixels, NamedSharding(mesh, batch_spec(mesh, 4)))
        tokens = jax.device_put(tokens, NamedSharding(mesh, batch_spec(mesh, 2)))
        step = jax.jit(jax.value_and_grad(_loss_fn(graphdef, rest)))
        loss, grads = step(p, pixels, tokens)
        hlo = step.lower(p, pixels, tokens).compile().as_text()

    assert_close(loss, want_loss, GRAD_BOUND, "loss")
    flat_got, flat_want = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(want_grads))
    assert set(flat_got) == set(flat_want)
    for path, want in flat_want.items():
        assert_close(flat_got[path][...], want[...], GRAD_BOUND, str(path))
    expert = ("visual", "encoder", "layers", 1, 0, "mlp", "fc1_kernel")  # block 1, a stack of one
    weight = flat_got[expert][...]
    assert tuple(weight.sharding.spec)[:2] == (None, "expert")
    local = 8 // shape["expert"]
    assert all(s.data.shape[1] == local for s in weight.addressable_shards)  # each device: only its experts
    assert ("all-to-all" if transport == "all_to_all" else "reduce-scatter") in hlo


def test_logical_rules():
    mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    assert logical_to_spec(("expert", "embed", "mlp"), (8, 48, 96), mesh) == P("expert", "fsdp", None)
    assert logical_to_spec(("embed", "mlp"), (48, 96), mesh) == P("fsdp", None)
    assert logical_to_spec(("embed",), (7,), mesh) == P(None)  # 7 is not divisible by fsdp=2: replicated
    assert logical_to_spec(("vocab", "embed"), (512, 40), mesh) == P(None, "fsdp")
    assert batch_spec(mesh, 3) == P(("data", "fsdp", "expert"), None, None)
    single = make_mesh({"data": 8})
    assert logical_to_spec(("expert", "embed", "mlp"), (8, 48, 96), single) == P(None, None, None)


def test_sparse_b16_builds_and_lowers_on_a_mesh():
    """CLIP-UP B/16 (8 experts, top-2, every other block of both towers): parameter count from an abstract
    init, and the forward+backward traced and lowered expert-parallel on (data=2, expert=4), with no FLOPs spent."""
    cfg = preset("ViT-B-16")
    plan = MoEPlan(num_experts=8, top_k=2)
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, moe=plan), text=dataclasses.replace(cfg.text, moe=plan))
    mesh = make_mesh({"data": 2, "expert": 4})
    shardings = param_shardings(cfg, mesh)
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: CLIP(cfg, nnx.Rngs(0)))
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        flat = nnx.to_flat_state(params)
        for path, var in flat:
            name = "/".join(str(p) for p in path)
            var.set_value(jax.ShapeDtypeStruct(var.get_value().shape, jnp.float32, sharding=shardings[name]))
        params = nnx.from_flat_state(flat)
        pixels = jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.float32, sharding=NamedSharding(mesh, batch_spec(mesh, 4)))
        tokens = jax.ShapeDtypeStruct((8, 77), jnp.int32, sharding=NamedSharding(mesh, batch_spec(mesh, 2)))
        lowered = jax.jit(jax.value_and_grad(_loss_fn(graphdef, rest))).lower(params, pixels, tokens)
    total = sum(int(np.prod(v.get_value().shape)) for _, v in flat)
    # Dense B/16 (open_clip: 149.62 M) + 7 extra expert MLPs and a router in 6 blocks of each tower.
    image_experts = 6 * 7 * (2 * 768 * 3072 + 3072 + 768)
    text_experts = 6 * 7 * (2 * 512 * 2048 + 2048 + 512)
    routers = 6 * 768 * 8 + 6 * 512 * 8
    assert total == 149_620_737 + image_experts + text_experts + routers
    assert "all-to-all" in lowered.as_text() or "all_to_all" in lowered.as_text()
