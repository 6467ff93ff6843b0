"""Router math for the MoE layer: token-choice top-k (with capacity, BPR, noise) and expert choice.

Pure array functions over one routing group of T tokens; callers flatten batch*seq into T or
`jax.vmap` over a leading group axis. Everything is computed in float32 whatever the input dtype,
because the softmax/top-k decisions are sensitive to bf16 rounding.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Token-choice routing of T tokens to E experts, k choices each.

    `gate` is already zero where `kept` is false, so a dispatcher can use it directly as the
    combine weight; `slot` is only meaningful where `kept`.
    """

    expert_index: jax.Array  # (T, k) int32: chosen expert per token per choice (choice 0 = best)
    gate: jax.Array  # (T, k) float32 combine weight, 0 for dropped assignments
    slot: jax.Array  # (T, k) int32 position in the expert's buffer; < capacity where kept
    kept: jax.Array  # (T, k) bool: the assignment fits within the expert's capacity
    probs: jax.Array  # (T, E) float32 softmax of the clean logits (aux losses, metrics)
    logits: jax.Array  # (T, E) float32 clean logits (z-loss, importance)
    noisy_logits: jax.Array  # (T, E) float32 logits the selection used (== logits without noise; load loss)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertChoice:
    """Expert-choice routing: expert e processes tokens `token_index[e]` weighted by `gate[e]`.

    A token may be picked by 0..E experts, so the (T, k) layout of `Routing` does not fit. Every
    expert fills all C slots (load is balanced by construction, no aux loss needed).
    """

    token_index: jax.Array  # (E, C) int32: tokens each expert takes, highest probability first
    gate: jax.Array  # (E, C) float32: probs[token, expert] of those tokens
    probs: jax.Array  # (T, E) float32 softmax over experts, per token
    logits: jax.Array  # (T, E) float32


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None,
             multiple_of: int = 4) -> int:
    """Buffer slots per expert for one group of `num_tokens` tokens.

    `ceil(capacity_factor * num_tokens * top_k / num_experts)`, rounded up to a multiple of
    `multiple_of` (V-MoE/praxis; keeps buffers tile-friendly) and at least `multiple_of`, then
    capped at `num_tokens`: an expert can receive a token at most once, so more slots are waste.
    `capacity_factor=None` means dropless (capacity = num_tokens). For expert choice pass `top_k=1`
    (Zhou et al.'s c is then `capacity_factor`).
    """
    if num_tokens < 1 or num_experts < 1:
        raise ValueError(f"num_tokens ({num_tokens}) and num_experts ({num_experts}) must be >= 1")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k ({top_k}) must be in [1, num_experts={num_experts}]")
    if multiple_of < 1:
        raise ValueError(f"multiple_of ({multiple_of}) must be >= 1")
    if capacity_factor is None:
        return num_tokens
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor}")
    # round() first so float noise (e.g. 1.1 * 10 = 11.000000000000002) doesn't add a slot.
    c = math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9))
    c = max(multiple_of, -(-c // multiple_of) * multiple_of)
    return min(c, num_tokens)


def _check_logits(logits: jax.Array) -> jax.Array:
    if logits.ndim != 2:
        raise ValueError(f"router logits must be (tokens, experts), got shape {logits.shape}; vmap over groups")
    return logits.astype(jnp.float32)


def _priority_order(top1_prob: jax.Array, batch_priority: bool) -> jax.Array:
    """Token order in which slots are handed out: token order, or BPR (top-1 prob descending, ties by index)."""
    if not batch_priority:
        return jnp.arange(top1_prob.shape[0])
    return jnp.argsort(-top1_prob, stable=True)


def _slots(expert_index: jax.Array, order: jax.Array, num_experts: int, routed: jax.Array | None = None
           ) -> jax.Array:
    """Position of each (token, choice) in its expert's buffer; tokens not `routed` take none.

    All choice-0 assignments (in `order`) come before any choice-1 assignment, so a token's first
    choice never loses its slot to another token's second choice.
    """
    t, k = expert_index.shape
    if routed is not None:  # an index past the experts one-hot encodes to zeros: it counts for no expert
        expert_index = jnp.where(routed[:, None], expert_index, num_experts)
    ordered = expert_index[order].T  # (k, T): choice-major, then priority order
    one_hot = jax.nn.one_hot(ordered.reshape(k * t), num_experts, dtype=jnp.int32)  # (k*T, E)
    earlier = jnp.cumsum(one_hot, axis=0) - one_hot  # exclusive running count per expert
    slot_ordered = jnp.sum(earlier * one_hot, axis=-1).reshape(k, t).T  # (T, k) in priority order
    return jnp.zeros_like(slot_ordered).at[order].set(slot_ordered)


def top_k_routing(logits: jax.Array, top_k: int, capacity: int, renormalize: bool = True,
                  batch_priority: bool = False, noise_std: float = 0.0,
                  rng: jax.Array | None = None, routed: jax.Array | None = None) -> Routing:
    """Token-choice top-k routing with a per-expert capacity (GShard/Switch/V-MoE).

    - noise (train only; pass 0 at eval): `logits + noise_std * N(0, 1)` decides the top-k and the
      gates; `probs`/`logits` in the result stay clean. `noise_std` is the literal std on the
      logits (V-MoE's config `noise_std=1.0` means `noise_std=1/E` here). `top_k`, `capacity`, the
      flags and `noise_std` are Python values (static under jit).
    - gates are the chosen softmax probabilities, renormalised over the k choices when
      `renormalize` (so an upcycled model with identical experts equals the dense one), raw otherwise
      (V-MoE). Renormalisation happens before dropping, and dropped assignments get gate 0 without
      renormalising the rest: a fully dropped token passes through the residual only.
    - slots: every choice-0 assignment before any choice-1; within a choice, token order, or with
      `batch_priority` (V-MoE BPR) by the raw top-1 probability descending (ties: lower token index),
      so low-confidence tokens are the ones dropped. Raw rather than renormalised, since with top-1
      the renormalised gate is always 1.
    - `routed` (T,) bool, optional: only these tokens are dispatched; the others are dropped (gate 0)
      and take no slot, so they cost no expert work and crowd out no routed token.
    """
    logits = _check_logits(logits)
    num_tokens, num_experts = logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k ({top_k}) must be in [1, num_experts={num_experts}]")
    if capacity < 1:
        raise ValueError(f"capacity ({capacity}) must be >= 1")
    noisy_logits = logits
    if noise_std > 0:
        if rng is None:
            raise ValueError("noise_std > 0 needs an rng key (router noise is for training only)")
        noisy_logits = logits + noise_std * jax.random.normal(rng, logits.shape, jnp.float32)
    elif noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")

    top_probs, expert_index = jax.lax.top_k(jax.nn.softmax(noisy_logits, axis=-1), top_k)
    gate = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True) if renormalize else top_probs
    order = _priority_order(top_probs[:, 0], batch_priority)
    slot = _slots(expert_index, order, num_experts, routed)
    # A token reaches an expert at most once, so `num_tokens` slots never drop one: then `kept` does not read the
    # slots, and paths that never look at them (the sorted ones) skip computing them.
    kept = slot < capacity if capacity < num_tokens else jnp.ones(slot.shape, bool)
    if routed is not None:
        kept = kept & routed[:, None]
    return Routing(
        expert_index=expert_index.astype(jnp.int32),
        gate=jnp.where(kept, gate, 0.0),
        slot=slot.astype(jnp.int32),
        kept=kept,
        probs=jax.nn.softmax(logits, axis=-1),
        logits=logits,
        noisy_logits=noisy_logits,
    )


def expert_choice_routing(logits: jax.Array, capacity: int) -> ExpertChoice:
    """Expert choice (Zhou et al. 2022): each expert takes its `capacity` most probable tokens.

    Probabilities are the per-token softmax over experts (as in the paper), and the gate of a pick
    is that probability. Not for causal text: a token's routing depends on later tokens.
    """
    logits = _check_logits(logits)
    num_tokens = logits.shape[0]
    if not 1 <= capacity <= num_tokens:
        raise ValueError(f"capacity ({capacity}) must be in [1, num_tokens={num_tokens}]")
    probs = jax.nn.softmax(logits, axis=-1)
    gate, token_index = jax.lax.top_k(probs.T, capacity)  # (E, C)
    return ExpertChoice(token_index=token_index.astype(jnp.int32), gate=gate, probs=probs, logits=logits)


def assignment_counts(r: Routing, num_experts: int | None = None) -> jax.Array:
    """(E,) int32 number of kept (token, choice) assignments per expert (expert usage metric)."""
    num_experts = r.probs.shape[-1] if num_experts is None else num_experts
    one_hot = jax.nn.one_hot(r.expert_index, num_experts, dtype=jnp.int32)  # (T, k, E)
    return jnp.sum(one_hot * r.kept[..., None].astype(jnp.int32), axis=(-3, -2))


def drop_fraction(r: Routing) -> jax.Array:
    """Fraction of (token, choice) assignments not kept (dropped for lack of capacity, or not `routed`), float32
    scalar."""
    return 1.0 - jnp.mean(r.kept.astype(jnp.float32), axis=(-2, -1))


def unchosen_fraction(ec: ExpertChoice) -> jax.Array:
    """Expert choice: fraction of tokens no expert picked (they pass through the residual only)."""
    num_tokens = ec.probs.shape[-2]
    picked = jnp.zeros((num_tokens,), jnp.bool_).at[ec.token_index.reshape(-1)].set(True)
    return 1.0 - jnp.mean(picked.astype(jnp.float32))
