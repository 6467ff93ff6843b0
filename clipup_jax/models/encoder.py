"""Pre-LN transformer blocks shared by both towers, run as a python loop or scanned over repeated periods."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from clipup_jax.config import Activation, MoEPlan
from clipup_jax.models.attention import SelfAttention
from clipup_jax.models.layers import LayerNorm, Mlp
from clipup_jax.models.moe import MoeMlp

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # store every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
}


def remat_policy(name: str) -> Callable | None:
    """The `jax.checkpoint` policy of a remat name; None for "none" (no rematerialisation)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r} (config.remat): expected one of {', '.join(map(repr, REMAT_POLICIES))}")
    return REMAT_POLICIES[name]


class MlpInput(nnx.Intermediate):
    """A block's MLP input (its `ln_2` output), sown only inside `nnx.capture(..., MlpInput)`: what an upcycled
    router will score, read on calibration data (checkpoints/router_init.py). `sow` matches the exact type, so
    the train step's capture of `nnx.Intermediate` never holds these."""


class Block(nnx.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)); the MLP is a `MoeMlp` when `moe` is given."""

    def __init__(self, width: int, heads: int, mlp_dim: int, depth: int, activation: Activation, ln_eps: float,
                 rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32, moe: MoEPlan | None = None):
        self.ln_1 = LayerNorm(width, ln_eps)
        self.attn = SelfAttention(width, heads, depth, rngs, dtype)
        self.ln_2 = LayerNorm(width, ln_eps)
        if moe is None:
            self.mlp = Mlp(width, mlp_dim, depth, activation, rngs, dtype)
        else:
            self.mlp = MoeMlp(width, mlp_dim, depth, activation, moe, rngs, dtype)

    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        x = x + self.attn(self.ln_1(x), causal)
        h = self.ln_2(x)
        if hasattr(self, "__captures__"):  # set by nnx.capture; sowing outside one is deprecated
            self.sow(MlpInput, "mlp_input", h)
        return x + self.mlp(h)


class Segment(NamedTuple):
    """Blocks start .. start + period * repeats - 1; a period of kinds that repeats (repeats 1 = the python loop)."""

    start: int
    period: int
    repeats: int


def plan_segments(kinds: tuple[bool, ...], max_period: int = 2) -> tuple[Segment, ...]:
    """Cut a layer plan (True = MoE block) into runs of one repeating period, greedily from the first block.

    Dense or all-MoE: one run of period 1; every_2: period 2 (a dense+MoE pair); last_N: a dense run then a MoE
    run; a block that starts no run of two or more periods is its own segment, run in the python loop.
    """
    segments, i = [], 0
    while i < len(kinds):
        best = Segment(i, 1, 1)
        for p in range(1, max_period + 1):
            reps = 1
            while i + (reps + 1) * p <= len(kinds) and kinds[i + reps * p:i + (reps + 1) * p] == kinds[i:i + p]:
                reps += 1
            if reps > 1 and p * reps > best.period * best.repeats:
                best = Segment(i, p, reps)
        segments.append(best)
        i += best.period * best.repeats
    return tuple(segments)


@contextlib.contextmanager
def _captures_detached(modules: list[nnx.Module]) -> Iterator[dict]:
    """Lift `nnx.capture`'s per-module `__captures__` off `modules` while their state is split and stacked,
    so the scanned copies carry only model state; the body captures afresh and sows back into the originals."""
    saved = {}
    for module in modules:
        for _, m in nnx.iter_modules(module):
            if hasattr(m, "__captures__"):
                saved[id(m)] = (m, m.__captures__)
                delattr(m, "__captures__")
    try:
        yield saved
    finally:
        for m, captures in saved.values():
            m.__captures__ = nnx.data(captures)


class Encoder(nnx.Module):
    """A stack of `Block`s, kept as a list (`blocks/0/...`) whatever the execution strategy.

    `scan=True` runs each repeating period of the layer plan (one block when dense or all-MoE, a dense+MoE pair
    for every_2; see `plan_segments`) with one `jax.lax.scan` over the blocks' stacked state, so the model's
    program stops growing with depth; blocks outside a repeating run (e.g. an odd last block) stay in the loop.

    The parameter tree is unchanged on purpose: checkpoint importers, upcycling, Orbax checkpoints and the
    sharding rules are all keyed on `blocks/i`, and scanning is only an execution strategy. The cost: every step
    stacks the block weights into a (repeats, ...) copy (sharded like the blocks), and the backward produces their
    stacked gradient before splitting it per block: without remat, up to two extra copies of the encoder's
    weights at peak (+4 GiB temp for a dense L/14 gradient, +10 GiB for CLIP-UP L/14; under remat the scanned
    train step measured no more than the loop). Work per parameter leaf (stack/unstack, the optimizer update)
    still grows with depth. Figures: benchmarks/RESULTS.md, "Compile time at depth".

    Inside the scan each period is a merged copy of its blocks; afterwards every block gets back the non-Param
    state the call changed (router-noise RNG counters, in training) and the MoE metrics sown in the body are
    sown again into it, so `moe_aux` sees the same layer names as the loop. `nnx.scan` expects a module whose
    state is already stacked, which this layout is not; `jax.lax.scan` over split state does exactly this.

    `remat` ("none", "full", "dots"; `REMAT_POLICIES`) recomputes activations in the backward pass under that
    `jax.checkpoint` policy: per period in the scan, per block in the loop.
    """

    def __init__(self, width: int, heads: int, mlp_dim: int, depth: int, activation: Activation, ln_eps: float,
                 rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32, moe: MoEPlan | None = None, remat: str = "none",
                 scan: bool = False):
        remat_policy(remat)  # fail at construction on a bad name
        self.remat = remat
        self.scan = scan
        sparse = set(moe.layer_indices(depth)) if moe is not None else set()
        self.segments = plan_segments(tuple(i in sparse for i in range(depth)))
        self.blocks = nnx.List([
            Block(width, heads, mlp_dim, depth, activation, ln_eps, rngs, dtype, moe if i in sparse else None)
            for i in range(depth)
        ])

    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        for seg in self.segments if self.scan else [Segment(i, 1, 1) for i in range(len(self.blocks))]:
            blocks = [self.blocks[i] for i in range(seg.start, seg.start + seg.period * seg.repeats)]
            if seg.repeats == 1 and self.remat == "none":
                for block in blocks:
                    x = block(x, causal)
            elif seg.repeats == 1:
                for block in blocks:
                    x = self._functional([block], 1, x, causal)
            else:
                x = self._functional(blocks, seg.period, x, causal)
        return x

    def _functional(self, blocks: list[Block], period: int, x: jax.Array, causal: bool) -> jax.Array:
        """`blocks` (repeats x period) as a pure function of their split state: one `lax.scan` over the repeats
        (a single call when there is one), checkpointed under the remat policy. Afterwards each block gets back
        the non-Param state the call changed and the intermediates it sowed."""
        repeats = len(blocks) // period
        with _captures_detached(blocks) as detached:
            captured = bool(detached)
            graphdefs, stacked = [], []
            for j in range(period):
                splits = [nnx.split(blocks[r * period + j], nnx.Param, ...) for r in range(repeats)]
                if any(s[0] != splits[0][0] for s in splits):
                    raise ValueError(f"blocks {[i for i in range(j, len(blocks), period)]} of a scanned segment "
                                     "differ in structure; they cannot share one scan body")
                graphdefs.append(splits[0][0])
                stacked.append((jax.tree.map(lambda *xs: _stack(*xs), *[p for _, p, _ in splits]),
                                jax.tree.map(lambda *xs: _stack_raw(xs), *[rest for _, _, rest in splits]))
                               if repeats > 1 else splits[0][1:])

        # Filled while tracing the body: which non-Param leaves a call changed (router-noise RNG counters in
        # training; nothing at eval) and which intermediates it sowed. Only those leave the body, so an
        # unchanged RNG stream is never written to (nor mutated across trace levels).
        changed: list[list[tuple]] = [[] for _ in range(period)]
        sown_paths: list[list[tuple]] = [[] for _ in range(period)]

        def body(h, states):
            new_rest, sown = [], []
            for j, (graphdef, (params, rest)) in enumerate(zip(graphdefs, states)):
                block = nnx.merge(graphdef, params, rest)
                before = [var.get_value() for _, var in nnx.to_flat_state(nnx.state(block, nnx.Not(nnx.Param)))]
                if captured:
                    h, inter = nnx.capture(lambda b, y: b(y, causal), nnx.Intermediate)(block, h)
                    flat = nnx.to_flat_state(inter)
                    sown_paths[j] = [path for path, _ in flat]
                    sown.append([var.get_value() for _, var in flat])
                else:
                    h = block(h, causal)
                    sown.append([])
                after = nnx.to_flat_state(nnx.state(block, nnx.Not(nnx.Param)))
                updates = [(path, var.get_value()) for (path, var), old in zip(after, before)
                           if var.get_value() is not old]
                changed[j] = [path for path, _ in updates]
                new_rest.append([value for _, value in updates])
            return h, (new_rest, sown)

        if self.remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(self.remat), prevent_cse=repeats == 1)
        x, (new_rest, sown) = jax.lax.scan(body, x, stacked) if repeats > 1 else body(x, stacked)
        unstack = _unstack if repeats > 1 else (lambda tree: [tree])
        for j in range(period):
            column = [blocks[r * period + j] for r in range(repeats)]
            for path, values in zip(changed[j], new_rest[j]):
                for block, value in zip(column, unstack(values)):
                    _at(block, path).set_value(value)
            for path, calls in zip(sown_paths[j], sown[j]):
                for call in calls:  # one entry per call of the block in the body: one
                    for block, value in zip(column, unstack(call)):
                        _at(block, path[:-1]).sow(nnx.Intermediate, path[-1], value)
        return x


# Stacking and unstacking with runtime offsets. `jnp.stack` is one N-operand concatenate per leaf, whose kernel
# grows with N (seconds of LLVM time each at L/14 depth on XLA:CPU), and its transpose is a static slice per
# block, whose offset is baked into its own kernel and into every fusion it joins (e.g. the optimizer update of
# that block's weights), so depth x leaves distinct kernels get compiled. With the offsets behind an
# optimization barrier they are runtime operands: each leaf shape costs one kernel whatever the depth.
def _offsets(n: int) -> tuple[jax.Array, ...]:
    return jax.lax.optimization_barrier(tuple(jnp.int32(r) for r in range(n)))


def _unstack(tree):
    """A pytree of (n, ...) arrays as n pytrees of its slices."""
    n = jax.tree.leaves(tree)[0].shape[0]
    offsets = _offsets(n)
    return [jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, offsets[r], keepdims=False), tree)
            for r in range(n)]


def _stack_raw(xs: tuple[jax.Array, ...]) -> jax.Array:
    out = jnp.zeros((len(xs),) + xs[0].shape, xs[0].dtype)
    for x, offset in zip(xs, _offsets(len(xs))):
        out = jax.lax.dynamic_update_index_in_dim(out, x, offset, 0)
    return out


@jax.custom_vjp
def _stack(*xs: jax.Array) -> jax.Array:
    """`jnp.stack(xs)` built and differentiated with runtime offsets (see above)."""
    return _stack_raw(xs)


def _stack_fwd(*xs: jax.Array) -> tuple[jax.Array, None]:
    return _stack_raw(xs), None


def _stack_bwd(_, g: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(_unstack(g))


_stack.defvjp(_stack_fwd, _stack_bwd)


def _at(node, path: tuple):
    """The attribute (or list item) of `node` at a flat-state path."""
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node
