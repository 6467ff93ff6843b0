"""The one decision of how an MoE layer moves its tokens: (plan, mode, mesh, backend) -> `Dispatcher`.

The layer, the trainer's config check, the memory planner and the layout table all ask `choose`, so
what they plan, print and refuse is what runs. A plan names a dispatch per mode (`moe.dispatch` for
training, `moe.eval_dispatch` for inference and periodic eval); an explicit name is used as given or
refused with the reason, never replaced. `"auto"` means:

* experts spread over an `expert` mesh axis (> 1 device): the capacity-padded buffers shipped by
  all-to-all (`expert_parallel`, transport `moe.ep_transport`), the only expert-parallel form;
* on CPU, `expert_loop`: each expert's matmuls over exactly its kept rows, so no work for unused
  capacity (XLA:CPU lowers `ragged_dot` to a masked dense matmul over every expert, and capacity
  buffers cost E x C rows per group; `benchmarks/inference.py` and RESULTS.md have the figures);
* on GPU and TPU, with a capacity factor, `einsum` on TPU (one-hot matmuls suit the MXU, scatters
  do not) and `padded` (scatter/gather buffers) on GPU; dropless, the grouped matmul `ragged_dot`.

Expert-choice routing has its own gather/scatter (`expert_choice`); only `dense_reference` replaces it.
The sorted dispatches sort the whole batch, so on a mesh that splits the batch they run per device
(`shard_map` over the batch axes, weights gathered as FSDP does anyway).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from clipup_jax.config import TOWERS, ModelConfig, MoEPlan
from clipup_jax.models import dispatch, expert_parallel
from clipup_jax.models.dispatch import Activation, ExpertWeights
from clipup_jax.models.routing import Routing, capacity as slots_per_expert
from clipup_jax.parallel.mesh import AXIS_ORDER

EXPERT_AXIS = "expert"
SORTED = ("ragged_dot", "pallas", "expert_loop")  # sort the batch's rows by expert: no buffer slots


@dataclasses.dataclass(frozen=True)
class Dispatcher:
    """What one MoE layer runs in one mode; `describe()` is what the layout table prints."""

    kind: str  # a name of config.DISPATCHES other than "auto", or "expert_choice"
    capacity_factor: float | None  # None: dropless
    expert_axis_size: int = 1  # > 1: experts spread over the mesh's `expert` axis
    transport: str = "all_to_all"  # how tokens reach experts when they are spread
    chunks: dispatch.ChunkSchedule = dispatch.TRAIN_CHUNKS  # expert_loop's matmul sizes

    @property
    def expert_parallel(self) -> bool:
        return self.expert_axis_size > 1 and self.kind == "padded"

    @property
    def row_local(self) -> bool:
        """Whether a token's output depends on that token alone (dropless token choice), so that computing only
        some tokens' outputs gives them exactly (a tower's last block computes only the row it pools)."""
        return self.capacity_factor is None and self.kind != "expert_choice"

    def describe(self) -> str:
        capacity = "dropless" if self.capacity_factor is None else f"capacity {self.capacity_factor:g}"
        if self.expert_parallel:
            return f"padded, expert-parallel over {self.expert_axis_size} ({self.transport}), {capacity}"
        return f"{self.kind}, {capacity}"

    def rows_per_group(self, tokens: int, num_experts: int, top_k: int) -> int:
        """Rows of expert-MLP work for one routing group of `tokens` tokens: what the planner budgets."""
        if self.kind == "expert_choice":
            return num_experts * slots_per_expert(tokens, num_experts, 1, self.capacity_factor)
        if self.kind in SORTED:
            return tokens * top_k
        if self.kind == "dense_reference":
            return tokens * num_experts
        return num_experts * slots_per_expert(tokens, num_experts, top_k, self.capacity_factor)

    def __call__(self, x: jax.Array, r: Routing, capacity: int, w: ExpertWeights, act: Activation) -> jax.Array:
        """The layer's output for tokens `x` (G, S, D) routed by `r` (top-k routing)."""
        if self.expert_parallel:
            return expert_parallel.expert_parallel_mlp(x, r, capacity, w, act, transport=self.transport)
        per_group = {"dense_reference": lambda x, r, w: dispatch.dense_reference(
                         x, dispatch.combine_weights(r, w.fc1.shape[0]), w, act),
                     "einsum": lambda x, r, w: dispatch.einsum(x, r, capacity, w, act),
                     "padded": lambda x, r, w: dispatch.padded(x, r, capacity, w, act)}.get(self.kind)
        if per_group is not None:
            return group_local(per_group)(x, r, w)
        if self.kind == "expert_loop":
            local = functools.partial(dispatch.expert_loop, act=act, chunks=self.chunks)
        else:
            local = functools.partial(dispatch.sorted_grouped, act=act, backend=self.kind)
        return _per_device(local, x, r, w)


