"""The one dispatch decision: what "auto" picks per mode, mesh and backend, what it refuses (with the field
named), what the planner budgets, and that checkpoints written with the old names mean what they meant."""

from __future__ import annotations

import dataclasses
import json

import pytest

from clipup_jax.config import ConfigError, ModelConfig, MoEPlan, preset
from clipup_jax.models.dispatcher import choose, describe_dispatchers, model_dispatchers

CAPPED = MoEPlan(num_experts=8, top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0)
DROPLESS = dataclasses.replace(CAPPED, capacity_factor=None, eval_capacity_factor=None)


@pytest.mark.parametrize("plan, train, mesh, backend, kind", [
    (CAPPED, True, None, "cpu", "expert_loop"),
    (CAPPED, True, None, "gpu", "padded"),
    (CAPPED, True, None, "tpu", "einsum"),
    (CAPPED, False, {"data": 8}, "cpu", "expert_loop"),
    (DROPLESS, False, None, "cpu", "expert_loop"),
    (DROPLESS, False, None, "gpu", "ragged_dot"),
    (DROPLESS, True, None, "tpu", "ragged_dot"),
    (CAPPED, True, {"data": 2, "expert": 4}, "gpu", "padded"),
    (DROPLESS, False, {"expert": 8}, "cpu", "padded"),
])
def test_auto(plan, train, mesh, backend, kind):
    d = choose(plan, train=train, mesh_shape=mesh, backend=backend)
    assert d.kind == kind
    assert d.capacity_factor == (plan.capacity_factor if train else plan.eval_capacity_factor)
    assert d.expert_parallel == ((mesh or {}).get("expert", 1) > 1)


def test_explicit_choices_are_kept_or_refused_never_replaced():
    assert choose(dataclasses.replace(CAPPED, dispatch="einsum"), train=True, backend="cpu").kind == "einsum"
    assert choose(dataclasses.replace(CAPPED, eval_dispatch="ragged_dot"), train=False, backend="cpu").kind == "ragged_dot"
    on_experts = {"data": 2, "expert": 4}
    assert choose(dataclasses.replace(CAPPED, dispatch="padded"), train=True, mesh_shape=on_experts).expert_parallel
    reference = choose(dataclasses.replace(CAPPED, dispatch="dense_reference"), train=True, mesh_shape=on_experts)
    assert reference.kind == "dense_reference" and not reference.expert_parallel
    with pytest.raises(ValueError, match=r"where\.dispatch='einsum' has no expert-parallel form"):
        choose(dataclasses.replace(CAPPED, dispatch="einsum"), train=True, mesh_shape=on_experts, where="where")
    assert choose(dataclasses.replace(CAPPED, dispatch="expert_loop"), train=False, backend="gpu").kind == "padded"


def test_expert_choice_router_has_its_own_dispatch():
    plan = MoEPlan(num_experts=4, router="expert_choice")
    assert choose(plan, train=True).kind == "expert_choice"
    assert choose(dataclasses.replace(plan, dispatch="dense_reference"), train=True).kind == "dense_reference"
    with pytest.raises(ValueError, match="eval_dispatch='padded': router 'expert_choice'"):
        choose(dataclasses.replace(plan, eval_dispatch="padded"), train=False)


def test_model_dispatchers_name_the_tower_and_share_the_experts_vs_mesh_rule():
    cfg = preset("tiny").with_moe(MoEPlan(num_experts=4, top_k=2), ("vision",))
    chosen = model_dispatchers(cfg, {"data": 2, "expert": 4}, backend="cpu")
    assert set(chosen) == {"vision"}
    assert describe_dispatchers(chosen) == ("MoE dispatch, vision tower: train padded, expert-parallel over 4 "
                                            "(all_to_all), capacity 1.25; eval padded, expert-parallel over 4 "
                                            "(all_to_all), capacity 2")
    model_dispatchers(cfg, {"expert": 8})  # 4 experts, each on two devices
    with pytest.raises(ValueError, match=r"config\.model\.vision\.moe: num_experts=4 is incompatible .* size 3"):
        model_dispatchers(cfg, {"expert": 3})


def test_rows_the_planner_budgets():
    tokens = 50
    assert choose(CAPPED, train=True, backend="gpu").rows_per_group(tokens, 8, 2) == 8 * 16  # ceil(1.25*50*2/8)->16
    assert choose(DROPLESS, train=True, backend="gpu").rows_per_group(tokens, 8, 2) == tokens * 2
    assert choose(CAPPED, train=True, backend="cpu").rows_per_group(tokens, 8, 2) == tokens * 2
    padded = dataclasses.replace(DROPLESS, dispatch="padded")
    assert choose(padded, train=True, backend="cpu").rows_per_group(tokens, 8, 2) == 8 * tokens


@pytest.mark.parametrize("old, new", [
    (("einsum", "padded"), "einsum"), (("sorted", "padded"), "padded"), (("sorted", "ragged_dot"), "ragged_dot"),
    (("sorted", "pallas"), "pallas"), (("dense_reference", "padded"), "dense_reference"),
])
def test_configs_written_with_the_old_dispatch_names_load(old, new):
    cfg = preset("tiny").with_moe(MoEPlan(num_experts=4), ("vision",))
    data = json.loads(cfg.to_json())
    data["vision"]["moe"].pop("eval_dispatch")
    data["vision"]["moe"].update(dispatch=old[0], grouped_matmul=old[1])
    plan = ModelConfig.from_dict(data).vision.moe
    assert (plan.dispatch, plan.eval_dispatch) == (new, "auto")


def test_an_old_pair_without_an_equivalent_is_refused():
    data = json.loads(preset("tiny").with_moe(MoEPlan(num_experts=4), ("vision",)).to_json())
    data["vision"]["moe"].update(dispatch="einsum", grouped_matmul="ragged_dot")
    with pytest.raises(ConfigError, match="dispatch='einsum' with grouped_matmul='ragged_dot'"):
        ModelConfig.from_dict(data)
