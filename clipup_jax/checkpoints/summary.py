"""A human-readable summary of a checkpoint: architecture, MoE plan, parameter counts, FLOPs."""

from __future__ import annotations

import re
from typing import Mapping

from clipup_jax.checkpoints.format import Checkpoint
from clipup_jax.models.param_tree import count_params
from clipup_jax.config import ModelConfig, MoEPlan
from clipup_jax.models.flops import dense_equivalent, experts_per_token, image_flops, image_tokens, text_flops

_EXPERT_KEY = re.compile(r"^(?P<mlp>(?P<prefix>visual|text)/encoder/layers/\d+/\d+/mlp)/(?P<leaf>\w+)$")


def active_params(cfg: ModelConfig, params: Mapping[str, object]) -> int:
    """Parameters one token uses: every dense one, the routers, and the MLPs of the experts it reaches."""
    inactive = 0.0
    for key, p in params.items():
        m = _EXPERT_KEY.match(key)
        if m is None or m["leaf"] == "router_kernel" or f"{m['mlp']}/router_kernel" not in params:
            continue
        if m["prefix"] == "visual":
            tower, tokens = cfg.vision, image_tokens(cfg)
        else:
            tower, tokens = cfg.text, cfg.text.context_length
        e = tower.moe.num_experts
        inactive += count_params({key: p}) / e * (e - experts_per_token(tower.moe, tokens))
    return count_params(params) - round(inactive)


def describe(ckpt: Checkpoint) -> str:
    cfg = ckpt.config
    v, t = cfg.vision, cfg.text
    image = {k: p for k, p in ckpt.params.items() if k.startswith("visual/")}
    text = {k: p for k, p in ckpt.params.items() if k.startswith("text/")}
    source = ckpt.metadata.get("source", {})
    lines = [
        f"checkpoint   {ckpt.path}",
        f"kind         {ckpt.metadata['kind']} (from {source.get('format', '?')}: {source.get('path', '?')})",
        f"image tower  {v.image_size}px patch {v.patch_size}, width {v.width}, depth {v.depth}, heads {v.heads}, "
        f"mlp {v.mlp_dim}, pool {v.pool}{' (ln_post after pooling)' if v.ln_post_after_pool else ''}",
        f"text tower   vocab {t.vocab_size}, context {t.context_length}, width {t.width}, depth {t.depth}, "
        f"heads {t.heads}, mlp {t.mlp_dim}, {'causal' if t.causal else 'bidirectional'}, pool {t.pool}"
        f"{f' (id {t.eos_id})' if t.eos_id is not None else ''}",
        f"embed dim    {cfg.embed_dim}; activation {cfg.activation}; ln_eps {cfg.ln_eps:g}",
    ]
    if not cfg.is_sparse:
        lines += [
            f"params       total {count_params(ckpt.params):,} (image {count_params(image):,}, "
            f"text {count_params(text):,})",
            f"FLOPs        per image {_si(image_flops(cfg))}, per text {_si(text_flops(cfg))} "
            "(forward, 2 per multiply-add)",
        ]
    else:
        dense = dense_equivalent(cfg)
        label = "MoE"
        for name, tower in (("vision", v), ("text", t)):
            if tower.moe is not None:
                lines.append(f"{label:<13}{name}: {_plan(tower.moe, tower.depth)}")
                label = ""
        lines += [
            f"params       total {count_params(ckpt.params):,} (image {count_params(image):,}, "
            f"text {count_params(text):,})",
            f"             active per token {active_params(cfg, ckpt.params):,} (image {active_params(cfg, image):,}, "
            f"text {active_params(cfg, text):,})",
            f"FLOPs        per image {_si(image_flops(cfg))} active (dense-equivalent {_si(image_flops(dense))}), "
            f"per text {_si(text_flops(cfg))} active (dense-equivalent {_si(text_flops(dense))}) "
            "(forward, 2 per multiply-add; router + experts reached, at eval capacity)",
        ]
    lines += [
        f"optimizer    {'Adam moments stored' if ckpt.metadata.get('optimizer_state') else 'none'}",
        f"tokenizer    {ckpt.metadata.get('tokenizer') or 'none'}",
    ]
    return "\n".join(lines)


def _plan(plan: MoEPlan, depth: int) -> str:
    blocks = ",".join(str(i) for i in plan.layer_indices(depth))
    routing = f"top-{plan.top_k}" if plan.router == "top_k" else "expert choice"
    return (f"{plan.num_experts} experts, {routing}, blocks {blocks} (train: {_factor(plan.capacity_factor)}, "
            f"dispatch {plan.dispatch}; eval: {_factor(plan.eval_capacity_factor)}, dispatch {plan.eval_dispatch})")


def _factor(capacity_factor: float | None) -> str:
    return "dropless" if capacity_factor is None else f"capacity {capacity_factor:g}"


def _si(flops: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}FLOPs"
    return f"{flops:,} FLOPs"
