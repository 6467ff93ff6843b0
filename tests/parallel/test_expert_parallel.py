"""Expert parallelism on 8 simulated CPU devices: both transports equal the single-device
`dispatch.padded` layer (forward and gradients), keep the experts sharded, and emit the intended
collectives."""

import dataclasses
import functools
import re

import jax

assert len(jax.devices()) >= 8, (
    f"tests/parallel needs 8 devices but JAX sees {len(jax.devices())}: tests/conftest.py must set "
    "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported (run pytest from the repo root)")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from clipup_jax.models import dispatch, routing  # noqa: E402
from clipup_jax.models import expert_parallel as ep  # noqa: E402
from clipup_jax.parallel.mesh import make_mesh, resolve_shape  # noqa: E402
from tests.numerics import assert_close, assert_trees_close, reduction_bound  # noqa: E402

G, S, D, F, K = 8, 6, 8, 16, 2
ACT = jax.nn.gelu
# One layer: reductions over F and over the G * S tokens (expert gradients), ~6 chained forward and back; the
# transports change only where the token sums happen.
BOUND = reduction_bound(G * S, chain=6)

# (mesh shape, number of experts)
CONFIGS = [
    ({"data": 2, "expert": 4}, 8),
    ({"data": 1, "expert": 8}, 8),
    ({"data": 4, "expert": 2}, 8),
    ({"data": 1, "expert": 8}, 4),  # E < EP: each expert on 2 devices
    ({"data": 2, "expert": 4}, 16),  # 4 experts per device
]


@functools.lru_cache(maxsize=None)
def _mesh(shape_items: tuple, axis_types: str = "auto"):
    return make_mesh(dict(shape_items), axis_types=axis_types)


@functools.partial(jax.jit, static_argnums=1)
def _route(logits, capacity: int):
    return jax.vmap(lambda l: routing.top_k_routing(l, K, capacity))(logits)


@functools.lru_cache(maxsize=None)
def _problem(num_experts: int, capacity: int, seed: int = 0, imbalanced: bool = False):
    rng = np.random.default_rng(seed)  # numpy, not jax.random: eager jax.random compiles per shape

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale)

    x = normal(G, S, D)
    logits = normal(G, S, num_experts)
    if imbalanced:  # every token's first choice is expert 0, its second expert 1; the rest get nothing
        logits = logits * 0.1 + jnp.zeros(num_experts).at[0].set(10.0).at[1].set(5.0)
    r = _route(logits, capacity)
    w = dispatch.ExpertWeights(fc1=normal(num_experts, D, F, scale=0.3), b1=normal(num_experts, F, scale=0.1),
                               fc2=normal(num_experts, F, D, scale=0.3), b2=normal(num_experts, D, scale=0.1))
    cotangent = normal(G, S, D)
    return x, r, w, cotangent


def _fwd_bwd(layer, capacity: int):
    """jit of (x, r, w, cotangent) -> (y, (dx, dgate, dw)) for `layer(x, r, capacity, w)`."""

    def run(x, r, w, cotangent):
        def f(x, gate, w):
            return layer(x, dataclasses.replace(r, gate=gate), capacity, w)

        y, vjp = jax.vjp(f, x, r.gate, w)
        return y, vjp(cotangent)

    return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _reference(capacity: int):
    return _fwd_bwd(lambda x, r, c, w: dispatch.padded(x, r, c, w, ACT), capacity)


@functools.lru_cache(maxsize=None)
def _expert_parallel(shape_items: tuple, transport: str, capacity: int, axis_types: str = "auto"):
    mesh = _mesh(shape_items, axis_types)
    return _fwd_bwd(lambda x, r, c, w: ep.expert_parallel_mlp(x, r, c, w, ACT, mesh=mesh, transport=transport),
                    capacity)


def _place(mesh, x, r, w, cotangent):
    tokens = NamedSharding(mesh, ep.token_spec(mesh))
    x, cotangent = jax.device_put((x, cotangent), tokens)
    r = jax.device_put(r, tokens)  # (G, S, k) and (G, S, E) arrays: split on groups
    w = jax.device_put(w, ep.expert_weight_shardings(mesh, w.fc1.shape[0]))
    return x, r, w, cotangent


def _check_equal(got, want):
    assert_trees_close(got, want, BOUND, "layer")


@pytest.mark.parametrize("transport", ep.TRANSPORTS)
@pytest.mark.parametrize("shape,num_experts", CONFIGS, ids=lambda v: "x".join(f"{k}{n}" for k, n in v.items())
                         if isinstance(v, dict) else f"E{v}")
