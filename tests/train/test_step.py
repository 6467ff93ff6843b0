"""The jitted train step with router noise: the noise RNG advances inside the gradient trace."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from clipup_jax.config import MoEPlan, preset
from clipup_jax.models import CLIP
from clipup_jax.train.step import init_state, make_train_step


def test_router_noise_trains_and_draws_fresh_noise_each_step():
    cfg = preset("tiny")
    plan = MoEPlan(num_experts=4, top_k=2, router_noise_std=0.5)
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, moe=plan), text=dataclasses.replace(cfg.text, moe=plan))
    tx = optax.adamw(0.0)  # no update: any change in the loss between steps is the router noise
    graphdef, state = init_state(CLIP(cfg, nnx.Rngs(0, router=1)), tx)
    step = jax.jit(make_train_step(graphdef, tx, "clip", optax.constant_schedule(0.0)))
    rng = np.random.default_rng(0)
    batch = {"pixels": jnp.asarray(rng.standard_normal((4, 32, 32, 3)), jnp.float32),
             "tokens": jnp.asarray(rng.integers(1, 500, (4, 16)), jnp.int32)}
    counts = [leaf for leaf in jax.tree.leaves(state.rest) if jnp.issubdtype(leaf.dtype, jnp.integer)]
    state, first, first_health = step(state, batch)
    state, second, second_health = step(state, batch)
    assert bool(first_health.finite) and bool(second_health.finite)
    assert float(first["loss"]) != float(second["loss"])
    after = [leaf for leaf in jax.tree.leaves(state.rest) if jnp.issubdtype(leaf.dtype, jnp.integer)]
    assert counts and all(np.array_equal(b, a + 2) for a, b in zip(counts, after))
