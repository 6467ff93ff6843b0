"""Pre-LN transformer blocks shared by both towers, their parameters stacked along a leading `layers` axis.

Layout (as big_vision and MaxText keep a scanned stack): the encoder cuts its layer plan into segments, runs of
one repeating period of block kinds (`plan_segments`: one run of single blocks for a dense or all-MoE tower, a
run of (dense, MoE) pairs for every_2), and each position of a segment's period is one `Block` whose every
variable carries the run's repeats on axis 0:

    visual/encoder/layers/<segment>/<position>/mlp/fc1_kernel     (repeats, [experts,] width, mlp_dim)

Block i of the per-block view (`visual/encoder/blocks/<i>/...`, what importers and exporters speak) is repeat r
of position j of segment s: i = `Segment.block(j, r)` = start + r * period + j, the one map between the two.
`scan=True` runs each segment as one `jax.lax.scan` over those stacked variables (the program stops growing with
depth); `scan=False` runs the same blocks in a python loop over the repeats. Both compute the same function from
the same parameters, and neither copies a stack at run time.

What a block records besides its output is returned, never sown: `records` (a static attribute; set it with
`model.set_attributes(records=(...), raise_if_not_found=False)`) names what each encoder returns per block:
"moe" (the routing metrics and aux losses of a MoE block) and "mlp_input" (the `ln_2` output an upcycled router
scores, read on calibration data by checkpoints/router_init.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from clipup_jax.config import Activation, MoEPlan
from clipup_jax.models import dispatcher
from clipup_jax.models.attention import SelfAttention
from clipup_jax.models.layers import LayerNorm, Mlp
from clipup_jax.models.moe import MoeMlp

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # store every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
}
RECORDS = ("moe", "mlp_input")  # what an encoder can return per block besides its output
LAYERS = "layers"  # the logical axis of a stack's repeats (replicated by the sharding rules)

Record = dict[str, jax.Array]
M = TypeVar("M", bound=nnx.Module)


def remat_policy(name: str) -> Callable | None:
    """The `jax.checkpoint` policy of a remat name; None for "none" (no rematerialisation)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r} (config.remat): expected one of {', '.join(map(repr, REMAT_POLICIES))}")
    return REMAT_POLICIES[name]


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

    def row_local(self) -> bool:
        """Whether each row's MLP output depends on that row alone in the current mode (a dense MLP, or a MoE
        whose dispatch is `row_local`): then computing only some rows' outputs gives them exactly."""
        return not isinstance(self.mlp, MoeMlp) or self.mlp.current_dispatcher().row_local

    def __call__(self, x: jax.Array, causal: bool, records: tuple[str, ...] = (), routed: jax.Array | None = None,
                 pool: jax.Array | None = None) -> tuple[jax.Array, Record]:
        """The block's output and what `records` asks of it ("moe" only where the MLP is one); `routed` as
        `MoeMlp.forward` takes it. With `pool` (B,) positions, the output at those rows only, (B, 1, D) (exact
        where `row_local()`): their attention still reads every row."""
        if pool is None:
            x = x + self.attn(self.ln_1(x), causal)
        else:
            x = x[jnp.arange(x.shape[0]), pool][:, None] + self.attn(self.ln_1(x), causal, queries=pool)
            routed = None  # the rows left are the pooled ones, which are routed
        h = self.ln_2(x)
        record = {"mlp_input": h} if "mlp_input" in records else {}
        if isinstance(self.mlp, MoeMlp):
            y, metrics = self.mlp.forward(h, metrics="moe" in records, routed=routed)
            if metrics is not None:
                record["moe"] = metrics
        else:
            y = self.mlp(h)
        return x + y, record


class Segment(NamedTuple):
    """Blocks start .. start + period * repeats - 1: a period of block kinds, repeated."""

    start: int
    period: int
    repeats: int

    def block(self, position: int, repeat: int) -> int:
        return self.start + repeat * self.period + position