def test_matches_single_device(shape, num_experts, transport):
    capacity = 3
    x, r, w, ct = _problem(num_experts, capacity, seed=num_experts)
    want = _reference(capacity)(x, r, w, ct)
    mesh = _mesh(tuple(shape.items()))
    got = _expert_parallel(tuple(shape.items()), transport, capacity)(*_place(mesh, x, r, w, ct))
    _check_equal(got, want)
    # Gradients come back sharded like the inputs: tokens on the group axes, experts on `expert`.
    y, (dx, _, dw) = got
    tokens = NamedSharding(mesh, ep.token_spec(mesh))
    assert y.sharding.is_equivalent_to(tokens, 3) and dx.sharding.is_equivalent_to(tokens, 3)
    for g, s in zip(dw, ep.expert_weight_shardings(mesh, num_experts)):
        assert g.sharding.is_equivalent_to(s, g.ndim), (g.sharding, s)


@pytest.mark.parametrize("transport", ep.TRANSPORTS)
@pytest.mark.parametrize("shape,num_experts", [CONFIGS[0], CONFIGS[3]], ids=["data2xexpert4-E8", "expert8-E4"])
def test_imbalanced_routing_drops_and_empty_experts(shape, num_experts, transport):
    capacity = 2  # expert 0 takes 6 first choices per group in 2 slots: 4 dropped
    x, r, w, ct = _problem(num_experts, capacity, seed=1, imbalanced=True)
    assert bool(jnp.all(r.expert_index[..., 0] == 0)) and bool(jnp.all(r.expert_index[..., 1] == 1))
    assert float(routing.drop_fraction(r).mean()) > 0.3
    want = _reference(capacity)(x, r, w, ct)
    mesh = _mesh(tuple(shape.items()))
    got = _expert_parallel(tuple(shape.items()), transport, capacity)(*_place(mesh, x, r, w, ct))
    _check_equal(got, want)
    _, (_, _, dw) = got
    for g in dw:
        g = np.asarray(g)
        assert np.all(g[2:] == 0.0), "experts that receive no token must get exactly zero gradient"
        assert np.any(g[:2] != 0.0)


def test_each_device_holds_only_its_experts():
    shape, num_experts = CONFIGS[4]  # 16 experts on expert=4: 4 per device, replicated over data
    mesh = _mesh(tuple(shape.items()))
    x, r, w, ct = _problem(num_experts, 3, seed=num_experts)
    placed = _place(mesh, x, r, w, ct)
    _, (_, _, dw) = _expert_parallel(tuple(shape.items()), "all_to_all", 3)(*placed)
    local = num_experts // mesh.shape["expert"]
    expert_of = {d.id: j for (_, j), d in np.ndenumerate(mesh.devices)}  # device -> expert-axis index
    for fc1 in (placed[2].fc1, dw.fc1):
        assert len(fc1.addressable_shards) == 8
        for shard in fc1.addressable_shards:
            j = expert_of[shard.device.id]
            assert shard.data.shape == (local, D, F)
            assert shard.index[0] == slice(j * local, (j + 1) * local)
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(fc1)[j * local:(j + 1) * local])
    # E < EP: weights are replicated (each device computes with one expert's copy).
    assert ep.expert_weight_specs(4, 8).fc1 == P(None, None, None)
    assert ep.expert_weight_specs(16, 4).b1 == P("expert", None)


@pytest.mark.parametrize("transport,collectives", [("all_to_all", ["all-to-all"]),
                                                   ("allgather", ["all-gather", "reduce-scatter"])])
def test_compiled_collectives(transport, collectives):
    shape, num_experts = CONFIGS[0]
    mesh = _mesh(tuple(shape.items()))
    x, r, w, _ = _problem(num_experts, 3)
    x, r, w, _ = _place(mesh, x, r, w, x)
    f = jax.jit(lambda x, r, w: ep.expert_parallel_mlp(x, r, 3, w, ACT, mesh=mesh, transport=transport))
    hlo = f.lower(x, r, w).compile().as_text()
    found = set(re.findall(r"\b(all-to-all|all-gather|reduce-scatter)\b", hlo))
    assert found == set(collectives), found


def test_explicit_axes_and_unplaced_inputs_under_jit():
    """Explicit mesh axes, tokens computed inside jit from a replicated input: the layer reshards at
    its boundary and returns the input's sharding, so the residual add type-checks."""
    shape, num_experts = CONFIGS[0]
    mesh = _mesh(tuple(shape.items()), "explicit")
    x, _, w, _ = _problem(num_experts, 3)
    router = jnp.asarray(np.random.default_rng(5).standard_normal((D, num_experts), dtype=np.float32))

    def model(x, w, layer):
        h = jnp.tanh(2 * x)
        r = jax.vmap(lambda l: routing.top_k_routing(l, K, 3))(h @ router)
        return h + layer(h, r, w)

    want = jax.jit(model, static_argnums=2)(x, w, lambda h, r, w: dispatch.padded(h, r, 3, w, ACT))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        ws = jax.device_put(w, ep.expert_weight_shardings(mesh, num_experts))
        got = jax.jit(model, static_argnums=2)(
            xs, ws, lambda h, r, w: ep.expert_parallel_mlp(h, r, 3, w, ACT, transport="all_to_all"))
    assert_close(got, want, BOUND, "output")
    assert got.sharding.spec == P("data", None, None)


