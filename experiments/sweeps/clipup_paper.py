"""The CLIP-UP paper's study (shared/reference/paper.md) in miniature, on the demo's data and models.

    clipup-sweep experiments/sweeps/clipup_paper.py --workdir runs/paper --seeds 3 --report [--dry-run]

One dense parent (`experiments/demo.py`, `DEMO_PARENT_STEPS` steps, run once) and arms compared with `dense`, the
parent continued for `DEMO_ARM_STEPS` steps, seed by seed:

(a) `clip-up` (the demo's MoE plan upcycled from the parent) at equal steps, and `dense-equal-flops`, the parent
    continued for CLIP-UP's training FLOPs;
(b) `sparse-from-scratch`: the CLIP-UP model trained from random init for the parent's + the arm's steps;
(c) `shared-from-scratch`: the same with one backbone for both modalities (LIMoE-style), against (b);
(d) aux losses: `aux-none`, `aux-lb` (load balancing only), CLIP-UP's own LB + z-loss, `aux-lb-z-entropy` (+ LIMoE's
    local and global entropy losses);
(e) train capacity factor 1.0 / 1.25 / 2.0 (`cf1.0` ...; the one that is CLIP-UP's own is `clip-up` itself);
(f) 2 / 4 / 8 experts (`e2` ...; likewise), `top1`;
(g) MoE in the `image-only` or `text-only` tower (CLIP-UP's own: both);
(h) expert init: `init-noise`, `init-drop` (drop-upcycling), `init-kmeans` (routers from clusters); plain tiling
    with a random router is `clip-up` itself. Multiplet upcycling needs several dense parents and is left out.

Comparisons the paper makes between two non-baseline arms ((b) vs `clip-up`, (c) vs (b)) are read off the
per-arm intervals in the report; the paired differences are all against `dense`.
"""

from clipup_jax.models.flops import equal_flops_steps
from clipup_jax.train.recipes import DEMO_ARM_STEPS, DEMO_CONTINUED, DEMO_MODEL, DEMO_PARENT_STEPS, DEMO_PLAN, sparse

BASE = "../clipup_demo.py"  # relative to this file: the demo's CLIP-UP model
BASELINE = "dense"

_CONTINUED = [f"--config.{field}={value}" for field, value in DEMO_CONTINUED.items()]


def _steps(n: int) -> list[str]:
    """Train for `n` steps, evaluating and checkpointing at the end."""
    return [f"--config.total_steps={n}", f"--config.eval_every={n}", f"--config.checkpoint_every={n}"]


def _moe(field: str, value) -> list[str]:
    return [f"--config.model.{tower}.moe.{field}={value}" for tower in ("vision", "text")]


def _upcycled(name: str, *overrides: str) -> dict:
    return {"name": name, "from": "parent", "overrides": [*_steps(DEMO_ARM_STEPS), *_CONTINUED, *overrides]}


def get_sweep() -> list[dict]:
    scratch = _steps(DEMO_PARENT_STEPS + DEMO_ARM_STEPS)
    return [
        {"name": "parent", "config": "../demo.py", "overrides": _steps(DEMO_PARENT_STEPS)},
        # (a)
        {"name": "dense", "config": "../demo.py", "from": "parent",
         "overrides": [*_steps(DEMO_ARM_STEPS), *_CONTINUED]},
        {"name": "dense-equal-flops", "config": "../demo.py", "from": "parent",
         "overrides": [*_steps(equal_flops_steps(sparse(DEMO_MODEL, DEMO_PLAN), DEMO_ARM_STEPS)), *_CONTINUED]},
        _upcycled("clip-up"),
        # (b), (c)
        {"name": "sparse-from-scratch", "overrides": scratch},
        {"name": "shared-from-scratch", "overrides": [*scratch, "--config.model.shared_backbone=True"]},
        # (d)
        _upcycled("aux-none", *_moe("load_balancing_weight", 0.0), *_moe("z_loss_weight", 0.0)),
        _upcycled("aux-lb", *_moe("z_loss_weight", 0.0)),
        _upcycled("aux-lb-z-entropy", *_moe("local_entropy_weight", 0.01), *_moe("global_entropy_weight", 0.01)),
        # (e)
        *(_upcycled(f"cf{cf}", *_moe("capacity_factor", cf)) for cf in (1.0, 1.25, 2.0)
          if cf != DEMO_PLAN.capacity_factor),
        # (f)
        *(_upcycled(f"e{e}", *_moe("num_experts", e)) for e in (2, 4, 8) if e != DEMO_PLAN.num_experts),
        _upcycled("top1", *_moe("top_k", 1)),
        # (g)
        _upcycled("image-only", "--config.model.text.moe=None"),
        _upcycled("text-only", "--config.model.vision.moe=None"),
        # (h)
        _upcycled("init-noise", "--config.upcycle.expert_noise=0.01"),
        _upcycled("init-drop", "--config.upcycle.drop_upcycling=0.5"),
        _upcycled("init-kmeans", "--config.upcycle.router_init=kmeans"),
    ]
