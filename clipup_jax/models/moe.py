"""The MoE MLP: router + dispatch + experts stacked on a leading `expert` axis.

Parameter names mirror the dense `Mlp` (`fc1_kernel` (D, F) becomes (E, D, F)),
so upcycling is a tiling of the dense tree plus a new `router_kernel`.
Routing groups are samples: an image's patches or a caption's tokens. How the
tokens reach the experts is `dispatcher.choose`'s decision for the plan, the mode
(training or inference) and the mesh set by `jax.set_mesh`; every choice computes
the same function.

`forward(x, metrics=True)` also returns the layer's routing metrics and aux
losses (what an encoder returns as its "moe" record); `moe_aux` turns those of
every layer into the one weighted `aux_loss` the training loss adds. Inference
asks for none, and none are computed.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from clipup_jax.config import Activation, MoEPlan
from clipup_jax.models import aux_losses, dispatch, dispatcher, routing
from clipup_jax.models.layers import activation_fn, mlp_init_stds, normal

class MoeMlp(nnx.Module):
    def __init__(self, width: int, mlp_dim: int, depth: int, activation: Activation, plan: MoEPlan,
                 rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        e = plan.num_experts
        self.plan = plan
        self.activation = activation
        self.dtype = dtype
        self.deterministic = True  # eval capacity, no router noise; `model.train()` flips it
        self.router_kernel = nnx.Param(normal(rngs, (width, e), plan.router_init_std), logical_axes=("embed", None))
        fc1_std, fc2_std = mlp_init_stds(width, depth)
        self.fc1_kernel = nnx.Param(normal(rngs, (e, width, mlp_dim), fc1_std), logical_axes=("expert", "embed", "mlp"))
        self.fc1_bias = nnx.Param(jnp.zeros((e, mlp_dim), jnp.float32), logical_axes=("expert", "mlp"))
        self.fc2_kernel = nnx.Param(normal(rngs, (e, mlp_dim, width), fc2_std), logical_axes=("expert", "mlp", "embed"))
        self.fc2_bias = nnx.Param(jnp.zeros((e, width), jnp.float32), logical_axes=("expert", "embed"))
        self.rngs = rngs["router"].fork() if plan.router_noise_std > 0 else nnx.data(None)

    def weights(self) -> dispatch.ExpertWeights:
        def value(param):  # a stack, or per-expert buffers after `split_experts`
            return tuple(p[...] for p in param) if isinstance(param, nnx.List) else param[...]

        return dispatch.ExpertWeights(*map(value, (self.fc1_kernel, self.fc1_bias, self.fc2_kernel, self.fc2_bias)))

    def split_experts(self) -> None:
        """Each expert's weights in buffers of its own, for inference by `expert_loop` (which alone reads them
        so): on XLA:CPU an expert's slice of a stack is copied before its matmuls, every call."""
        for name in ("fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias"):
            param = getattr(self, name)
            setattr(self, name, nnx.List([param.replace(param[...][e], logical_axes=param.logical_axes[1:])
                                          for e in range(self.plan.num_experts)]))

    def current_dispatcher(self) -> dispatcher.Dispatcher:
        """How this layer moves its tokens in its current mode (training or inference) on the current mesh."""
        mesh = jax.sharding.get_abstract_mesh()
        return dispatcher.choose(self.plan, train=not self.deterministic,
                                 mesh_shape=dict(zip(mesh.axis_names, mesh.axis_sizes)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (G, S, D), one routing group per sample."""
        return self.forward(x)[0]

    def forward(self, x: jax.Array, metrics: bool = False, routed: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """The layer's output and, when `metrics`, its routing metrics and weighted `aux_loss` (else None).

        `routed` (G, S) bool marks the tokens whose output can reach the model's (a causal tower's tokens up
        to the pooled one); at inference only those are dispatched, the rest pass through the residual. In
        training every token is routed: the recipe's capacity and aux losses are defined over all of them.
        """
        plan = self.plan
        g, s, _ = x.shape
        e = plan.num_experts
        train = not self.deterministic
        chosen = self.current_dispatcher()
        factor = chosen.capacity_factor
        logits = x.astype(jnp.float32) @ self.router_kernel[...].astype(jnp.float32)
        act, w = activation_fn(self.activation), self.weights()
        x = x.astype(self.dtype)
        if plan.router == "expert_choice":
            c = routing.capacity(s, e, 1, factor)
            ec = dispatcher.group_local(jax.vmap(lambda lg: routing.expert_choice_routing(lg, c)))(logits)
            if chosen.kind == "dense_reference":
                y = dispatcher.group_local(lambda x, ec, w: dispatch.dense_reference(
                    x, dispatch.expert_choice_weights(ec, s), w, act))(x, ec, w)
            else:
                y = dispatcher.group_local(lambda x, ec, w: dispatch.expert_choice(x, ec, w, act))(x, ec, w)
            return y, self._metrics(ec.probs, ec.logits, None, load=self._ec_load(ec),
                                    dropped=jax.vmap(routing.unchosen_fraction)(ec)) if metrics else None
        c = routing.capacity(s, e, plan.top_k, factor)
        noise = plan.router_noise_std if train else 0.0
        keys = jax.random.split(self.rngs(), g) if noise > 0 else None
        routed = None if train else routed
        route = jax.vmap(lambda lg, key, live: routing.top_k_routing(
            lg, plan.top_k, c, renormalize=plan.renormalize_gates, batch_priority=plan.batch_priority,
            noise_std=noise, rng=key, routed=live),
            in_axes=(0, 0 if keys is not None else None, 0 if routed is not None else None))
        r = dispatcher.group_local(route)(logits, keys, routed)
        y = chosen(x, r, c, w, act)
        if not metrics:
            return y, None
        counts = jax.vmap(lambda rr: routing.assignment_counts(rr, e))(r).sum(0)
        return y, self._metrics(r.probs, r.logits, r, load=counts / jnp.maximum(counts.sum(), 1),
                                dropped=jax.vmap(routing.drop_fraction)(r))

    @staticmethod
    def _ec_load(ec: routing.ExpertChoice) -> jax.Array:
        e = ec.token_index.shape[-2]
        return jnp.full((e,), 1.0 / e, jnp.float32)  # expert choice is balanced by construction

    def _metrics(self, probs: jax.Array, logits: jax.Array, r: routing.Routing | None, *, load: jax.Array,
                 dropped: jax.Array) -> dict[str, jax.Array]:
        plan = self.plan
        per_group = jax.vmap
        values = {
            "router_z": per_group(aux_losses.router_z_loss)(logits).mean(),
            "importance": per_group(aux_losses.importance_loss)(probs).mean(),
            "local_entropy": per_group(aux_losses.local_entropy_loss)(probs).mean(),
            "global_entropy": aux_losses.global_entropy_loss(probs.reshape(-1, probs.shape[-1]),
                                                             plan.global_entropy_threshold),
        }
        if r is not None:
            values["load_balancing"] = per_group(lambda p, i: aux_losses.load_balancing_loss(p, i))(
                probs, r.expert_index).mean()
            if plan.load_weight > 0 and not self.deterministic:
                values["load"] = per_group(lambda lg, nl: aux_losses.load_loss(
                    lg, nl, plan.top_k, plan.router_noise_std))(r.logits, r.noisy_logits).mean()
        weights = {name: getattr(plan, f"{name if name != 'router_z' else 'z_loss'}_weight") for name in values}
        metrics = dict(values)
        metrics["aux_loss"] = aux_losses.combine_aux_losses(values, weights)
        metrics["expert_load"] = load
        metrics["drop_fraction"] = dropped.mean()
        metrics["router_entropy"] = values["local_entropy"]
        return metrics


def moe_aux(records: Mapping[Any, dict[str, Any]]) -> jax.Array:
    """The summed weighted aux loss of every MoE layer in `records` (`CLIPOutput.records`, or an encoder's own:
    layer -> what it recorded; layers without a "moe" record add nothing)."""
    total = jnp.zeros((), jnp.float32)
    for record in records.values():
        if "moe" in record:
            total = total + record["moe"]["aux_loss"]
    return total
