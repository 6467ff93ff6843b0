"""Auxiliary router losses, one pure function each, over one routing group of T tokens.

All return float32 scalars; `jax.vmap` over groups and average, as V-MoE does. Probabilities are
the (T, E) softmax over experts from `routing.Routing.probs`; pass only the tokens a loss should see
(e.g. one modality for the LIMoE losses).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

# Names the MoE layer uses for each loss in its aux dict and in the config weights.
LOSS_NAMES = ("load_balancing", "router_z", "importance", "load", "local_entropy", "global_entropy")


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _cv_squared(x: jax.Array) -> jax.Array:
    """Squared coefficient of variation (population std / mean)^2; scale-invariant."""
    return jnp.var(x) / jnp.square(jnp.mean(x))


def _entropy(p: jax.Array) -> jax.Array:
    """Entropy in nats over the last axis; the clip keeps log and its gradient finite at p = 0."""
    return -jnp.sum(p * jnp.log(jnp.maximum(p, jnp.finfo(jnp.float32).tiny)), axis=-1)


def load_balancing_loss(probs: jax.Array, expert_index: jax.Array, num_choices: int = 1) -> jax.Array:
    """Switch Transformer (Fedus et al. 2021, eq. 4-6): `E * sum_e f_e * P_e`.

    f_e: fraction of routing decisions that pick e, over the first `num_choices` columns of
    `expert_index` (default 1 = top-1 only, as in Switch/GShard/V-MoE), normalised by
    T * num_choices so sum_e f_e = 1. Decisions count before capacity dropping. P_e: mean over
    tokens of probs[:, e]. Equals 1 at perfect balance, E when all tokens and probability go to one
    expert. Gradient flows through P_e only. (flaxformer's all-k multi-hot version is this times k.)
    """
    probs = _f32(probs)
    num_experts = probs.shape[-1]
    if not 1 <= num_choices <= expert_index.shape[-1]:
        raise ValueError(f"num_choices ({num_choices}) must be in [1, {expert_index.shape[-1]}]")
    chosen = jax.nn.one_hot(expert_index[:, :num_choices], num_experts, dtype=jnp.float32)  # (T, n, E)
    f = jnp.mean(chosen, axis=(0, 1))
    p = jnp.mean(probs, axis=0)
    return num_experts * jnp.sum(f * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE (Zoph et al. 2022): `mean_t logsumexp(logits_t)^2`; keeps router logits small."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(_f32(logits), axis=-1)))


def importance_loss(probs: jax.Array) -> jax.Array:
    """V-MoE (Riquelme et al. 2021, after Shazeer et al. 2017): CV^2 of importance.

    importance_e = sum_t probs[t, e]; loss = (std(importance) / mean(importance))^2 (population
    std). V-MoE uses the clean softmax (`Routing.probs`), not the noisy one. 0 at perfect balance.
    """
    return _cv_squared(jnp.sum(_f32(probs), axis=0))


def load_loss(logits: jax.Array, noisy_logits: jax.Array, top_k: int, noise_std: float,
              exclude_self: bool = False) -> jax.Array:
    """V-MoE load loss: CV^2 of a smooth estimate of each expert's load under noisy top-k routing.

    For token t, expert e: p[t, e] = Phi((logits[t, e] - threshold[t, e]) / noise_std), the
    probability that e is selected if its noise were redrawn. V-MoE (vmoe `_load_loss`, the default)
    takes threshold[t, e] = the k-th largest *noisy* logit of token t (same for all e);
    `exclude_self=True` uses Shazeer et al. 2017's form, the k-th largest noisy logit among the other
    experts (needs top_k < E). load_e = sum_t p[t, e]; loss = (std(load) / mean(load))^2.
    `noise_std` must be the std actually added to the logits (`routing.top_k_routing`'s noise_std);
    gradient flows through the clean logits and the threshold.
    """
    if noise_std <= 0:
        raise ValueError(f"load_loss needs noise_std > 0, got {noise_std}")
    logits, noisy_logits = _f32(logits), _f32(noisy_logits)
    num_experts = logits.shape[-1]
    if exclude_self:
        if not 1 <= top_k < num_experts:
            raise ValueError(f"exclude_self needs 1 <= top_k ({top_k}) < num_experts ({num_experts})")
        top = jax.lax.top_k(noisy_logits, top_k + 1)[0]
        kth, next_ = top[:, top_k - 1 : top_k], top[:, top_k : top_k + 1]
        # Removing e from the ranking moves the k-th place down one only if e was in the top k.
        threshold = jnp.where(noisy_logits >= kth, next_, kth)
    else:
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be in [1, num_experts={num_experts}]")
        threshold = jax.lax.top_k(noisy_logits, top_k)[0][:, top_k - 1 : top_k]
    p = jax.scipy.stats.norm.cdf((logits - threshold) / noise_std)
    return _cv_squared(jnp.sum(p, axis=0))


def local_entropy_loss(probs: jax.Array) -> jax.Array:
    """LIMoE (Mustafa et al. 2022): mean over tokens of H(probs[t]); minimising makes routing confident."""
    return jnp.mean(_entropy(_f32(probs)))


def global_entropy_loss(probs: jax.Array, threshold: float | None = None) -> jax.Array:
    """LIMoE (Mustafa et al. 2022): -H(p_mean), p_mean = mean over tokens of probs.

    Minimising spreads usage across experts. With `threshold` tau (nats), the LIMoE thresholded form
    max(0, tau - H(p_mean)): it only pushes while the marginal entropy is below tau, a soft floor of
    about e^tau experts in use. LIMoE applies it per modality: pass that modality's tokens.
    """
    h = _entropy(jnp.mean(_f32(probs), axis=0))
    return -h if threshold is None else jnp.maximum(0.0, threshold - h)


def combine_aux_losses(values: Mapping[str, jax.Array], weights: Mapping[str, float]) -> jax.Array:
    """sum_name weights[name] * values[name] over the weighted names, float32 scalar.

    Zero weights are skipped (their loss may be absent or NaN, e.g. load loss without noise). Raises
    for a name that is neither in `values` nor in LOSS_NAMES (a typo), and for a non-zero weight on
    a loss that was not computed.
    """
    unknown = sorted(name for name in weights if name not in values and name not in LOSS_NAMES)
    missing = sorted(name for name, w in weights.items() if w != 0 and name not in values)
    if unknown or missing:
        raise ValueError(f"aux loss weights: unknown names {unknown}, weighted but not computed {missing}; "
                         f"computed: {sorted(values)}")
    total = jnp.zeros((), jnp.float32)
    for name, w in weights.items():
        if w != 0:
            total = total + w * _f32(values[name])
    return total
