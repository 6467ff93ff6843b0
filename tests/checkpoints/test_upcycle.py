"""Upcycling: rules cover every key, experts preserve the dense function on every dispatch path,
noise and drop-upcycling do what they say, moments are tiled, experts stream and shard lazily."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.checkpoints.format import AdamMoments, load_checkpoint, save_checkpoint
from clipup_jax.checkpoints.lazy import LazyStack
from clipup_jax.checkpoints.params import from_blocks, model_from_params, to_blocks
from clipup_jax.models.param_tree import abstract_params
from clipup_jax.checkpoints.upcycle import TILED, UpcycleOptions, key_rules, upcycle, upcycle_checkpoint
from clipup_jax.config import ConfigError, MoEPlan, preset
from tests.numerics import assert_close, reduction_bound

E = 4
PATHS = ["einsum", "padded", "ragged_dot", "pallas", "expert_loop", "dense_reference"]


def _random_params(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights, biases and norms (no bias is zero, so a mis-tiled bias cannot hide), without a model init."""
    rng = np.random.RandomState(seed)
    params = {}
    for key, shape in abstract_params(cfg).items():
        noise = np.asarray(rng.randn(*shape.shape), np.float32)
        if key.endswith("/scale"):
            params[key] = 1.0 + 0.1 * noise
        elif key == "logit_scale":
            params[key] = np.asarray(np.log(1 / 0.07), np.float32)
        else:
            fan_in = shape.shape[-2] if len(shape.shape) > 1 else 100
            params[key] = noise * (0.1 if key.endswith("bias") else fan_in**-0.5)
    return params


@pytest.fixture(scope="module")
def dense():
    cfg = preset("tiny").replace(activation="gelu")
    params = _random_params(cfg)
    rng = np.random.RandomState(0)
    pixels = rng.randn(3, 32, 32, 3).astype(np.float32)
    tokens = rng.randint(1, 500, (3, 16)).astype(np.int32)
    tokens[0, 5:] = 0
    model = model_from_params(cfg, params)
    want = np.asarray(model.encode_image(pixels)), np.asarray(model.encode_text(tokens))
    return cfg, params, (pixels, tokens), want


def _plan(**changes) -> MoEPlan:
    return MoEPlan(**{"num_experts": E, "top_k": 2, "layers": "every_2", "eval_capacity_factor": None, **changes})


def _blocks(up) -> dict[str, np.ndarray]:
    """The upcycled parameters in the per-block view ('<tower>/encoder/blocks/<i>/...'), experts built."""
    return to_blocks(up.host_params(), up.config)


def _features(cfg, params, inputs):
    model = model_from_params(cfg, params)
    return np.asarray(model.encode_image(inputs[0])), np.asarray(model.encode_text(inputs[1]))


# Forward only, through the tiny preset's two blocks per tower: longest reduction the patch embedding (8 * 8 * 3),
# ~12 chained; the MoE layers add a gate product and a k-term combine whose gates sum to 1 up to rounding.
FEATURES_BOUND = reduction_bound(8 * 8 * 3, chain=12)


def _assert_close(got, want):
    assert_close(got, want, FEATURES_BOUND, "features")


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("path", PATHS)
def test_upcycled_features_equal_dense_on_every_dispatch_path(dense, path, top_k):
    cfg, params, inputs, want = dense
    # A router init far larger than the default spreads the tokens over the experts instead of a favourite pair.
    plan = _plan(top_k=top_k, eval_dispatch=path, router_init_std=1.0)  # features: the inference path
    up = upcycle(cfg, params, UpcycleOptions(plan=plan))
    for got, ref in zip(_features(up.config, up.host_params(), inputs), want):
        _assert_close(got, ref)


@pytest.mark.parametrize("towers", [("vision",), ("text",)])
def test_one_tower_upcycled_the_other_copied(dense, towers):
    cfg, params, inputs, want = dense
    up = upcycle(cfg, params, UpcycleOptions(plan=_plan(router_init_std=1.0), towers=towers))
    assert (up.config.vision.moe is not None) == ("vision" in towers)
    assert (up.config.text.moe is not None) == ("text" in towers)
    routers = {k.split("/")[0] for k in up.params if k.endswith("router_kernel")}
    assert routers == {"visual" if towers == ("vision",) else "text"}
    for got, ref in zip(_features(up.config, up.host_params(), inputs), want):
        _assert_close(got, ref)