def plan_segments(kinds: tuple[bool, ...], max_period: int = 2) -> tuple[Segment, ...]:
    """Cut a layer plan (True = MoE block) into runs of one repeating period, greedily from the first block.

    Dense or all-MoE: one run of period 1; every_2: period 2 (a dense+MoE pair); last_N: a dense run then a MoE
    run; a block that starts no run of two or more periods is a segment of its own (repeats 1).
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


def encoder_segments(depth: int, moe: MoEPlan | None) -> tuple[Segment, ...]:
    """The segments of an encoder of `depth` blocks with the MoE plan `moe` (None: dense)."""
    sparse = set(moe.layer_indices(depth)) if moe is not None else set()
    return plan_segments(tuple(i in sparse for i in range(depth)))


def _stacked(blocks: list[Block]) -> Block:
    """One Block whose variables are those of `blocks` stacked on a leading `layers` axis (built at init only:
    inside the init's jit the per-block copies never materialise)."""
    graphdef = nnx.graphdef(blocks[0])
    flats = [nnx.to_flat_state(nnx.state(b)) for b in blocks]
    stacked = []
    for (path, first), *others in zip(*flats):
        value = jnp.stack([first.get_value(), *(v.get_value() for _, v in others)])
        if isinstance(first, nnx.Param):
            stacked.append((path, first.replace(value, logical_axes=(LAYERS, *first.logical_axes))))
        else:
            stacked.append((path, first.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(stacked))


def _unstacked(stack: Block, repeats: int) -> nnx.List:
    """The inverse of `_stacked`: `repeats` Blocks, each with its own buffers (copied out of the stack)."""
    graphdef, flat = nnx.graphdef(stack), nnx.to_flat_state(nnx.state(stack))
    blocks = []
    for r in range(repeats):
        layer = [(path, var.replace(var.get_value()[r], logical_axes=var.logical_axes[1:])
                  if isinstance(var, nnx.Param) else var.replace(var.get_value()[r])) for path, var in flat]
        blocks.append(nnx.merge(graphdef, nnx.from_flat_state(layer)))
    return nnx.List(blocks)


def for_inference(model: M) -> M:
    """`model` with per-layer parameter buffers in place of its encoders' stacks (and per-expert ones where the
    inference dispatch is `expert_loop`) where the backend copies a slice of a stack inside a program: XLA:CPU
    does, a pass over every weight per call (benchmarks/inference.py), which a split made once here saves. A model
    for inference only (its parameter tree is not the checkpoints'); the given model is unchanged, and on other
    backends it is returned as is (no second copy of the weights). Call it under the mesh the model will run on."""
    if jax.default_backend() != "cpu":
        return model
    model = nnx.merge(*nnx.split(model))  # a new module tree over the same arrays
    for encoder in [m for _, m in nnx.iter_modules(model) if isinstance(m, Encoder)]:  # a shared one once
        encoder.layers = nnx.List([nnx.List([_unstacked(stack, seg.repeats) for stack in period])
                                   for seg, period in zip(encoder.segments, encoder.layers)])
    mesh = jax.sharding.get_abstract_mesh()
    shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
    for moe in [m for _, m in nnx.iter_modules(model) if isinstance(m, MoeMlp)]:
        if dispatcher.choose(moe.plan, train=False, mesh_shape=shape).kind == "expert_loop":
            moe.split_experts()  # and each expert its own buffers, for the same reason
    return model


class Encoder(nnx.Module):
    """The blocks of one tower (or of a shared backbone), stacked per segment (see the module docstring).

    `remat` ("none", "full", "dots"; `REMAT_POLICIES`) recomputes activations in the backward pass under that
    `jax.checkpoint` policy: per period in the scan, per block in the loop.
    """

    def __init__(self, width: int, heads: int, mlp_dim: int, depth: int, activation: Activation, ln_eps: float,
                 rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32, moe: MoEPlan | None = None, remat: str = "none",
                 scan: bool = False):
        remat_policy(remat)  # fail at construction on a bad name
        self.remat = remat
        self.scan = scan
        self.records: tuple[str, ...] = ()
        self.segments = encoder_segments(depth, moe)
        sparse = set(moe.layer_indices(depth)) if moe is not None else set()
        # Made in block order (each block draws from `rngs` as a per-block list would), then stacked.
        blocks = [Block(width, heads, mlp_dim, depth, activation, ln_eps, rngs, dtype, moe if i in sparse else None)
                  for i in range(depth)]
        self.layers = nnx.List([
            nnx.List([_stacked([blocks[seg.block(j, r)] for r in range(seg.repeats)]) for j in range(seg.period)])
            for seg in self.segments])

    def __call__(self, x: jax.Array, causal: bool, routed: jax.Array | None = None, pool: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[int, Record]]:
        """The blocks' output and, per block index, what `self.records` asks (empty dicts when nothing is).
        `routed` (B, L) bool: the tokens MoE blocks dispatch at inference (`MoeMlp.forward`; None: all).

        `pool` (B,): the one position per sample the caller reads; the output is then those rows, (B, D). The
        last block computes only them (its keys and values still come from every row) unless records are asked
        (they describe every row) or its MLP is not `row_local` (a capacity makes rows compete for slots).
        """
        unknown = set(self.records) - set(RECORDS)
        if unknown:
            raise ValueError(f"records {sorted(unknown)}: expected some of {', '.join(RECORDS)}")
        last = self.layers[-1][-1]  # the last segment's last position: a stack, or its blocks once split
        last = last[-1] if isinstance(last, nnx.List) else last
        pooled = pool is not None and not self.records and last.row_local()
        records: dict[int, Record] = {}
        for i, (seg, stack) in enumerate(zip(self.segments, self.layers)):
            final = pooled and i == len(self.segments) - 1
            x, per_block = self._segment(seg, list(stack), x, causal, routed, pool if final else None)
            records.update(per_block)
        if pool is None:
            return x, records
        return (x[:, 0] if pooled else x[jnp.arange(x.shape[0]), pool]), records

    def _segment(self, seg: Segment, stack: list[Block], x: jax.Array, causal: bool, routed: jax.Array | None,
                 pool: jax.Array | None) -> tuple[jax.Array, dict[int, Record]]:
        """One segment as a pure function of its stacked state: a `lax.scan` over the repeats (scan=True) or a
        python loop over them, each period checkpointed under the remat policy; the last block only at `pool`
        where that is given (the scan then stops a period short). Afterwards the stacked blocks get back the
        non-Param state the call changed (router-noise RNG counters, in training)."""
        def at(j: int, r: int) -> jax.Array | None:  # the pooled rows, at the segment's last block only
            return pool if (j, r) == (seg.period - 1, seg.repeats - 1) else None

        if isinstance(stack[0], nnx.List):  # split for inference (`for_inference`): each layer its own Block
            records: dict[int, Record] = {}
            for r in range(seg.repeats):
                for j, layers in enumerate(stack):
                    x, records[seg.block(j, r)] = layers[r](x, causal, self.records, routed, at(j, r))
            return x, records
        splits = [nnx.split(block, nnx.Param, ...) for block in stack]
        graphdefs = [g for g, _, _ in splits]
        changed: list[list[tuple]] = [[] for _ in stack]  # filled while tracing: which non-Param leaves advanced
        asked = self.records

        def period(h, states, last_pool=None):
            new_rest, recs = [], []
            for j, (graphdef, (params, rest)) in enumerate(zip(graphdefs, states)):
                block = nnx.merge(graphdef, params, rest)
                before = [var.get_value() for _, var in nnx.to_flat_state(nnx.state(block, nnx.Not(nnx.Param)))]
                h, rec = block(h, causal, asked, routed, last_pool if j == len(states) - 1 else None)
                after = nnx.to_flat_state(nnx.state(block, nnx.Not(nnx.Param)))
                updates = [(path, var.get_value()) for (path, var), old in zip(after, before)
                           if var.get_value() is not old]
                changed[j] = [path for path, _ in updates]
                new_rest.append([value for _, value in updates])
                recs.append(rec)
            return h, (new_rest, recs)

        scanned = self.scan and seg.repeats > (1 if pool is None else 2)
        if self.remat != "none":
            period = jax.checkpoint(period, policy=remat_policy(self.remat), prevent_cse=not scanned)
        states = [(p, r) for _, p, r in splits]
        leaves, treedef = jax.tree.flatten(states)
        if scanned:
            body = seg.repeats - (pool is not None)  # a pooling last period runs off the scan: its carry shrinks
            head = states
            if pool is not None:
                pieces = [jax.lax.split(a, (body, 1)) for a in leaves]
                head = treedef.unflatten([p[0] for p in pieces])
            x, (new_rest, recs) = jax.lax.scan(period, x, head)
            records = {seg.block(j, r): jax.tree.map(lambda a, r=r: a[r], recs[j])
                       for j in range(seg.period) for r in range(body)}
            if pool is not None:
                x, (rest, recs) = period(x, treedef.unflatten([p[1][0] for p in pieces]), pool)
                new_rest = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), new_rest, rest)
                records.update({seg.block(j, body): rec for j, rec in enumerate(recs)})
        else:
            rests, records = [], {}
            # One `lax.split` per leaf, not a slice per repeat: its transpose is one concatenate of the repeats'
            # gradients (a slice's is a pad to the whole stack, summed over the repeats).
            pieces = [jax.lax.split(a, (1,) * seg.repeats) for a in leaves]
            for r in range(seg.repeats):
                x, (rest, recs) = period(x, treedef.unflatten([p[r][0] for p in pieces]), at(seg.period - 1, r))
                rests.append(rest)
                records.update({seg.block(j, r): rec for j, rec in enumerate(recs)})
            new_rest = jax.tree.map(lambda *xs: jnp.stack(xs), *rests)
        for j, block in enumerate(stack):
            for path, value in zip(changed[j], new_rest[j]):
                _at(block, path).set_value(value)
        return x, records


def _at(node, path: tuple):
    """The attribute (or list item) of `node` at a flat-state path."""
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node
