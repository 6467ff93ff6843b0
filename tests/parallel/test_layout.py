"""The layout table against where JAX actually puts the shards of a train state."""

from __future__ import annotations

import collections

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from clipup_jax.config import ModelConfig, MoEPlan, TextConfig, VisionConfig
from clipup_jax.parallel.layout import format_layout, state_layout
from clipup_jax.parallel.memory_plan import abstract_mesh
from clipup_jax.parallel.mesh import make_mesh
from clipup_jax.train.recipes import base_config, sparse
from clipup_jax.config import model_config
from clipup_jax.parallel.sharding import state_shardings
from clipup_jax.train.trainer import abstract_train_state

MODEL = sparse(ModelConfig(vision=VisionConfig(image_size=16, patch_size=8, width=32, depth=4, heads=2, mlp_dim=64),
                           text=TextConfig(vocab_size=64, context_length=8, width=32, depth=2, heads=2, mlp_dim=64),
                           embed_dim=16),
               MoEPlan(num_experts=4, top_k=2))


def _placed(mesh_shape: dict[str, int]):
    """The trainer's train state laid out on a real mesh (zeros, placed shard by shard), and its shardings."""
    config = base_config(MODEL)
    config.mesh = ml_collections.ConfigDict(mesh_shape)
    state = abstract_train_state(config)[3]
    shardings = state_shardings(state, make_mesh(mesh_shape), model_config(config))
    placed = jax.tree.map(lambda x, s: jax.make_array_from_callback(
        x.shape, s, lambda idx, x=x: np.zeros(x.shape, x.dtype)[idx]), state, shardings)
    return state, shardings, placed


def _bytes_per_device(tree) -> dict[int, int]:
    held = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device.id] += shard.data.nbytes
    return dict(held)


def test_layout_totals_are_what_each_device_holds():
    state, shardings, placed = _placed({"fsdp": 2, "expert": 4})
    layout = state_layout(state, shardings)
    params, opt = _bytes_per_device(placed.params), _bytes_per_device(placed.opt_state)
    everything = _bytes_per_device(placed)
    assert set(params.values()) == {layout.params_bytes} and set(opt.values()) == {layout.opt_bytes}
    assert set(everything.values()) == {layout.state_bytes} and len(everything) == 8
    assert layout.uneven == [] and layout.min_device_bytes == layout.state_bytes
    global_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(placed.params))
    assert layout.global_param_bytes == global_bytes > layout.params_bytes


def test_rows_group_blocks_and_keep_dense_and_moe_apart():
    state, shardings, _ = _placed({"fsdp": 2, "expert": 4})
    rows = {(r.group, r.shape): r for r in state_layout(state, shardings).rows}
    # Depth 4, every_2: one run of (dense, MoE) pairs, each position stacked on a leading (replicated) layers axis.
    dense = rows[("visual/encoder/layers/*/*/mlp/fc1_kernel", (2, 32, 64))]
    moe = rows[("visual/encoder/layers/*/*/mlp/fc1_kernel", (2, 4, 32, 64))]
    assert (dense.count, tuple(dense.spec)) == (1, (None, "fsdp", None))  # blocks 0 and 2, one stack
    assert (moe.count, tuple(moe.spec)) == (1, (None, "expert", "fsdp", None))  # blocks 1 and 3: experts over 4 devices
    assert not any("/blocks/" in group for group, _ in rows)
    assert moe.param_bytes == 2 * (1 * 16 * 64) * 4 and dense.param_bytes == 2 * (16 * 64) * 4
    assert moe.opt_bytes == 2 * moe.param_bytes  # Adam mu and nu, laid out like the parameter
    assert sum(r.count for r in rows.values()) == len(jax.tree.leaves(state.params))


def test_compact_table_folds_small_arrays():
    state, shardings, _ = _placed({"data": 8})
    layout = state_layout(state, shardings)
    compact, full = format_layout(layout, compact=True), format_layout(layout, compact=False)
    assert "visual/... (small arrays)" in compact and "small arrays" not in full
    assert "visual/encoder/layers/*/*/ln_1/scale" in full and "ln_1" not in compact
    assert len(compact.splitlines()) < len(full.splitlines())
    assert "WARNING" not in full


def test_uneven_shards_are_flagged():
    mesh = abstract_mesh({"data": 8})
    state = {"params": {"w": jax.ShapeDtypeStruct((6, 4), np.float32), "b": jax.ShapeDtypeStruct((8,), np.float32)},
             "opt_state": {"mu": {"w": jax.ShapeDtypeStruct((6, 4), np.float32)}}}
    shardings = {"params": {"w": NamedSharding(mesh, P("data")), "b": NamedSharding(mesh, P("data"))},
                 "opt_state": {"mu": {"w": NamedSharding(mesh, P("data"))}}}
    layout = state_layout(state, shardings)
    assert sorted(layout.uneven) == ["opt_state/mu/w", "params/w"]
    assert layout.params_bytes == (4 + 1) * 4  # rows of 6 in chunks of 1: device 0 holds one row and one b
    assert layout.min_device_bytes == 4  # the last device: no row of w (or of its moment), one b
    assert {r.group: r.opt_bytes for r in layout.rows} == {"w": 16, "b": 0}
    assert "WARNING: devices differ" in format_layout(layout)


def test_optimizer_state_follows_the_parameters_by_structure():
    """Parameter groups (frozen, learning-rate multipliers, no decay) make `optax.masked` trees with `MaskedNode`
    holes, and gradient accumulation adds another params-shaped tree: every array leaf of each must carry its
    parameter's sharding, and only the non-parameter leaves (counters) stay replicated."""
    config = base_config(MODEL)
    config.mesh = ml_collections.ConfigDict({"fsdp": 2, "expert": 4})
    config.optim.freeze = [r"^text/token_embedding"]
    config.optim.lr_mults = [[r"router_kernel$", 10.0]]
    config.optim.accum_steps = 2
    state = abstract_train_state(config)[3]
    shardings = state_shardings(state, make_mesh({"fsdp": 2, "expert": 4}), model_config(config))
    want = {tuple(path): sharding for path, sharding in jax.tree_util.tree_leaves_with_path(shardings.params)}
    followed = collections.Counter()
    for path, sharding in jax.tree_util.tree_leaves_with_path(shardings.opt_state):
        owner = next((p for p in want if tuple(path[-len(p):]) == p), None)  # the param whose path ends this one
        if owner is None:
            assert sharding.spec == P(), path  # counters, schedule state
        else:
            assert sharding == want[owner], path
            followed[owner] += 1
    expert = next(p for p in want if "fc1_kernel" in str(p) and tuple(want[p].spec[:2]) == (None, "expert"))
    assert followed[expert] >= 3  # Adam's mu and nu, the accumulator
    assert all(followed[p] >= 1 for p in want)  # even the frozen embedding's accumulator
