"""One MoE layer, forward + backward, per dispatch path, against a FLOP-matched dense MLP.

    python -m benchmarks.moe_layer [--images 8] [--reps 5] [--capacity-factors 1.0 1.25] [--ragged]

Prints time(MoE) / (k * time(dense MLP on the same tokens)), measured side by
side in one run (paths interleaved, median of reps), plus the compiled
temporary memory of each path. Beside each ratio stands its FLOP floor,
E * C / (k * S): the expert work a capacity of C slots per expert implies. The Pallas kernel runs in interpret mode off TPU
(a correctness tool, not a speed one) and is skipped here; `ragged_dot` on CPU
is lowered to a masked dense matmul (~E x the work) and runs only with --ragged.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from clipup_jax.config import MoEPlan
from clipup_jax.models.layers import Mlp
from clipup_jax.models.moe import MoeMlp
from clipup_jax.models.routing import capacity

D, F, E, K, TOKENS = 768, 3072, 8, 2, 197  # ViT-B/16 width, 8 experts top-2, 197 tokens per image


def _step(module: nnx.Module):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, x):
        return jnp.mean(jnp.square(nnx.merge(graphdef, params, rest)(x)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--capacity-factors", type=float, nargs="+", default=[1.0, 1.25])
    parser.add_argument("--ragged", action="store_true", help="include sorted+ragged_dot (slow on CPU)")
    args = parser.parse_args()

    x = jax.random.normal(jax.random.key(0), (args.images, TOKENS, D), jnp.float32)
    steps = {"dense MLP (F)": _step(Mlp(D, F, 12, "gelu", nnx.Rngs(0)))}
    floors = {}
    for cf in args.capacity_factors:
        plan = MoEPlan(num_experts=E, top_k=K, eval_capacity_factor=cf)
        paths = {"einsum": dataclasses.replace(plan, dispatch="einsum"),
                 "sorted+padded": dataclasses.replace(plan, dispatch="sorted", grouped_matmul="padded")}
        if args.ragged:
            paths["sorted+ragged_dot"] = dataclasses.replace(plan, dispatch="sorted", grouped_matmul="ragged_dot")
        for name, p in paths.items():
            steps[f"{name} cf={cf:g}"] = _step(MoeMlp(D, F, 12, "gelu", p, nnx.Rngs(0)))
            floors[f"{name} cf={cf:g}"] = E * capacity(TOKENS, E, K, cf) / (K * TOKENS)

    memory = {}
    for name, (fn, params) in steps.items():
        compiled = fn.lower(params, x).compile()
        analysis = compiled.memory_analysis()
        memory[name] = getattr(analysis, "temp_size_in_bytes", 0) if analysis is not None else 0
        jax.block_until_ready(fn(params, x))  # warm up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.reps):  # interleave the paths so machine noise hits them alike
        for name, (fn, params) in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, x))
            times[name].append(time.perf_counter() - t0)

    dense = statistics.median(times["dense MLP (F)"])
    print(f"MoE layer fwd+bwd: {args.images} images x {TOKENS} tokens, D={D}, F={F}, E={E}, k={K}, float32, "
          f"backend {jax.default_backend()}, {jax.device_count()} device(s), median of {args.reps}")
    print(f"{'path':<26}{'median ms':>11}{'/ (k x dense)':>15}{'FLOP floor':>12}{'temp MiB':>10}")
    for name in steps:
        t = statistics.median(times[name])
        ratio = "" if name not in floors else f"{t / (K * dense):.2f}"
        floor = "" if name not in floors else f"{floors[name]:.2f}"
        print(f"{name:<26}{t * 1e3:>11.1f}{ratio:>15}{floor:>12}{memory[name] / 2**20:>10.1f}")


if __name__ == "__main__":
    main()