def test_rules_tile_copy_and_add_a_router(dense):
    cfg, params, _, _ = dense
    up = upcycle(cfg, params, UpcycleOptions(plan=_plan(layers=(0, 1))))
    # Stacked: both blocks of a tower are MoE, one run of 2 repeats; the expert axis follows the layers axis.
    assert up.params["visual/encoder/layers/0/0/mlp/fc1_kernel"].shape == (2, E, 48, 96)
    assert up.params["visual/encoder/layers/0/0/mlp/router_kernel"].shape == (2, 48, E)
    host, blocks = _blocks(up), to_blocks(params, cfg)
    assert set(host) - set(blocks) == {f"{t}/encoder/blocks/{i}/mlp/router_kernel" for t in ("visual", "text")
                                       for i in (0, 1)}
    for key, value in blocks.items():
        if key.split("/")[-1] in TILED:
            assert host[key].shape == (E, *value.shape) and all(np.array_equal(x, value) for x in host[key])
        else:
            assert np.array_equal(host[key], value)
    for key, value in params.items():
        if "/encoder/layers/" not in key:
            assert up.params[key] is value  # unstacked copied leaves are the dense arrays themselves: no second copy
    router = host["visual/encoder/blocks/0/mlp/router_kernel"]
    assert router.shape == (48, E) and 0.015 < router.std() < 0.025  # default small-normal 0.02, never all-zero
    assert not np.array_equal(router, host["visual/encoder/blocks/1/mlp/router_kernel"])  # one draw per block


def test_unmatched_keys_are_listed(dense):
    cfg, params, _, _ = dense
    with pytest.raises(CheckpointError, match="visual/extra_head.*unexpected|unexpected.*visual/extra_head"):
        upcycle(cfg, {**params, "visual/extra_head": np.zeros(2, np.float32)}, UpcycleOptions(plan=_plan()))
    other = cfg.replace(embed_dim=cfg.embed_dim + 1)  # the rules see every key, and report each mismatch
    sparse = other.replace(vision=dataclasses.replace(other.vision, moe=_plan()))
    with pytest.raises(CheckpointError, match=r"rules cannot map: text/proj/kernel \(40, 25\) from \(40, 24\)"):
        key_rules(cfg, sparse)
    wider = sparse.replace(vision=dataclasses.replace(sparse.vision, mlp_dim=97), embed_dim=cfg.embed_dim)
    with pytest.raises(CheckpointError, match=r"visual/encoder/blocks/1/mlp/fc1_kernel \(4, 48, 97\) from \(48, 96\)"):
        key_rules(cfg, wider)


@pytest.mark.parametrize("bad, needle", [
    (dict(towers=("vision", "audio")), "audio"),
    (dict(drop_upcycling=1.5), "drop-upcycling ratio 1.5"),
    (dict(expert_noise=-0.1), "noise"),
    (dict(plan=_plan(router_init_std=0.0)), "tie"),
    (dict(plan=_plan(layers=(1, 2))), r"vision tower: moe.layers: block indices \[2\]"),
    (dict(plan=_plan(num_experts=2, top_k=3)), "top_k=3"),
])
def test_bad_options_are_refused(dense, bad, needle):
    cfg, params, _, _ = dense
    with pytest.raises(ConfigError, match=needle):
        upcycle(cfg, params, UpcycleOptions(**{"plan": _plan(), **bad}))


def test_already_sparse_is_refused(dense):
    cfg, params, _, _ = dense
    up = upcycle(cfg, params, UpcycleOptions(plan=_plan()))
    with pytest.raises(CheckpointError, match="already sparse"):
        upcycle(up.config, up.host_params(), UpcycleOptions(plan=_plan()))


def test_zero_router_only_with_router_noise(dense):
    cfg, params, _, _ = dense
    up = upcycle(cfg, params, UpcycleOptions(plan=_plan(router_init_std=0.0, router_noise_std=1.0)))
    router = up.params["text/encoder/layers/1/0/mlp/router_kernel"]  # block 1: every_2's MoE block, stacked alone
    assert router.shape == (1, cfg.text.width, E) and not router.any()


