"""CLIP-UP ablations on the embedded data: aux-loss weights, capacity factor, experts, shared backbone.

    clipup-sweep experiments/sweeps/clipup_demo_ablations.py --workdir runs/ablations --seeds 3 --report [--dry-run]
"""

BASE = "../clipup_demo.py"  # relative to this file

_MOE = "--config.model.{tower}.moe.{field}={value}"


def _both(field: str, value) -> list[str]:
    return [_MOE.format(tower=t, field=field, value=value) for t in ("vision", "text")]


def get_sweep() -> list[dict]:
    arms = [{"name": "baseline", "overrides": []}]
    arms += [{"name": f"lb{w}", "overrides": _both("load_balancing_weight", w)} for w in (0.0, 0.1)]
    arms += [{"name": f"zloss{w}", "overrides": _both("z_loss_weight", w)} for w in (0.0, 0.01)]
    arms += [{"name": f"cf{c}", "overrides": _both("capacity_factor", c)} for c in (1.0, 1.5)]  # the baseline's: 2.0
    arms += [{"name": f"e{e}", "overrides": _both("num_experts", e)} for e in (2, 4)]  # the baseline's: 8
    arms += [{"name": "shared_backbone", "overrides": ["--config.model.shared_backbone=True"]}]
    return arms
