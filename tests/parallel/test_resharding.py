"""A train state saved on one mesh restores, bit for bit, on meshes of other shapes and sizes."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from clipup_jax.config import ModelConfig, MoEPlan, TextConfig, VisionConfig
from clipup_jax.models.param_tree import tree_path_name

from clipup_jax.parallel.mesh import make_mesh
from clipup_jax.train.checkpointing import TrainCheckpoints, abstract_like
from clipup_jax.train.recipes import base_config, sparse
from clipup_jax.config import model_config
from clipup_jax.parallel.sharding import state_shardings
from clipup_jax.train.trainer import abstract_train_state, train

# Small enough that the one compile (the train step on data=2 x expert=4) dominates; only block 1 of the image
# tower is a MoE layer.
TINY = ModelConfig(vision=VisionConfig(image_size=16, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64),
                   text=TextConfig(vocab_size=64, context_length=8, width=32, depth=1, heads=2, mlp_dim=64),
                   embed_dim=16)
# Block 1, the image tower's one MoE block, stacked alone: segment 1, position 0; (1 layer, 4 experts, 32, 64).
EXPERT_KERNEL = "visual/encoder/layers/1/0/mlp/fc1_kernel"


def _config(mesh: dict[str, int]) -> ml_collections.ConfigDict:
    config = base_config(sparse(TINY, MoEPlan(num_experts=4, top_k=2), towers=("vision",)))
    config.batch_size = 8
    config.total_steps = 2
    config.optim.warmup_steps = 1
    config.log_every = 1
    config.eval_every = 0
    config.checkpoint_every = 1000  # only the final step is saved
    config.mesh = ml_collections.ConfigDict(mesh)
    return config


def _data(cfg: ModelConfig, process_index: int, process_count: int):
    rng = np.random.default_rng(0)
    while True:
        yield {"pixels": rng.standard_normal((8, 16, 16, 3), np.float32),
               "tokens": rng.integers(1, cfg.text.vocab_size, (8, 8), dtype=np.int32)}


def _flat(tree) -> dict[str, jax.Array]:
    return {tree_path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """2 steps on (data=2, expert=4); the params as trained (== as saved at the last step)."""
    workdir = tmp_path_factory.mktemp("run")
    history = train(_config({"data": 2, "expert": 4}), workdir, data=_data)
    params = {k: np.asarray(v) for k, v in _flat(history["final_params"]).items()}
    kernel = history["final_params"]["visual"]["encoder"]["layers"][1][0]["mlp"]["fc1_kernel"][...]
    assert kernel.shape == (1, 4, 32, 64) and tuple(kernel.sharding.spec[:2]) == (None, "expert")
    return workdir, params


def _restore(workdir, mesh_shape: dict[str, int], devices) -> dict[str, jax.Array]:
    config = _config(mesh_shape)
    mesh = make_mesh(mesh_shape, devices=devices)
    state = abstract_train_state(config)[3]
    shardings = state_shardings(state, mesh, model_config(config))
    checkpoints = TrainCheckpoints(workdir, keep=3, every=1000)
    try:
        restored, step = checkpoints.restore(abstract_like(state, shardings), None)
    finally:
        checkpoints.close()
    assert step == 2
    return _flat(restored.params)


@pytest.mark.parametrize("mesh_shape, ndev, expert_shards", [
    ({"data": 8}, 8, 1),
    ({"fsdp": 2, "expert": 4}, 8, 4),
    ({"data": 1}, 1, 1),
])
def test_restore_on_another_mesh_is_bitwise(saved, mesh_shape, ndev, expert_shards):
    workdir, want = saved
    got = _restore(workdir, mesh_shape, jax.devices()[:ndev])
    assert sorted(got) == sorted(want)
    for name, value in got.items():
        assert len(value.sharding.device_set) == ndev, name
        np.testing.assert_array_equal(np.asarray(value), want[name], err_msg=name)
    kernel = got[EXPERT_KERNEL]
    starts = {shard.index[1].start or 0 for shard in kernel.addressable_shards}  # axis 1: experts
    assert len(starts) == expert_shards  # experts split over the target mesh's expert axis, or replicated
    fsdp = mesh_shape.get("fsdp", 1)
    assert kernel.sharding.shard_shape(kernel.shape) == (1, 4 // expert_shards, 32 // fsdp, 64)


def test_trainer_wrote_the_layout_table(saved):
    workdir, _ = saved
    text = (workdir / "layout.txt").read_text()
    assert "mesh data=2 expert=4" in text
    assert any(line.split()[:2] == ["visual/encoder/layers/*/*/mlp/fc1_kernel", "1"] and "1x4x32x64" in line
               and "(-, expert, -, -)" in line for line in text.splitlines()), text