def choose(plan: MoEPlan, *, train: bool, mesh_shape: Mapping[str, int] | None = None,
           backend: str | None = None, where: str = "moe") -> Dispatcher:
    """The dispatcher `plan` runs in training (`train`) or inference on a mesh of `mesh_shape` (axis sizes;
    None: one device) and `backend` (default: JAX's); a ValueError naming `where`'s field if it cannot run."""
    backend = backend or jax.default_backend()
    ep = dict(mesh_shape or {}).get(EXPERT_AXIS, 1)
    field = "dispatch" if train else "eval_dispatch"
    requested = getattr(plan, field)
    factor = plan.capacity_factor if train else plan.eval_capacity_factor
    if ep > 1:
        try:
            expert_parallel.expert_layout(plan.num_experts, ep)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    # Inference runs each expert's rows in one chunk where it can; training's backward doubles the compiled branches.
    made = functools.partial(Dispatcher, capacity_factor=factor, expert_axis_size=ep, transport=plan.ep_transport,
                             chunks=dispatch.TRAIN_CHUNKS if train else dispatch.INFERENCE_CHUNKS)
    if requested == "dense_reference":
        return made("dense_reference")
    if plan.router == "expert_choice":
        if requested != "auto":
            raise ValueError(f"{where}.{field}={requested!r}: router 'expert_choice' has its own gather/scatter "
                             "dispatch; use 'auto' (or 'dense_reference')")
        return made("expert_choice")
    if ep > 1:
        if requested not in ("auto", "padded"):
            raise ValueError(f"{where}.{field}={requested!r} has no expert-parallel form (the mesh's expert axis "
                             f"has {ep} devices); use 'padded' or 'auto'")
        return made("padded")
    if requested == "auto":
        if backend == "cpu":
            requested = "expert_loop"
        elif factor is None:
            requested = "ragged_dot"
        else:
            requested = "einsum" if backend == "tpu" else "padded"
    return made(requested)


def model_dispatchers(cfg: ModelConfig, mesh_shape: Mapping[str, int] | None = None,
                      backend: str | None = None) -> dict[str, tuple[Dispatcher, Dispatcher]]:
    """(training, inference) dispatchers of each sparse tower ('vision', 'text'), errors naming the config field."""
    out = {}
    for tower, (_, field) in TOWERS.items():
        plan = getattr(cfg, field).moe
        if plan is not None:
            where = f"config.model.{field}.moe"
            out[tower] = tuple(choose(plan, train=train, mesh_shape=mesh_shape, backend=backend, where=where)
                               for train in (True, False))
    return out


def describe_dispatchers(dispatchers: Mapping[str, tuple[Dispatcher, Dispatcher]]) -> str:
    return "\n".join(f"MoE dispatch, {tower} tower: train {t.describe()}; eval {e.describe()}"
                     for tower, (t, e) in dispatchers.items())


def group_local(fn):
    """`fn` (arrays with a leading routing-group axis in, the same out) made to run under Explicit mesh axes.

    Routing and single-device dispatch gather and scatter within a group (a sample); the sharding type
    system cannot prove that, so under Explicit axes they run with the axes switched to Auto (GSPMD
    partitions them along the group axis, as it does on an Auto mesh) and hand back group-sharded outputs.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not any(t == AxisType.Explicit for t in mesh.axis_types):
        return fn

    def run(*args):
        groups = jax.typeof(args[0]).sharding.spec[0]
        return jax.sharding.auto_axes(fn, out_sharding=P(groups))(*args)

    return run


def _per_device(local, x: jax.Array, r: Routing, w: ExpertWeights) -> jax.Array:
    """`local(x, r, w)` on each device's groups when the mesh splits the batch, else on the whole batch."""
    mesh = jax.sharding.get_abstract_mesh()
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    axes = tuple(a for a in AXIS_ORDER if sizes.get(a, 1) > 1)
    if not axes:
        return local(x, r, w)
    if x.shape[0] % math.prod(sizes[a] for a in axes):
        raise ValueError(f"{x.shape[0]} routing groups cannot be split over mesh axes {axes}")
    routes = (r.expert_index, r.gate, r.kept)
    groups, whole = P(axes), ExpertWeights(P(), P(), P(), P())
    explicit = any(t == AxisType.Explicit for t in mesh.axis_types)
    if explicit:  # shard_map asserts its inputs' shardings on Explicit axes; Auto ones it reshards itself
        named = functools.partial(NamedSharding, mesh)
        out_sharding = named(jax.typeof(x).sharding.spec)
        x, routes, w = jax.reshard((x, routes, w), (named(groups), (named(groups),) * 3,
                                                    ExpertWeights(*(named(P()),) * 4)))

    def run(x, routes, w):
        expert_index, gate, kept = routes
        return local(x, Routing(expert_index=expert_index, gate=gate, slot=jnp.zeros_like(expert_index), kept=kept,
                                probs=None, logits=None, noisy_logits=None), w)

    # check_vma=False: the loops of `expert_loop` start from zeros the vma type system would need cast to
    # "varying" by hand; nothing inside communicates, so there is nothing for it to check.
    y = jax.shard_map(run, mesh=mesh, in_specs=(groups, (groups,) * 3, whole), out_specs=groups,
                      check_vma=False)(x, routes, w)
    return jax.reshard(y, out_sharding) if explicit else y

