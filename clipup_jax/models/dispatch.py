"""Moving tokens to experts and back: every path computes the same function.

Shapes: `x` is (G, S, D), G routing groups (samples) of S tokens; routing
arrays carry the same leading (G, S) axes (`jax.vmap` of the routers). Expert
weights are stacked on a leading expert axis (`ExpertWeights`).

* `einsum`: one-hot dispatch/combine tensors (G, S, E, C); the GShard/V-MoE
  reference with capacity, fine for small E.
* `padded`: the same buffers (E, G*C, D) built by scatter and read back by
  gather, with no one-hot matmuls: the fast CPU choice (and the layout the
  expert-parallel all-to-all ships).
* `sorted_grouped`: assignments sorted by expert and a grouped matmul (`ragged_dot`
  or the Pallas kernel); no buffer slots, so no work for capacity nobody uses.
* `expert_loop`: assignments sorted by expert, then a loop over experts, each
  running its MLP on its rows in chunks (`ChunkSchedule`): no capacity padding
  and no masked grouped matmul (what XLA:CPU makes of `ragged_dot`), so a pass
  costs its active FLOPs; its backward pass runs the same loops.
* `dense_reference`: every expert on every token, weighted by the combine
  weights; float32, for tests.

Dropped assignments (gate 0) contribute nothing, so a dropped token passes
through the residual only. Experts that receive no token get exactly zero
gradient on every path.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from clipup_jax.models.grouped_matmul import GROUPED_MATMULS
from clipup_jax.models.routing import ExpertChoice, Routing


class ExpertWeights(NamedTuple):
    """The experts' MLPs, stacked on a leading expert axis; or, for `expert_loop` only, per-expert tuples of
    buffers (`MoeMlp.split_experts`: XLA:CPU copies an expert's slice of a stack before its matmuls)."""

    fc1: jax.Array  # (E, D, F)
    b1: jax.Array  # (E, F)
    fc2: jax.Array  # (E, F, D)
    b2: jax.Array  # (E, D)


Activation = Callable[[jax.Array], jax.Array]


def expert_mlp(h: jax.Array, w: ExpertWeights, act: Activation) -> jax.Array:
    """(E, N, D) per-expert buffers through each expert's MLP: two batched matmuls."""
    dtype = h.dtype
    z = jnp.einsum("end,edf->enf", h, w.fc1.astype(dtype)) + w.b1.astype(dtype)[:, None]
    return jnp.einsum("enf,efd->end", act(z), w.fc2.astype(dtype)) + w.b2.astype(dtype)[:, None]


def _flat_slots(r: Routing, capacity: int) -> tuple[jax.Array, jax.Array]:
    """(G, S, k) buffer row g*C + slot of each assignment (one past the end where dropped: negative
    indices would wrap), and its combine weight (0 where dropped)."""
    num_groups = r.slot.shape[0]
    groups = jnp.arange(num_groups, dtype=jnp.int32)[:, None, None]
    row = jnp.where(r.kept, groups * capacity + r.slot, num_groups * capacity)
    return row, jnp.where(r.kept, r.gate, 0.0)


def to_buffers(x: jax.Array, r: Routing, capacity: int, num_experts: int) -> jax.Array:
    """Scatter kept assignments into per-expert buffers (E, G*C, D); empty slots stay zero."""
    g, s, d = x.shape
    row, _ = _flat_slots(r, capacity)
    k = r.expert_index.shape[-1]
    tokens = jnp.broadcast_to(x[:, :, None, :], (g, s, k, d))
    buffers = jnp.zeros((num_experts, g * capacity, d), x.dtype)
    # Each (expert, row) is claimed by at most one assignment; dropped ones fall outside and are skipped.
    return buffers.at[r.expert_index, row].add(tokens, mode="drop")


def from_buffers(out: jax.Array, r: Routing, capacity: int) -> jax.Array:
    """Gather each assignment's expert output and combine with its gate: (G, S, D)."""
    row, gate = _flat_slots(r, capacity)
    picked = out.at[r.expert_index, row].get(mode="fill", fill_value=0)  # (G, S, k, D)
    return jnp.einsum("gskd,gsk->gsd", picked, gate.astype(out.dtype))


def padded(x: jax.Array, r: Routing, capacity: int, w: ExpertWeights, act: Activation) -> jax.Array:
    buffers = to_buffers(x, r, capacity, w.fc1.shape[0])
    return from_buffers(expert_mlp(buffers, w, act), r, capacity)


def einsum(x: jax.Array, r: Routing, capacity: int, w: ExpertWeights, act: Activation) -> jax.Array:
    g, s, d = x.shape
    e = w.fc1.shape[0]
    onehot = (jax.nn.one_hot(r.expert_index, e, dtype=x.dtype)[..., None]
              * jax.nn.one_hot(jnp.where(r.kept, r.slot, capacity), capacity, dtype=x.dtype)[..., None, :])
    dispatch = onehot.sum(axis=2)  # (G, S, E, C): a slot holds at most one assignment
    combine = jnp.einsum("gskec,gsk->gsec", onehot, jnp.where(r.kept, r.gate, 0.0).astype(x.dtype))
    buffers = jnp.einsum("gsec,gsd->egcd", dispatch, x).reshape(e, g * capacity, d)
    out = expert_mlp(buffers, w, act).reshape(e, g, capacity, d)
    return jnp.einsum("gsec,egcd->gsd", combine, out)


def sorted_grouped(x: jax.Array, r: Routing, w: ExpertWeights, act: Activation, backend: str) -> jax.Array:
    """Sort (token, choice) rows by expert, two grouped matmuls, scatter back weighted by the gates."""
    g, s, d = x.shape
    e = w.fc1.shape[0]
    gmm = GROUPED_MATMULS[backend]
    k = r.expert_index.shape[-1]
    expert = jnp.where(r.kept, r.expert_index, e).reshape(-1)  # dropped rows sort last
    token = jnp.broadcast_to(jnp.arange(g * s, dtype=jnp.int32).reshape(g, s, 1), (g, s, k)).reshape(-1)
    gate = jnp.where(r.kept, r.gate, 0.0).reshape(-1)
    order = jnp.argsort(expert, stable=True)
    expert, token, gate = expert[order], token[order], gate[order]
    kept = expert < e
    sizes = jnp.bincount(expert, length=e + 1)
    # Dropped rows (zeros in, gate 0 out) join the last group so the groups cover every row: grouped-matmul
    # kernels leave rows outside all groups undefined, and zero rows add nothing to any gradient.
    sizes = sizes[:e].at[e - 1].add(sizes[e])
    rows = jnp.where(kept[:, None], x.reshape(g * s, d)[token], 0)
    bias_index = jnp.minimum(expert, e - 1)
    dtype = x.dtype
    h = gmm(rows, w.fc1.astype(dtype), sizes) + w.b1.astype(dtype)[bias_index]
    out = gmm(act(h), w.fc2.astype(dtype), sizes) + w.b2.astype(dtype)[bias_index]
    y = jnp.zeros((g * s, d), dtype).at[token].add(out * gate[:, None].astype(dtype))
    return y.reshape(g, s, d)


@dataclasses.dataclass(frozen=True)
class ChunkSchedule:
    """How `expert_loop` cuts an expert's rows into matmuls: chunks of `largest` rows while that many are left,
    then one chunk of the smallest multiple of `step` that holds the rest (reading < `step` rows past the end).

    Each chunk reads the expert's weights once, so one chunk per expert is what small batches want (at inference
    an expert's weights outweigh its few hundred rows); each remainder size is a branch of the compiled program,
    so a finer `step` wastes fewer rows but compiles more code (training's backward runs the schedule too).
    `step` is the finest; `for_rows` coarsens it where experts get many rows or are narrow.
    """

    largest: int
    step: int

    def __post_init__(self):
        if not (0 < self.step <= self.largest and self.largest % self.step == 0):
            raise ValueError(f"ChunkSchedule({self.largest}, {self.step}): step must divide largest")

    def for_rows(self, n: int, experts: int, row_flops: int) -> ChunkSchedule:
        """The schedule for `n` rows in all over `experts` experts whose MLP costs `row_flops` per row.

        No chunk is larger than the rows can fill (the compiled slices must fit). The step doubles, up to a
        quarter of `largest`, while the rows a remainder can waste stay within 1/32 of an expert's expected rows
        or cost at most `WASTE_FLOPS`: experts with thousands of rows, or too narrow for a row to matter, compile a
        few remainder sizes, not dozens.
        """
        def cheap(step: int) -> bool:
            return step <= n / experts / 32 or step * row_flops <= WASTE_FLOPS

        step = self.step
        while 2 * step <= self.largest // 4 and self.largest % (2 * step) == 0 and cheap(2 * step):
            step *= 2
        return ChunkSchedule(min(self.largest, -(-n // step) * step), step)


WASTE_FLOPS = 2**22  # what a remainder's wasted rows may cost whatever their share: microseconds of one CPU core
TRAIN_CHUNKS = ChunkSchedule(largest=512, step=128)
INFERENCE_CHUNKS = ChunkSchedule(largest=512, step=16)


def expert_loop(x: jax.Array, r: Routing, w: ExpertWeights, act: Activation,
                chunks: ChunkSchedule = TRAIN_CHUNKS) -> jax.Array:
    """Each expert's MLP on exactly the rows routed to it (kept assignments only).

    Rows are sorted by expert and expert e's rows [start_e, end_e) run in `chunks`' schedule. A last chunk's
    rows past end_e belong to the next expert (which runs later and overwrites them), to dropped assignments
    (gate 0) or to zero padding at the end, so every kept row ends up computed by its own expert. The loops'
    trip counts depend on the routing, which reverse-mode autodiff cannot differentiate through, so the
    backward pass is written out (`_looped_mlp`'s VJP) with the same schedule.
    """
    g, s, d = x.shape
    per_expert = isinstance(w.fc1, tuple)
    e = len(w.fc1) if per_expert else w.fc1.shape[0]
    k = r.expert_index.shape[-1]
    n = g * s * k
    hidden = w.fc1[0].shape[-1]  # expert 0's (D, F) kernel, stacked or not
    chunks = chunks.for_rows(n, e, row_flops=4 * d * hidden)  # fc1 and fc2, 2 * D * F each
    expert = jnp.where(r.kept, r.expert_index, e).reshape(-1)  # dropped rows sort last and are never run
    order = jnp.argsort(expert, stable=True)
    rows = jnp.concatenate([x.reshape(g * s, d)[order // k], jnp.zeros((chunks.step, d), x.dtype)])
    sizes = jnp.bincount(expert, length=e + 1)[:e]
    ends = jnp.cumsum(sizes)
    dtype = x.dtype
    w = jax.tree.map(lambda a: a.astype(dtype), w)
    if per_expert:  # each expert's own buffers, one after another: no slice of a stack to copy (inference only)
        out = _per_expert_forward(rows, ends - sizes, ends, w, act, chunks)
    else:
        out = _looped_mlp(rows, ends - sizes, ends, w, act, chunks)
    slot = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))  # sorted row of each assignment
    picked = out[slot].reshape(g, s, k, d)
    return jnp.einsum("gskd,gsk->gsd", picked, jnp.where(r.kept, r.gate, 0.0).astype(dtype))


def _chunked(start: jax.Array, end: jax.Array, chunks: ChunkSchedule, body, carry):
    """`carry = body(at, size, carry)` over the rows [start, end) in `chunks`' schedule."""
    big, step = chunks.largest, chunks.step
    at, carry = jax.lax.while_loop(lambda c: end - c[0] >= big, lambda c: (c[0] + big, body(c[0], big, c[1])),
                                   (start, carry))
    # Branch i runs one chunk of i * step rows; branch 0 (nothing left) none.
    branches = [lambda at, c: c] + [functools.partial(lambda at, c, size: body(at, size, c), size=size)
                                    for size in range(step, big + 1, step)]
    return jax.lax.switch((end - at + step - 1) // step, branches, at, carry)


def _rows(a: jax.Array, at: jax.Array, size: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(a, at, size)


def _put(a: jax.Array, rows: jax.Array, at: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(a, rows, at, 0)


def _per_expert_forward(rows, starts, ends, w: ExpertWeights, act: Activation, chunks) -> jax.Array:
    """`_looped_forward` over per-expert buffers: a python loop over the experts, the same chunk schedule."""
    out = jnp.zeros_like(rows)
    for i, (w1, b1, w2, b2) in enumerate(zip(*w)):
        def body(at, size, out, w1=w1, b1=b1, w2=w2, b2=b2):
            return _put(out, act(_rows(rows, at, size) @ w1 + b1) @ w2 + b2, at)

        out = _chunked(starts[i], ends[i], chunks, body, out)
    return out


def _looped_forward(rows, starts, ends, w: ExpertWeights, act: Activation, chunks, keep_hidden: bool):
    def run_expert(i, carry):
        w1, b1, w2, b2 = (a[i] for a in w)

        def body(at, size, carry):
            out, hidden = carry
            h = _rows(rows, at, size) @ w1 + b1
            out = _put(out, act(h) @ w2 + b2, at)
            return out, _put(hidden, h, at) if keep_hidden else hidden

        return _chunked(starts[i], ends[i], chunks, body, carry)

    hidden = jnp.zeros((rows.shape[0] if keep_hidden else 0, w.fc1.shape[-1]), rows.dtype)
    return jax.lax.fori_loop(0, w.fc1.shape[0], run_expert, (jnp.zeros_like(rows), hidden))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _looped_mlp(rows, starts, ends, w: ExpertWeights, act: Activation, chunks: ChunkSchedule) -> jax.Array:
    """Sorted rows through their experts' MLPs (rows [starts[e], ends[e]) belong to expert e)."""
    return _looped_forward(rows, starts, ends, w, act, chunks, keep_hidden=False)[0]


def _looped_mlp_fwd(rows, starts, ends, w, act, chunks):
    out, hidden = _looped_forward(rows, starts, ends, w, act, chunks, keep_hidden=True)
    return out, (rows, starts, ends, w, hidden)


def _looped_mlp_bwd(act, chunks, residuals, d_out):
    rows, starts, ends, w, hidden = residuals

    def run_expert(i, carry):
        d_rows, grads = carry
        w1, _, w2, _ = (a[i] for a in w)

        def body(at, size, carry):
            d_rows, acc = carry
            mine = (at + jnp.arange(size) < ends[i])[:, None]  # rows past end_e are another expert's
            dy = jnp.where(mine, _rows(d_out, at, size), 0)
            a, act_vjp = jax.vjp(act, _rows(hidden, at, size))
            dh = act_vjp(dy @ w2.T)[0]
            acc = (acc[0] + _rows(rows, at, size).T @ dh, acc[1] + dh.sum(0), acc[2] + a.T @ dy, acc[3] + dy.sum(0))
            return _put(d_rows, dh @ w1.T, at), acc

        d_rows, acc = _chunked(starts[i], ends[i], chunks, body, (d_rows, tuple(jnp.zeros_like(a[i]) for a in w)))
        return d_rows, ExpertWeights(*(g.at[i].set(a) for g, a in zip(grads, acc)))

    zeros = (jnp.zeros_like(rows), ExpertWeights(*(jnp.zeros_like(a) for a in w)))
    d_rows, grads = jax.lax.fori_loop(0, w.fc1.shape[0], run_expert, zeros)
    return d_rows, None, None, grads


_looped_mlp.defvjp(_looped_mlp_fwd, _looped_mlp_bwd)


def combine_weights(r: Routing, num_experts: int) -> jax.Array:
    """(G, S, E) weight of each expert in each token's output (zero off the kept top-k)."""
    onehot = jax.nn.one_hot(r.expert_index, num_experts, dtype=jnp.float32)
    return jnp.einsum("gske,gsk->gse", onehot, jnp.where(r.kept, r.gate, 0.0))


def dense_reference(x: jax.Array, weights: jax.Array, w: ExpertWeights, act: Activation) -> jax.Array:
    """Every expert on every token in float32, mixed by `weights` (G, S, E)."""
    g, s, d = x.shape
    e = w.fc1.shape[0]
    f32 = ExpertWeights(*(a.astype(jnp.float32) for a in w))
    everything = jnp.broadcast_to(x.astype(jnp.float32).reshape(1, g * s, d), (e, g * s, d))
    out = expert_mlp(everything, f32, act).reshape(e, g, s, d)
    return jnp.einsum("gse,egsd->gsd", weights, out).astype(x.dtype)


def expert_choice(x: jax.Array, ec: ExpertChoice, w: ExpertWeights, act: Activation) -> jax.Array:
    """Each expert gathers its chosen tokens (G, E, C); outputs are scattered back weighted by the gates."""
    g, s, d = x.shape
    e, c = ec.token_index.shape[-2:]
    buffers = jnp.take_along_axis(x[:, None], ec.token_index[..., None], axis=2)  # (G, E, C, D)
    out = expert_mlp(buffers.transpose(1, 0, 2, 3).reshape(e, g * c, d), w, act).reshape(e, g, c, d)
    out = out.transpose(1, 0, 2, 3) * ec.gate[..., None].astype(x.dtype)
    groups = jnp.arange(g)[:, None, None]
    return jnp.zeros_like(x).at[groups, ec.token_index].add(out)


def expert_choice_weights(ec: ExpertChoice, seq_len: int) -> jax.Array:
    """(G, S, E) combine weights of expert-choice routing, for the dense reference."""
    g, e, c = ec.token_index.shape
    groups = jnp.arange(g)[:, None, None]
    experts = jnp.arange(e)[None, :, None]
    return jnp.zeros((g, seq_len, e), jnp.float32).at[groups, ec.token_index, experts].add(ec.gate)
