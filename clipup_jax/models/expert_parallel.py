"""Expert parallelism: the capacity-padded MoE layer (`dispatch.padded`) with experts spread over a
mesh axis, as a `jax.shard_map` with static shapes.

Layout. Tokens `x` (G, S, D) and the routing arrays (G, S, k) are sharded on the group axis G over
the "group axes": `batch_axes` present in the mesh, plus `expert_axis` (appended if missing).
Outside the MoE layer the expert axis is one more data axis; inside it, it carries the experts.
Routing is per group, so it is decided before this layer, on whichever device holds the group;
each device therefore fills its own capacity buffers exactly as the single-device layer would.
Expert weights (E, ...) are sharded on E over `expert_axis` (`expert_weight_specs`).

Virtual experts. With EP devices on the expert axis and E experts, there are V = max(E, EP)
virtual experts, V_l = V / EP per device, each expert copied R = V / E times (R > 1 only when
E < EP). Replica `rep` of expert `e` is virtual expert `e * R + rep` and takes the `rep`-th
contiguous chunk of that expert's buffer rows (rows are `group * C + slot`, so replicas split the
groups). The weights are repeated R times before the shard_map and the repeat's transpose sums
the replicas' gradients. E and EP must divide one another.

Transports (`transport=`):

* `"all_to_all"`: local `to_buffers` (E, G_l*C, D) -> (V, N, D) -> `lax.all_to_all` over the
  expert axis, so each device receives its V_l virtual experts' rows from every peer
  (V_l, EP*N, D) -> `expert_mlp` -> `all_to_all` back -> `from_buffers`. Ships capacity-padded
  buffers: traffic is k * capacity_factor * tokens, whatever the routing.
* `"allgather"` (Levanter/MaxText ring): `all_gather` tokens and routing over the expert axis,
  each device scatters only its virtual experts' rows of all gathered groups, runs them, gathers
  their outputs weighted by the gates, then `psum_scatter` returns every group's sum to its owner.
  Traffic is independent of k and capacity.

Both compute exactly `dispatch.padded(x, r, capacity, w, act)` (up to float summation order in
the allgather transport), with the same drops; forward and gradients (x, gates, weights) match,
and experts that receive no token get exactly zero weight gradient.

Mesh axis types (see `clipup_jax.parallel.mesh`): with Auto axes (the default of `mesh.make_mesh`)
the function relies on `jax.shard_map` to reshard whatever sharding XLA propagated to `in_specs`
and lets GSPMD place the output. With Explicit axes, `jax.shard_map` would assert on mismatched
input shardings, so the inputs are `jax.reshard`ed to `in_specs` first and the output is
resharded back to `x`'s own sharding, so `x + moe(x)` type-checks. Mixing Auto and Explicit among
the axes used here is rejected.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from clipup_jax.parallel.mesh import AXIS_ORDER
from clipup_jax.models import dispatch
from clipup_jax.models.dispatch import Activation, ExpertWeights
from clipup_jax.models.routing import Routing

TRANSPORTS = ("all_to_all", "allgather")
DEFAULT_BATCH_AXES = AXIS_ORDER


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """How E experts map onto EP devices of the expert axis (see the module docstring)."""

    num_experts: int  # E
    axis_size: int  # EP
    virtual: int  # V = max(E, EP)
    replicas: int  # R = V // E: copies of each expert
    local: int  # V_l = V // EP: virtual experts per device

    @property
    def sharded(self) -> bool:
        """True when the weights themselves split over the expert axis (E >= EP)."""
        return self.replicas == 1


def expert_layout(num_experts: int, axis_size: int, expert_axis: str = "expert") -> ExpertLayout:
    if num_experts < 1 or axis_size < 1:
        raise ValueError(f"num_experts ({num_experts}) and the {expert_axis!r} axis size ({axis_size}) must be >= 1")
    if num_experts % axis_size and axis_size % num_experts:
        raise ValueError(
            f"num_experts={num_experts} is incompatible with the {expert_axis!r} mesh axis of size {axis_size}: "
            f"one must divide the other (E % EP == 0: E/EP experts per device; EP % E == 0: each expert "
            f"replicated EP/E times)")
    virtual = max(num_experts, axis_size)
    return ExpertLayout(num_experts, axis_size, virtual, virtual // num_experts, virtual // axis_size)


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape)


def group_axes(mesh, expert_axis: str = "expert",
               batch_axes: tuple[str, ...] = DEFAULT_BATCH_AXES) -> tuple[str, ...]:
    """Mesh axes the group axis G is split over inside the layer: `batch_axes` present in the
    mesh (in that order), then `expert_axis` if it was not among them."""
    names = tuple(mesh.axis_names)
    if expert_axis not in names:
        raise ValueError(f"expert_axis {expert_axis!r} is not an axis of the mesh {names}")
    axes = tuple(dict.fromkeys(a for a in batch_axes if a in names))
    return axes if expert_axis in axes else axes + (expert_axis,)


def token_spec(mesh, expert_axis: str = "expert", batch_axes: tuple[str, ...] = DEFAULT_BATCH_AXES) -> P:
    """PartitionSpec of `x` (G, S, D) and of the routing arrays (G, S, ...) inside the layer."""
    return P(group_axes(mesh, expert_axis, batch_axes), None, None)


def expert_weight_specs(num_experts: int, expert_axis_size: int, expert_axis: str = "expert") -> ExpertWeights:
    """PartitionSpecs of `ExpertWeights` for `num_experts` experts on an expert axis of that size:
    E split over `expert_axis` when E >= EP, replicated when E < EP (each device then uses one
    expert's copy; the layer repeats the weights to EP virtual experts itself)."""
    layout = expert_layout(num_experts, expert_axis_size, expert_axis)
    e = expert_axis if layout.sharded else None
    return ExpertWeights(fc1=P(e, None, None), b1=P(e, None), fc2=P(e, None, None), b2=P(e, None))


def expert_weight_shardings(mesh, num_experts: int, expert_axis: str = "expert") -> ExpertWeights:
    """`NamedSharding`s of `ExpertWeights` on `mesh` (for `jax.device_put` or jit `out_shardings`)."""
    sizes = _axis_sizes(mesh)
    if expert_axis not in sizes:
        raise ValueError(f"expert_axis {expert_axis!r} is not an axis of the mesh {tuple(sizes)}")
    specs = expert_weight_specs(num_experts, sizes[expert_axis], expert_axis)
    return ExpertWeights(*(NamedSharding(mesh, s) for s in specs))


def _mode(mesh, axes: tuple[str, ...]) -> str:
    """'explicit' when every axis used is Explicit, 'auto' when none is; mixed is rejected."""
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    explicit = {a for a in axes if types[a] == AxisType.Explicit}
    other = {a for a in axes if types[a] not in (AxisType.Explicit, AxisType.Auto)}
    if other:
        raise ValueError(f"mesh axes {sorted(other)} are Manual: expert_parallel_mlp must be called outside "
                         f"shard_map over them")
    if explicit and len(explicit) != len(axes):
        raise ValueError(f"mesh axes {axes} mix Explicit ({sorted(explicit)}) and Auto axis types; build the mesh "
                         f"with one axis type (clipup_jax.parallel.mesh.make_mesh)")
    return "explicit" if explicit else "auto"


def _routing(expert_index, gate, slot, kept) -> Routing:
    # The dispatchers read only these four fields.
    return Routing(expert_index=expert_index, gate=gate, slot=slot, kept=kept,
                   probs=None, logits=None, noisy_logits=None)


def _all_to_all_body(x, expert_index, gate, slot, kept, w: ExpertWeights, *, layout: ExpertLayout,
                     capacity: int, act: Activation, axis: str):
    ep, local, reps = layout.axis_size, layout.local, layout.replicas
    r = _routing(expert_index, gate, slot, kept)
    d = x.shape[-1]
    rows = x.shape[0] * capacity
    n = -(-rows // reps)  # rows per virtual expert, sent to each peer
    buf = dispatch.to_buffers(x, r, capacity, layout.num_experts)  # (E, G_l*C, D)
    if reps * n != rows:
        buf = jnp.pad(buf, ((0, 0), (0, reps * n - rows), (0, 0)))
    # (V, N, D), virtual expert v = e*R + rep on device v // V_l: chunk i goes to peer i.
    buf = jax.lax.all_to_all(buf.reshape(layout.virtual, n, d), axis, 0, 0, tiled=True)
    # Received (EP_src * V_l, N, D) -> each local virtual expert's rows from every peer.
    buf = buf.reshape(ep, local, n, d).transpose(1, 0, 2, 3).reshape(local, ep * n, d)
    out = dispatch.expert_mlp(buf, w, act)
    out = out.reshape(local, ep, n, d).transpose(1, 0, 2, 3).reshape(ep * local, n, d)
    out = jax.lax.all_to_all(out, axis, 0, 0, tiled=True)  # back: (V, N, D) in virtual-expert order
    out = out.reshape(layout.num_experts, reps * n, d)[:, :rows]
    return dispatch.from_buffers(out, r, capacity)


def _allgather_body(x, expert_index, gate, slot, kept, w: ExpertWeights, *, layout: ExpertLayout,
                    capacity: int, act: Activation, axis: str):
    local, reps = layout.local, layout.replicas

    def gather(a):
        return jax.lax.all_gather(a, axis, axis=0, tiled=True)

    x, expert_index, gate, slot, kept = map(gather, (x, expert_index, gate, slot, kept))
    g, s, d = x.shape
    k = expert_index.shape[-1]
    n = -(-(g * capacity) // reps)  # rows per virtual expert
    row = jnp.arange(g, dtype=jnp.int32)[:, None, None] * capacity + slot  # (G_all, S, k)
    virtual = expert_index * reps + row // n
    lv = virtual - jax.lax.axis_index(axis) * local  # this device's virtual experts: [0, V_l)
    mine = kept & (lv >= 0) & (lv < local)
    lv = jnp.where(mine, lv, local)  # out of range: skipped by the scatter, zero from the gather
    lrow = row % n
    tokens = jnp.broadcast_to(x[:, :, None, :], (g, s, k, d))
    buf = jnp.zeros((local, n, d), x.dtype).at[lv, lrow].add(tokens, mode="drop")
    out = dispatch.expert_mlp(buf, w, act)
    picked = out.at[lv, lrow].get(mode="fill", fill_value=0)  # (G_all, S, k, D)
    y = jnp.einsum("gskd,gsk->gsd", picked, jnp.where(mine, gate, 0.0).astype(out.dtype))
    # Every (group, token) output is the sum of its k assignments' contributions over the devices.
    return jax.lax.psum_scatter(y, axis, scatter_dimension=0, tiled=True)


_BODIES = {"all_to_all": _all_to_all_body, "allgather": _allgather_body}


def expert_parallel_mlp(x: jax.Array, r: Routing, capacity: int, w: ExpertWeights, act: Activation, *,
                        mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                        expert_axis: str = "expert",
                        batch_axes: tuple[str, ...] = DEFAULT_BATCH_AXES,
                        transport: str = "all_to_all") -> jax.Array:
    """`dispatch.padded(x, r, capacity, w, act)` with the experts spread over `expert_axis`.

    x: (G, S, D); r: routing of the same G groups (only expert_index/gate/slot/kept are read);
    capacity: per-group slots per expert (C); w: stacked expert weights (E, ...); mesh: a `Mesh`
    (or `AbstractMesh`; default: the mesh set by `jax.set_mesh`). G must be divisible by the
    product of the group axes' sizes (`group_axes`). Returns (G, S, D).
    """
    if transport not in _BODIES:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.axis_names:
            raise ValueError("expert_parallel_mlp needs a mesh: pass mesh= or call it under jax.set_mesh(mesh)")
    if x.ndim != 3:
        raise ValueError(f"x must be (groups, tokens, features), got shape {x.shape}")
    num_groups, seq, _ = x.shape
    if r.expert_index.ndim != 3 or r.expert_index.shape[:2] != (num_groups, seq):
        raise ValueError(f"routing arrays must be (G, S, k) = ({num_groups}, {seq}, k), got "
                         f"{r.expert_index.shape}; vmap the router over groups")
    if capacity < 1:
        raise ValueError(f"capacity ({capacity}) must be >= 1")
    num_experts = w.fc1.shape[0]
    if any(a.shape[0] != num_experts for a in w):
        raise ValueError(f"expert weights disagree on the number of experts: {[a.shape for a in w]}")
    sizes = _axis_sizes(mesh)
    axes = group_axes(mesh, expert_axis, batch_axes)
    layout = expert_layout(num_experts, sizes[expert_axis], expert_axis)
    shards = math.prod(sizes[a] for a in axes)
    if num_groups % shards:
        raise ValueError(f"{num_groups} groups cannot be split over mesh axes {axes} ({shards} shards); "
                         f"the number of groups must be a multiple of {shards}")
    mode = _mode(mesh, axes)

    if layout.replicas > 1:  # E < EP: one virtual expert per device, each a copy of expert v // R
        w = ExpertWeights(*(jnp.repeat(a, layout.replicas, axis=0) for a in w))
    tspec = P(axes, None, None)
    wspec = ExpertWeights(P(expert_axis, None, None), P(expert_axis, None), P(expert_axis, None, None),
                          P(expert_axis, None))
    inputs = (x, r.expert_index, r.gate, r.slot, r.kept, w)
    specs = (tspec,) * 5 + (wspec,)
    out_sharding = None
    if mode == "explicit":
        out_sharding = NamedSharding(mesh, jax.typeof(x).sharding.spec)
        named = functools.partial(NamedSharding, mesh)
        inputs = jax.reshard(inputs, (named(tspec),) * 5 + (ExpertWeights(*map(named, wspec)),))

    body = _BODIES[transport]

    def run(x, expert_index, gate, slot, kept, w):
        return body(x, expert_index, gate, slot, kept, w, layout=layout, capacity=capacity, act=act,
                    axis=expert_axis)

    y = jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=tspec)(*inputs)
    if out_sharding is not None:
        y = jax.reshard(y, out_sharding)
    return y