def test_noise_and_drop_upcycling_change_features(dense):
    cfg, params, inputs, want = dense
    for extra in (dict(expert_noise=0.05), dict(drop_upcycling=0.5)):
        up = upcycle(cfg, params, UpcycleOptions(plan=_plan(router_init_std=1.0), **extra))
        for got, ref in zip(_features(up.config, up.host_params(), inputs), want):
            assert np.abs(got - ref).max() > 1e-3 * np.abs(ref).max(), extra


def test_expert_noise_touches_kernels_only_and_differs_per_expert(dense):
    cfg, params, _, _ = dense
    host = _blocks(upcycle(cfg, params, UpcycleOptions(plan=_plan(), expert_noise=0.01)))
    blocks = to_blocks(params, cfg)
    block = "visual/encoder/blocks/1/mlp"
    for leaf in ("fc1_bias", "fc2_bias"):
        assert all(np.array_equal(x, blocks[f"{block}/{leaf}"]) for x in host[f"{block}/{leaf}"])
    np.testing.assert_array_equal(host["visual/encoder/blocks/0/mlp/fc1_kernel"],
                                  blocks["visual/encoder/blocks/0/mlp/fc1_kernel"])  # the dense block is untouched
    delta = host[f"{block}/fc1_kernel"] - blocks[f"{block}/fc1_kernel"]
    assert 0.009 < delta.std() < 0.011
    assert not np.allclose(delta[0], delta[1])


def test_drop_upcycling_reinitialises_a_different_subset_per_expert(dense, tmp_path):
    cfg, params, _, _ = dense
    ratio, f = 0.25, cfg.text.mlp_dim
    ones = {k: np.ones_like(v) for k, v in params.items()}
    moments = AdamMoments(5, ones, ones)
    up = upcycle(cfg, params, UpcycleOptions(plan=_plan(), drop_upcycling=ratio), moments)
    host, blocks, mus = _blocks(up), to_blocks(params, cfg), to_blocks(up.opt_state.mu, up.config)
    block = "text/encoder/blocks/1/mlp"
    fc1, fc2, b1 = (host[f"{block}/{leaf}"] for leaf in ("fc1_kernel", "fc2_kernel", "fc1_bias"))
    subsets = []
    for e in range(E):
        changed = np.flatnonzero((fc1[e] != blocks[f"{block}/fc1_kernel"]).any(axis=0))
        assert len(changed) == round(ratio * f)
        np.testing.assert_array_equal(np.flatnonzero((fc2[e] != blocks[f"{block}/fc2_kernel"]).any(axis=1)), changed)
        assert not b1[e][changed].any()  # re-initialised units start with the model's zero bias
        # fresh units are drawn like the model's init: fc1 std (2 width)^-1/2
        assert 0.5 < fc1[e][:, changed].std() / (2 * cfg.text.width) ** -0.5 < 1.5
        mu = mus[f"{block}/fc1_kernel"][e]
        assert not mu[:, changed].any() and mu[:, np.setdiff1d(np.arange(f), changed)].all()
        subsets.append(tuple(changed))
    assert len(set(subsets)) == E
    full = _blocks(upcycle(cfg, params, UpcycleOptions(plan=_plan(), drop_upcycling=1.0)))
    assert (full[f"{block}/fc1_kernel"] != blocks[f"{block}/fc1_kernel"]).all()


def test_same_seed_same_experts_other_seed_other_router(dense):
    cfg, params, _, _ = dense
    opts = UpcycleOptions(plan=_plan(), expert_noise=0.01, drop_upcycling=0.1, seed=1)
    a, b = upcycle(cfg, params, opts).host_params(), upcycle(cfg, params, opts).host_params()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = upcycle(cfg, params, dataclasses.replace(opts, seed=2)).host_params()
    key = "visual/encoder/layers/1/0/mlp/router_kernel"  # block 1's router, stacked alone
    assert not np.array_equal(a[key], c[key])


