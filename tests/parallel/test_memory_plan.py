"""The memory planner against XLA's own accounting of compiled train steps, and the clipup-plan CLI."""

from __future__ import annotations

import pathlib

import ml_collections
import pytest

from clipup_jax.cli.plan import main as plan_main
from clipup_jax.config import ModelConfig, MoEPlan, TextConfig, VisionConfig
from clipup_jax.parallel.memory_plan import MemoryPlan, plan_memory
from clipup_jax.train.recipes import base_config, sparse
from clipup_jax.train.trainer import abstract_train_state, check_config, lower_train_step
from tests.cli_helpers import invoke

# Activations dominate the step temporaries here (65 image tokens, 8 examples per device, 33 K params), so the
# comparison tests the activation estimate, not only the param-sized buffers.
MODEL = ModelConfig(vision=VisionConfig(image_size=32, patch_size=4, width=32, depth=2, heads=2, mlp_dim=64),
                    text=TextConfig(vocab_size=64, context_length=16, width=32, depth=1, heads=2, mlp_dim=64),
                    embed_dim=16)
CASES = {  # two compiles keep this file quick; a dense data-parallel step measured 0.92 as well
    "sparse_every_2": (sparse(MODEL, MoEPlan(num_experts=4, top_k=2, capacity_factor=1.5), towers=("vision",)), "none",
                       {"data": 2, "expert": 4}),
    "dense_remat_full_fsdp": (MODEL, "full", {"data": 2, "fsdp": 4}),
}
# Planned / compiled temp bytes, measured on the 8-device CPU mesh (jax 0.10.2): sparse 0.87, dense remat+fsdp
# 0.96. The planner counts what the backward pass needs; XLA adds scheduling slack and copies.
TEMP_RATIO = (0.5, 2.0)
B16 = pathlib.Path(__file__).parents[2] / "experiments" / "clipup_b16.py"


def _config(name: str) -> ml_collections.ConfigDict:
    model, remat, mesh = CASES[name]
    config = base_config(model)
    config.batch_size = 64
    config.remat = remat
    config.mesh = ml_collections.ConfigDict(mesh)
    return config


@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_matches_the_compiled_step(name):
    config = _config(name)
    plan = _plan(config, 8, platform="cpu")
    # Lowered exactly as the trainer runs it; buffer assignment does not depend on the LLVM optimisation level.
    stats = lower_train_step(config).compile({"xla_backend_optimization_level": 0}).memory_analysis()
    assert stats.argument_size_in_bytes == plan.argument_bytes  # state + batch, per device, to the byte
    ratio = plan.temp_bytes / stats.temp_size_in_bytes
    assert TEMP_RATIO[0] <= ratio <= TEMP_RATIO[1], (name, plan.temp_bytes, stats.temp_size_in_bytes)



def _plan(config: ml_collections.ConfigDict, num_devices: int, **kwargs) -> MemoryPlan:
    return plan_memory(config, abstract_train_state(config)[3], num_devices, **kwargs)

def test_plan_scales_with_the_mesh():
    """Params and moments split over fsdp (dense) and expert (MoE); the batch over every data-like axis."""
    config = _config("sparse_every_2")
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1})
    one = _plan(config, 1)
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 2, "expert": 4})
    eight = _plan(config, 8)
    assert one.layout.params_bytes == one.layout.global_param_bytes
    assert eight.layout.params_bytes < one.layout.params_bytes / 2
    assert eight.layout.opt_bytes == 2 * eight.layout.params_bytes + (one.layout.opt_bytes - 2 * one.layout.params_bytes)
    assert (one.local_batch, eight.local_batch) == (64, 8)
    assert eight.batch_bytes * 8 == one.batch_bytes
    remat = _config("dense_remat_full_fsdp")
    remat.remat = "none"
    none = _plan(remat, 8)
    remat.remat = "full"
    assert _plan(remat, 8).activation_bytes < none.activation_bytes
    assert _plan(remat, 8, platform="cpu").activation_bytes == none.activation_bytes  # XLA:CPU keeps it all


@pytest.mark.parametrize("experts, expert_axis", [(4, 8), (4, 2), (3, 2), (6, 4)])
def test_trainer_and_planner_accept_and_refuse_the_same_expert_meshes(experts, expert_axis):
    config = base_config(sparse(MODEL, MoEPlan(num_experts=experts, top_k=2), towers=("vision",)))
    config.batch_size = 64
    config.mesh = ml_collections.ConfigDict({"data": 8 // expert_axis, "fsdp": 1, "expert": expert_axis})
    verdicts = []
    for check in (lambda: _plan(config, 8), lambda: check_config(config)):
        try:
            check()
            verdicts.append("accepted")
        except ValueError as e:
            verdicts.append(str(e))
    assert verdicts[0] == verdicts[1]
    fits = experts % expert_axis == 0 or expert_axis % experts == 0  # E/EP per device, or EP/E copies of each
    assert (verdicts[0] == "accepted") == fits, verdicts[0]
    if experts < expert_axis:  # the trainer builds the replicated-experts step it accepts
        assert "all_to_all" in lower_train_step(config).as_text()


@pytest.mark.parametrize("overrides, devices, message", [
    (["--config.mesh.data=3"], 64, "must multiply to the device count"),
    ([], 48, "config.batch_size=32768 is not divisible"),
    (["--config.mesh.expert=6"], 48, "num_experts=8 is incompatible with the 'expert' mesh axis of size 6"),
    (["--config.dcn_mesh.expert=3"], 64, "dcn_mesh.expert=3 does not divide"),
])
def test_cli_errors_are_one_line(capsys, overrides, devices, message):
    code, out, err = invoke(plan_main, ["--config", B16, "--devices", devices, *overrides], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert out == ""


def test_cli_prints_layout_and_plan_for_a_pod(capsys):
    code, out, err = invoke(plan_main, ["--config", B16, "--devices", 64, "--device-memory-gib", 96], capsys)
    assert code == 0, err
    layout, plan = out.split("memory plan per device:")
    assert "parameter layout on mesh data=8 fsdp=1 expert=8 (64 devices)" in layout
    # B/16, every_2 MoE over 12 blocks: the 6 MoE blocks' experts stacked (layers, experts, ...), over `expert`.
    row = next(line.split() for line in layout.splitlines() if "6x8x768x3072" in line)
    assert row[0] == "visual/encoder/layers/*/*/mlp/fc1_kernel" and " ".join(row[3:7]) == "(-, expert, -, -)", row
    assert len(layout.strip().splitlines()) <= 40
    for row in ("params (float32)", "optimizer state", "gradients", "activations for the backward pass",
                "vision: 12 blocks x 197 tokens, remat full, 6 MoE", "total per device", "device memory"):
        assert row in plan, row
    assert "global batch 32768 (512 per device)" in plan
