"""The train state and the one jit-compiled train step."""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from clipup_jax.models import CLIP
from clipup_jax.models.layers import LN_100
from clipup_jax.models.moe import moe_aux
from clipup_jax.train.health import Health, step_health
from clipup_jax.train.losses import make_contrastive_loss


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # nnx.Param leaves of the CLIP
    opt_state: optax.OptState
    rest: nnx.State  # non-parameter model state (router-noise RNG counters), advanced every step


def init_state(model: CLIP, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), rest)


def _global_norm(tree: Any) -> jax.Array:
    return optax.tree.norm(tree)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_name: str,
                    schedule: optax.Schedule, loss_impl: str = "global"):
    """(state, batch) -> (state, metrics, health). Aux losses of every MoE layer join the contrastive loss, computed
    as `loss_impl` ("global" logits, or "sharded" over the mesh's batch axes: `train.losses`)."""
    contrastive_loss = make_contrastive_loss(loss_name, loss_impl)

    def loss_fn(params: nnx.State, rest: nnx.State, batch: dict[str, jax.Array]):
        # copy=True: fresh Variables inside this trace, so the router-noise RNG counters can advance in it.
        model = nnx.merge(graphdef, params, rest, copy=True)
        # Train capacity and router noise; each MoE layer returns its routing metrics and aux losses.
        model.set_attributes(deterministic=False, records=("moe",), raise_if_not_found=False)
        out = model(batch["pixels"], batch["tokens"])
        contrastive = contrastive_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias)
        aux = moe_aux(out.records)
        metrics = {"contrastive_loss": contrastive, "aux_loss": aux, "logit_scale": out.logit_scale}
        for layer, record in out.records.items():
            values = record["moe"]
            for key in ("drop_fraction", "router_entropy", "load_balancing", "router_z"):
                if key in values:
                    metrics[f"moe/{layer}/{key}"] = values[key]
            metrics[f"moe/{layer}/expert_load"] = values["expert_load"]
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return contrastive + aux, (metrics, new_rest)

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array], Health]:
        (loss, (metrics, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.rest, batch)
        grad_norm = _global_norm(grads)
        # One test from values computed anyway: a NaN/Inf in any gradient makes their norm non-finite.
        inputs_ok = jnp.all(jnp.isfinite(batch["pixels"])) & jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(_):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            # open_clip clamps the temperature after every step: exp(logit_scale) stays within [1, 100].
            params["logit_scale"] = jax.tree.map(lambda v: jnp.clip(v, 0.0, LN_100), params["logit_scale"])
            return params, opt_state

        # A non-finite step is never applied (whatever config.nonfinite says). `cond`, not a select over every
        # weight and moment: the good path costs nothing extra. The step and router-noise counters still advance.
        params, opt_state = jax.lax.cond(inputs_ok, update, lambda _: (state.params, state.opt_state), None)
        param_norm = _global_norm(params)
        # A non-finite norm of the new params: an update from finite gradients overflowed.
        health = step_health(batch["pixels"], loss, grads, params, inputs_ok, jnp.isfinite(param_norm))
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, param_norm=param_norm, lr=schedule(state.step))
        return TrainState(state.step + 1, params, opt_state, rest), metrics, health

    return step


def flops_per_step(compiled: Any) -> float:
    """FLOPs of one compiled step from XLA's cost analysis (0 when the backend reports none)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return 0.0
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = float((analysis or {}).get("flops", 0.0))
    return flops if math.isfinite(flops) else 0.0
