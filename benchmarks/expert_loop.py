"""Where one MoE layer's inference time goes: the expert loop against its matmuls alone, the routing around them,
and the dense MLP the layer was upcycled from.

    python -m benchmarks.expert_loop [--batch 8] [--rounds 30] [--quick]

At ViT-B/16's text and image shapes (batch x tokens x width inputs), one `MoeMlp` of `train.recipes.CLIPUP_PLAN`
as `for_inference` runs it (each expert in buffers of its own, the dropless `expert_loop`; a N(0, 0.02) router, as
`benchmarks/inference.py` draws its weights), is timed against, interleaved:

* dense MLP: the block's MLP before upcycling. The layer's expert matmuls are top_k times its FLOPs;
* exact slices: the same routing, sort, gather and combine, with each expert's MLP on exactly its rows, as static
  slices whose bounds are read from this input's routing beforehand. Only this input can use that program: it is
  the floor for the expert loop, which cuts the same rows at run time (`ChunkSchedule`, `lax.switch`);
* routing only: the exact-slices program with the experts' MLPs left out.

Before each timed call a buffer larger than the CPU's caches is rewritten, so every program reads its weights from
memory, as a layer of a tower does after the other layers ran (the dense MLP's 8 MB would otherwise stay in cache
between calls and the experts' 64 MB not). Ratios are the mean of per-round ratios with a t interval. 'Cores busy'
is process CPU time over wall time: a serial stretch (a copy, a branch) shows there.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.run import Goal, Section
from clipup_jax.config import preset
from clipup_jax.evaluate.stats import CONFIDENCE, Interval, mean_interval
from clipup_jax.models.layers import Mlp, activation_fn
from clipup_jax.models.moe import MoeMlp
from clipup_jax.models.routing import Routing, assignment_counts, capacity, top_k_routing
from clipup_jax.train.recipes import CLIPUP_PLAN

PROGRAMS = ("dense MLP", "MoE layer", "exact slices", "routing only")
ACTIVATION = "quick_gelu"  # OpenAI's, as in the B/16 presets
EVICT_BYTES = 256 * 2**20  # rewritten before each timed call: more than any CPU's last-level cache here


def _layer(width: int, mlp_dim: int, depth: int) -> tuple[MoeMlp, Mlp]:
    moe = MoeMlp(width, mlp_dim, depth, ACTIVATION, CLIPUP_PLAN, nnx.Rngs(0))
    router = 0.02 * np.random.default_rng(0).standard_normal((width, CLIPUP_PLAN.num_experts))
    moe.router_kernel[...] = jnp.asarray(router, jnp.float32)
    moe.split_experts()
    return moe, Mlp(width, mlp_dim, depth, ACTIVATION, nnx.Rngs(1))


def _route(moe: MoeMlp, x: jax.Array) -> Routing:
    plan, (_, s, _) = moe.plan, x.shape
    c = capacity(s, plan.num_experts, plan.top_k, moe.current_dispatcher().capacity_factor)
    logits = x @ moe.router_kernel[...]
    return jax.vmap(lambda lg: top_k_routing(lg, plan.top_k, c, renormalize=plan.renormalize_gates,
                                             batch_priority=plan.batch_priority))(logits)


def _exact(graphdef: nnx.GraphDef, sizes: np.ndarray, with_mlps: bool) -> Callable:
    """The layer of `graphdef` with each expert's rows as static slices [bounds[e], bounds[e + 1]) of the sorted
    rows; called as (state, x), like the layer."""
    bounds = np.concatenate([[0], np.cumsum(sizes)])

    def layer(state, x):
        moe = nnx.merge(graphdef, state)
        act, w, e = activation_fn(moe.activation), moe.weights(), moe.plan.num_experts
        g, s, d = x.shape
        r = _route(moe, x)
        k = r.expert_index.shape[-1]
        order = jnp.argsort(jnp.where(r.kept, r.expert_index, e).reshape(-1), stable=True)
        rows = x.reshape(g * s, d)[order // k]
        outs = [act(rows[a:b] @ w1 + b1) @ w2 + b2 if with_mlps else rows[a:b]
                for a, b, w1, b1, w2, b2 in zip(bounds[:-1], bounds[1:], *w)]
        out = jnp.concatenate(outs + [jnp.zeros((g * s * k - bounds[-1], d), x.dtype)])
        slot = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        return jnp.einsum("gskd,gsk->gsd", out[slot].reshape(g, s, k, d), r.gate)

    return jax.jit(layer)


def _module(graphdef: nnx.GraphDef) -> Callable:
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))


def measure(width: int, mlp_dim: int, tokens: int, batch: int, rounds: int) -> dict:
    """Per program: median ms, mean cores busy, and the mean ratio to the dense MLP (t interval); expert loads."""
    moe, mlp = _layer(width, mlp_dim, depth=12)
    x = jax.random.normal(jax.random.key(2), (batch, tokens, width), jnp.float32)
    r = _route(moe, x)
    sizes = np.asarray(assignment_counts(r, CLIPUP_PLAN.num_experts)).sum(0)  # (G, E) kept rows -> per expert
    (moe_def, moe_state), (mlp_def, mlp_state) = nnx.split(moe), nnx.split(mlp)
    # Parameters are arguments, as in a tower (not constants folded into the program).
    programs = {"dense MLP": (_module(mlp_def), mlp_state), "MoE layer": (_module(moe_def), moe_state),
                "exact slices": (_exact(moe_def, sizes, with_mlps=True), moe_state),
                "routing only": (_exact(moe_def, sizes, with_mlps=False), moe_state)}
    layer, exact = (np.asarray(fn(state, x)) for fn, state in (programs["MoE layer"], programs["exact slices"]))
    if not np.allclose(layer, exact, rtol=1e-4, atol=1e-5):  # the floor must compute what the layer does
        raise AssertionError(f"exact slices differ from the MoE layer by {np.abs(layer - exact).max():.2e}")
    evict = jax.jit(lambda a: a + 1, donate_argnums=0)
    junk = jnp.zeros((EVICT_BYTES // 4,), jnp.float32)
    wall: dict[str, list[float]] = {p: [] for p in programs}
    cpu: dict[str, list[float]] = {p: [] for p in programs}
    for _ in range(rounds):
        for name, (fn, state) in programs.items():
            junk = jax.block_until_ready(evict(junk))
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(state, x))
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    dense = np.array(wall["dense MLP"])
    out = {name: {"ms": 1e3 * float(np.median(t)), "busy": float(np.mean(np.array(cpu[name]) / np.array(t))),
                  "vs dense": mean_interval(list(np.array(t) / dense), what=f"{name} / dense MLP")}
           for name, t in wall.items()}
    out["MoE layer"]["vs exact"] = mean_interval(list(np.array(wall["MoE layer"]) / np.array(wall["exact slices"])),
                                                 what="MoE layer / exact slices")
    return {"programs": out, "sizes": sizes.tolist()}


def _ratio(interval: Interval) -> str:
    return f"{interval.mean:.2f} [{interval.low:.2f}, {interval.high:.2f}]"


def section(quick: bool = False, batch: int | None = None, rounds: int | None = None) -> Section:
    cfg = preset("tiny" if quick else "ViT-B-16")
    batch, rounds = batch or (2 if quick else 8), rounds or (3 if quick else 30)
    v = cfg.vision
    towers = {"text": (cfg.text.width, cfg.text.mlp_dim, cfg.text.context_length),
              "image": (v.width, v.mlp_dim, (v.image_size // v.patch_size) ** 2 + int(v.class_token))}
    lines = ["| tower | rows per expert | " + " | ".join(f"{name} ms" for name in PROGRAMS) + " | "
             + " | ".join(f"{name} / dense MLP" for name in PROGRAMS[1:])
             + " | MoE layer / exact slices | cores busy (" + ", ".join(PROGRAMS) + ") |",
             "|---|---|" + "---:|" * (2 * len(PROGRAMS)) + "---|"]
    values: dict[str, float] = {}
    for tower, (width, mlp_dim, tokens) in towers.items():
        m = measure(width, mlp_dim, tokens, batch, rounds)
        p = m["programs"]
        lines.append(f"| {tower} | {', '.join(map(str, m['sizes']))} | "
                     + " | ".join(f"{p[n]['ms']:,.1f}" for n in PROGRAMS) + " | "
                     + " | ".join(_ratio(p[n]["vs dense"]) for n in PROGRAMS[1:])
                     + f" | {_ratio(p['MoE layer']['vs exact'])} | "
                     + ", ".join(f"{p[n]['busy']:.2f}" for n in PROGRAMS) + " |")
        print(lines[-1], flush=True)
        values[f"{tower}_layer_over_exact"] = p["MoE layer"]["vs exact"].mean
    body = (f"Command: `python -m benchmarks.expert_loop --batch {batch} --rounds {rounds}` (jax {jax.__version__}, "
            f"{jax.devices()[0].platform}, float32, {CLIPUP_PLAN.num_experts} experts, top-{CLIPUP_PLAN.top_k}, "
            f"dropless; median ms of {rounds} interleaved rounds; ratios: mean of the per-round ratios, "
            f"{CONFIDENCE:.0%} t interval)\n\n" + "\n".join(lines) + "\n\n"
            f"The expert matmuls are top-{CLIPUP_PLAN.top_k} times the dense MLP's FLOPs, so 'exact slices / dense "
            "MLP' against that factor is what the split over experts costs in matmul time, 'routing only' what "
            "choosing and moving the rows costs, and 'MoE layer / exact slices' what cutting the rows at run time "
            "costs over knowing them in advance.")
    goals = [Goal(f"{tower} MoE layer at batch {batch}: expert loop / exact static slices (the loop's run-time cost)",
                  f"{values[f'{tower}_layer_over_exact']:.2f}x", None) for tower in towers]
    return Section("Expert loop: where one MoE layer's inference time goes (benchmarks/expert_loop.py)", body, goals,
                   values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, batch 2, 3 rounds (a smoke run)")
    args = parser.parse_args()
    print(section(args.quick, None if args.quick else args.batch, None if args.quick else args.rounds).markdown())


if __name__ == "__main__":
    main()