def test_adam_moments_round_trip_and_upcycle(dense, tmp_path):
    cfg, params, _, _ = dense
    rng = np.random.RandomState(1)
    mu = {k: np.asarray(rng.randn(*v.shape), np.float32) for k, v in params.items()}
    nu = {k: np.asarray(rng.rand(*v.shape), np.float32) for k, v in params.items()}
    save_checkpoint(tmp_path / "d", cfg, params, source={"format": "test"}, opt_state=AdamMoments(7, mu, nu))
    loaded = load_checkpoint(tmp_path / "d")
    assert loaded.opt_state.count == 7 and loaded.metadata["optimizer_state"] == "adam"
    assert all(np.array_equal(loaded.opt_state.mu[k], mu[k]) and np.array_equal(loaded.opt_state.nu[k], nu[k])
               for k in params)
    assert load_checkpoint(tmp_path / "d", opt_state=False).opt_state is None

    upcycle_checkpoint(tmp_path / "d", tmp_path / "s", UpcycleOptions(plan=_plan(layers="last_1")))
    sparse = load_checkpoint(tmp_path / "s")
    assert sparse.metadata["kind"] == "sparse" and sparse.opt_state.count == 7
    for moments, dense_moments in ((sparse.opt_state.mu, mu), (sparse.opt_state.nu, nu)):
        moments, dense_moments = to_blocks(moments, sparse.config), to_blocks(dense_moments, cfg)
        key = "visual/encoder/blocks/1/mlp/fc2_kernel"
        assert all(np.array_equal(x, dense_moments[key]) for x in moments[key])
        assert not moments["visual/encoder/blocks/1/mlp/router_kernel"].any()  # a new parameter has no history
        assert np.array_equal(moments["visual/encoder/blocks/0/mlp/fc2_kernel"],
                              dense_moments["visual/encoder/blocks/0/mlp/fc2_kernel"])

    upcycle_checkpoint(tmp_path / "d", tmp_path / "n", UpcycleOptions(plan=_plan(), optimizer_state=False))
    assert load_checkpoint(tmp_path / "n").opt_state is None
    assert load_checkpoint(tmp_path / "n").metadata["optimizer_state"] is None


@pytest.fixture(scope="module")
def wide():
    """Experts of 2 MiB (a chunk each) and of 512 KiB and less (one chunk for the whole stack)."""
    cfg = preset("tiny").replace(
        vision=dataclasses.replace(preset("tiny").vision, width=512, mlp_dim=1024, heads=8),
        text=dataclasses.replace(preset("tiny").text, width=256, mlp_dim=512, heads=4))
    params = _random_params(cfg)
    return cfg, params, upcycle(cfg, params, UpcycleOptions(plan=_plan(num_experts=8), expert_noise=0.01))


def _spied(up, calls: dict[str, list[int]]) -> dict:
    """`up.params` (stacked) with every expert build recorded in `calls`: per-block key -> experts, in order."""

    def spy(key, part, i):
        calls.setdefault(key, []).append(i)
        return part(i)

    blocks = to_blocks(up.params, up.config)  # a lazy stack's blocks stay lazy: their part builds one expert
    return from_blocks({k: LazyStack(v.shape, functools.partial(spy, k, v.part)) if isinstance(v, LazyStack) else v
                        for k, v in blocks.items()}, up.config)


def test_experts_stream_to_disk_one_slice_at_a_time(wide, tmp_path):
    import tensorstore as ts

    cfg, params, up = wide
    calls: dict[str, list[int]] = {}
    save_checkpoint(tmp_path / "s", up.config, _spied(up, calls), source={"format": "test"})
    assert sorted(calls) == sorted(f"{t}/encoder/blocks/1/mlp/{leaf}" for t in ("visual", "text") for leaf in TILED)
    assert all(sorted(c) == list(range(8)) for c in calls.values())  # each expert made exactly once
    restored = load_checkpoint(tmp_path / "s").params
    host = up.host_params()
    assert all(np.array_equal(restored[k], host[k]) for k in host)
    chunks = {}
    for key in ("visual/encoder/layers/1/0/mlp/fc1_kernel", "text/encoder/layers/1/0/mlp/fc1_kernel",
                "text/encoder/layers/1/0/mlp/fc2_bias"):
        store = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{tmp_path}/s/params",
                                                       "path": key.replace("/", ".")}}).result()
        chunks[key] = tuple(store.chunk_layout.write_chunk.shape)
    # (layers, experts, ...): an expert of 2 MiB is a chunk of its own, written (and built) one at a time; experts
    # under Orbax's 1 MiB chunk floor are written as one chunk for the whole stack.
    assert chunks == {"visual/encoder/layers/1/0/mlp/fc1_kernel": (1, 1, 512, 1024),
                      "text/encoder/layers/1/0/mlp/fc1_kernel": (1, 8, 256, 512),
                      "text/encoder/layers/1/0/mlp/fc2_bias": (1, 8, 256)}