def test_incompatible_expert_count_raises():
    mesh = _mesh((("data", 2), ("expert", 4)))
    x, r, w, _ = _problem(6, 3)
    with pytest.raises(ValueError, match=r"num_experts=6 .*'expert' mesh axis of size 4"):
        ep.expert_parallel_mlp(x, r, 3, w, ACT, mesh=mesh)
    with pytest.raises(ValueError, match="num_experts=3"):
        ep.expert_weight_specs(3, 4)
    with pytest.raises(ValueError, match="transport"):
        ep.expert_parallel_mlp(x, r, 3, w, ACT, mesh=mesh, transport="ragged")
    x, r, w, _ = _problem(8, 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        ep.expert_parallel_mlp(x[:4], jax.tree.map(lambda a: a[:4], r), 3, w, ACT, mesh=mesh)


def test_make_mesh_shapes():
    assert resolve_shape({"data": -1, "expert": 4}, 8) == {"data": 2, "expert": 4}
    mesh = make_mesh({"data": 2, "expert": -1})
    assert dict(mesh.shape) == {"data": 2, "expert": 4}
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
    assert set(make_mesh({"expert": 8}, axis_types="explicit").axis_types) == {jax.sharding.AxisType.Explicit}
    with pytest.raises(ValueError, match="multiply to the device count"):
        make_mesh({"data": 2, "expert": 2})
    with pytest.raises(ValueError, match="not divisible"):
        make_mesh({"data": 3, "expert": -1})
    with pytest.raises(ValueError, match="at most one"):
        make_mesh({"data": -1, "expert": -1})


@pytest.mark.parametrize("plan", [
    dict(eval_dispatch="einsum"), dict(eval_dispatch="padded"), dict(eval_dispatch="ragged_dot"),
    dict(eval_dispatch="dense_reference"), dict(router="expert_choice"),
], ids=lambda p: "-".join(p.values()))
def test_moe_layer_on_an_explicit_data_mesh(plan):
    """Without an expert axis the layer runs its single-device dispatch on group-sharded tokens; under Explicit
    axes the per-group gathers and scatters of routing and dispatch must still type-check and equal one device."""
    from flax import nnx

    from clipup_jax.config import MoEPlan
    from clipup_jax.models.moe import MoeMlp

    layer = MoeMlp(D, F, 2, "gelu", MoEPlan(num_experts=4, top_k=K, **plan), nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((G, S, D), dtype=np.float32))

    def apply(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x) ** 2)

    want, want_grad = jax.jit(jax.value_and_grad(apply, argnums=(0, 1)))(state, x)
    mesh = _mesh((("data", 8),), "explicit")
    with jax.set_mesh(mesh):
        got, got_grad = jax.jit(jax.value_and_grad(apply, argnums=(0, 1)))(
            state, jax.device_put(x, NamedSharding(mesh, P("data"))))
    assert_close(got, want, BOUND, "loss")
    assert_trees_close(got_grad, want_grad, BOUND, "grad")
    assert got_grad[1].sharding.spec[0] == "data"


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
def test_expert_loop_runs_per_device_on_a_data_mesh(axis_types):
    """`expert_loop` sorts rows by expert; on a mesh that splits the batch it must sort each device's own groups
    (a shard_map over the batch axes), equal one device in value and gradient, and keep the batch sharding."""
    from flax import nnx

    from clipup_jax.config import MoEPlan
    from clipup_jax.models.moe import MoeMlp

    layer = MoeMlp(D, F, 2, "gelu", MoEPlan(num_experts=4, top_k=K, eval_capacity_factor=None,
                                             eval_dispatch="expert_loop"), nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((G, S, D), dtype=np.float32))
    apply = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    grad = jax.jit(jax.grad(lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x) ** 2), argnums=(0, 1)))
    want, want_grad = apply(state, x), grad(state, x)
    mesh = _mesh((("data", 4), ("fsdp", 2)), axis_types)
    with jax.set_mesh(mesh):
        placed = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
        lowered = apply.lower(state, placed)
        got, got_grad = apply(state, placed), grad(state, placed)
    assert_close(got, want, BOUND, "features")
    assert_trees_close(got_grad, want_grad, BOUND, "grad")
    assert got.sharding.spec[0] == ("data", "fsdp")
    # GSPMD sorting the whole batch would gather the tokens (an all-gather, or an all-reduce of masked rows); only
    # the router's (G, S, E) logits may travel.
    gathered = re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} all-(?:gather|reduce)\(", lowered.compile().as_text())
    assert not [shape for shape in gathered if shape.endswith(f",{D}")], gathered
