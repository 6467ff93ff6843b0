"""optax AdamW with schedules, clipping, weight-decay masks, freezing and LR multipliers by regex.

Regexes match flat parameter names such as `visual/encoder/blocks/1/mlp/router_kernel`
(`re.search`). A parameter matching a `freeze` pattern gets no update at all; the
first matching `lr_mults` pattern scales its learning rate.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from clipup_jax.models.param_tree import tree_path_name

# Norm scales/biases, biases, embeddings and the temperature are not decayed (CLIP/open_clip practice).
DEFAULT_NO_DECAY = r"(bias|/scale|embed|class_embedding|logit_scale|logit_bias)$"


def warmup_note(cfg: ml_collections.ConfigDict, total_steps: int) -> str | None:
    """A warning when the warmup is not shorter than the run: its learning rate never reaches `cfg.lr`. The
    schedule is left as configured, so a run continued to a larger `total_steps` stays on one schedule."""
    if int(cfg.warmup_steps) < total_steps:
        return None
    return (f"warning: config.optim.warmup_steps={cfg.warmup_steps} is not shorter than config.total_steps="
            f"{total_steps}: the learning rate is still rising at the last step and never reaches "
            f"config.optim.lr={cfg.lr:g}")


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine to `end_lr_fraction * lr`, inverse square root, or constant."""
    warmup = int(cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1),
                                                  end_value=cfg.lr * cfg.end_lr_fraction)
    if cfg.schedule == "rsqrt":
        def rsqrt(step):
            step = jnp.asarray(step, jnp.float32)
            return cfg.lr * jnp.minimum(step / max(warmup, 1), jnp.sqrt(max(warmup, 1) / jnp.maximum(step, 1.0)))
        return rsqrt
    if cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)],
                                    [warmup])
    raise ValueError(f"config.optim.schedule={cfg.schedule!r}: expected 'cosine', 'rsqrt' or 'constant'")


def _compile(patterns: Any, field: str) -> list[re.Pattern]:
    try:
        return [re.compile(p) for p in (patterns or ())]
    except re.error as e:
        raise ValueError(f"config.optim.{field}: bad regex ({e})") from e


def make_optimizer(cfg: ml_collections.ConfigDict, params: nnx.State, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The full transformation for `params` (an `nnx.State` of Params), and its LR schedule."""
    lr = schedule(cfg, total_steps)
    no_decay = re.compile(cfg.no_decay_regex)
    freeze = _compile(cfg.freeze, "freeze")
    mults = [(re.compile(p), float(m)) for p, m in (cfg.lr_mults or ())]

    def group(name: str) -> str:
        if any(p.search(name) for p in freeze):
            return "frozen"
        mult = next((m for p, m in mults if p.search(name)), 1.0)
        return f"{'nodecay' if no_decay.search(name) else 'decay'}@{mult}"

    labels = jax.tree_util.tree_map_with_path(lambda path, _: group(tree_path_name(path)), params)
    groups = sorted(set(jax.tree.leaves(labels)))
    transforms = {}
    for g in groups:
        if g == "frozen":
            transforms[g] = optax.set_to_zero()
            continue
        kind, mult = g.split("@")
        scaled = (lambda m: (lambda step: lr(step) * m))(float(mult))
        transforms[g] = optax.adamw(scaled, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                    weight_decay=cfg.weight_decay if kind == "decay" else 0.0)
    tx = optax.multi_transform(transforms, labels)
    if cfg.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    if cfg.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accum_steps)
    return tx, lr