def test_mesh_placement_builds_only_each_devices_experts(wide):
    """On 8 simulated CPU devices, a 2 x 4 (data, expert) mesh: each device asks for, builds and holds its 2
    experts (axis 1 of a stacked MoE leaf; the layers axis, axis 0, is replicated)."""
    cfg, params, up = wide
    assert jax.device_count() == 8, "tests/conftest.py must request 8 simulated CPU devices"
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "expert"))
    sharding = NamedSharding(mesh, P(None, "expert"))
    host = up.host_params()
    calls: dict[str, list[int]] = {}
    spied = _spied(up, calls)
    lazy = [key for key, value in spied.items() if isinstance(value, LazyStack)]
    assert len(lazy) == 8  # the 4 tiled leaves of each tower's MoE block
    for key in lazy:
        value = spied[key]
        assert value.shape[:2] == (1, 8), key
        requested = []

        def build(idx, value=value, requested=requested):
            calls.clear()
            out = value[idx]
            requested.append((range(value.shape[1])[idx[1]], sorted(e for built in calls.values() for e in built)))
            return out

        placed = jax.make_array_from_callback(value.shape, sharding, build)
        for experts, built in requested:
            assert len(experts) == 2 and built == list(experts), (key, requested)  # never the whole stack
        for shard in placed.addressable_shards:
            _, column = np.argwhere(mesh.devices == shard.device)[0]
            assert range(8)[shard.index[1]] == range(2 * column, 2 * column + 2)
            np.testing.assert_array_equal(np.asarray(shard.data), host[key][shard.index])


def test_error_mid_stream_leaves_nothing(wide, tmp_path):
    cfg, params, up = wide

    def failing(i):
        if i == 3:
            raise RuntimeError("disk on fire")
        return np.zeros((512, 1024), np.float32)

    key = "visual/encoder/layers/1/0/mlp/fc1_kernel"  # (1 repeat, 8 experts, 512, 1024)

    def experts(part):
        return LazyStack((1, 8, 512, 1024), lambda r: LazyStack((8, 512, 1024), part))

    with pytest.raises(Exception, match="disk on fire"):
        save_checkpoint(tmp_path / "s", up.config, {**up.params, key: experts(failing)}, source={})
    with pytest.raises(CheckpointError, match=r"slice 0 of a \(8, 512, 1024\) stack has shape \(3,\)"):
        save_checkpoint(tmp_path / "s", up.config, {**up.params, key: experts(lambda i: np.zeros(3))}, source={})
    assert list(tmp_path.iterdir()) == []


def test_project_sharding_rules_place_lazy_experts(wide):
    """`parallel.sharding.shard_params` takes the upcycled tree as is: experts over `expert`, the rest by the rules."""
    from clipup_jax.parallel.mesh import make_mesh
    from clipup_jax.parallel.sharding import param_shardings, shard_params

    cfg, params, up = wide
    mesh = make_mesh({"fsdp": 2, "expert": 4})
    placed = shard_params(up.params, param_shardings(up.config, mesh))
    host = up.host_params()
    key = "text/encoder/layers/1/0/mlp/fc1_kernel"  # (layers, experts, width, mlp_dim)
    assert tuple(placed[key].sharding.spec[:2]) == (None, "expert")
    assert all(shard.data.shape[:2] == (1, 2) for shard in placed[key].addressable_shards)
    assert all(np.array_equal(np.asarray(placed[k]), host[k]) for k in host)
