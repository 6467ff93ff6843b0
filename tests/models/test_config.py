"""The model config: JSON round trips, validation that names the field, MoE layer plans."""

import dataclasses
import json

import pytest

from clipup_jax.config import PRESETS, ConfigError, ModelConfig, MoEPlan, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = preset(name)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_round_trip_keeps_moe_plan_and_flags():
    cfg = preset("tiny")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, moe=MoEPlan(layers=(0, 1), num_experts=4, top_k=1)),
                      activation="gelu_tanh", ln_eps=1e-6)
    back = ModelConfig.from_json(cfg.to_json())
    assert back == cfg and back.text.moe.layers == (0, 1)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["vision"].update(heads=5), "vision.width"),
    (lambda d: d["vision"].update(patch_size=5), "vision.image_size"),
    (lambda d: d["text"].update(depth=0), "text.depth"),
    (lambda d: d.update(activation="relu"), "activation"),
    (lambda d: d.update(ln_eps=0), "ln_eps"),
    (lambda d: d["text"].update(widht=3), "widht"),
    (lambda d: d["text"].update(pool="mean"), "text.pool"),
    (lambda d: d["vision"].update(moe={"layers": "last_9", "num_experts": 4, "top_k": 2}), "last_9"),
    (lambda d: d["vision"].update(moe={"layers": "every_2", "num_experts": 1, "top_k": 2}), "moe.top_k"),
])
def test_invalid_configs_name_the_field(mutate, field):
    data = json.loads(preset("tiny").to_json())
    mutate(data)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize("layers, depth, want", [
    ("every_2", 12, (1, 3, 5, 7, 9, 11)),
    ("every_2", 5, (1, 3)),
    ("last_2", 6, (4, 5)),
    ((0, 5, 2), 6, (0, 2, 5)),
])
def test_moe_layer_plans(layers, depth, want):
    assert MoEPlan(layers=layers).layer_indices(depth) == want


def test_unknown_preset():
    with pytest.raises(ConfigError, match="ViT-B-16"):
        preset("ViT-X")
