"""Analytic forward FLOPs of the towers (2 FLOPs per multiply-add, matmuls and attention only).

Norms, activations and softmax are left out, as in the usual ViT/CLIP accounting; the dense
figures equal open_clip's published model profile (tests/models/test_flops.py).

For sparse towers the figures are *active* FLOPs: in a MoE block each token pays the router
matmul and the MLPs of the experts it reaches (top-k; for expert choice the experts' C slots
spread over the tokens), at the eval capacity. `dense_equivalent` gives the model to compare with.
Every row of every block is counted, as the usual accounting does, though at inference a tower's last block
computes only the row it pools (`Encoder`).
"""

from __future__ import annotations

import dataclasses

from clipup_jax.config import ModelConfig, MoEPlan
from clipup_jax.models.routing import capacity


def experts_per_token(plan: MoEPlan, tokens: int) -> float:
    """Expert MLPs a token passes through on average (top-k: k; expert choice: E * C / tokens)."""
    if plan.router == "expert_choice":
        return plan.num_experts * capacity(tokens, plan.num_experts, 1, plan.eval_capacity_factor) / tokens
    return float(plan.top_k)


def _encoder_flops(tokens: int, width: int, mlp_dim: int, depth: int, moe: MoEPlan | None = None) -> int:
    qkv_out = 2 * tokens * width * 4 * width  # q, k, v and output projections
    attention = 2 * 2 * tokens * tokens * width  # scores and weighted values
    mlp = 2 * 2 * tokens * width * mlp_dim
    if moe is None:
        return depth * (qkv_out + attention + mlp)
    sparse = len(moe.layer_indices(depth))
    router = 2 * tokens * width * moe.num_experts
    moe_mlp = round(mlp * experts_per_token(moe, tokens)) + router
    return depth * (qkv_out + attention) + (depth - sparse) * mlp + sparse * moe_mlp


def image_tokens(cfg: ModelConfig) -> int:
    return cfg.vision.grid**2 + int(cfg.vision.class_token)


def image_flops(cfg: ModelConfig) -> int:
    v = cfg.vision
    patches = v.grid**2
    patchify = 2 * patches * v.patch_size**2 * 3 * v.width
    encoder = _encoder_flops(image_tokens(cfg), v.width, v.mlp_dim, v.depth, v.moe)
    return patchify + encoder + 2 * v.width * cfg.embed_dim


def text_flops(cfg: ModelConfig) -> int:
    """At the full context length, as the causal mask is applied to a dense attention matrix."""
    t = cfg.text
    return _encoder_flops(t.context_length, t.width, t.mlp_dim, t.depth, t.moe) + 2 * t.width * cfg.embed_dim


def dense_equivalent(cfg: ModelConfig) -> ModelConfig:
    """The same model with every MoE layer back to one dense MLP (what the sparse one was upcycled from)."""
    return cfg.replace(vision=dataclasses.replace(cfg.vision, moe=None), text=dataclasses.replace(cfg.text, moe=None))


def train_flops(cfg: ModelConfig, batch_size: int, steps: int) -> int:
    """Training FLOPs of `steps` steps at `batch_size` pairs: forward + backward = 3x the forward (Kaplan et al.'s
    6N per token), both towers, the contrastive logits left out (B x B x embed_dim, negligible at these widths)."""
    return 3 * (image_flops(cfg) + text_flops(cfg)) * batch_size * steps


def equal_flops_steps(sparse: ModelConfig, steps: int) -> int:
    """Steps of `sparse`'s dense equivalent that cost what `steps` steps of `sparse` cost (at one batch size):
    the dense arm of a comparison at equal training compute."""
    return max(steps, round(steps * train_flops(sparse, 1, 1) / train_flops(dense_equivalent(sparse), 1, 1)))
