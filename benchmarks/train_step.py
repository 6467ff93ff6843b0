"""Dense vs CLIP-UP train step, side by side, and both against this machine's matmul FLOP/s.

    python -m benchmarks.train_step [--width 256] [--depth 6] [--batch 32] [--reps 5]

The two models have the same active size: the sparse one is the dense one upcycled (8 experts,
top-2, every other block of both towers), so per token it runs 2 expert MLPs where the dense
runs one. Model FLOPs are analytic (3 x forward of both towers: matmuls and attention, the
sparse one counting the experts each token reaches); XLA's own count of the compiled step is
printed beside them (it also counts dispatch work and capacity padding). The reference FLOP/s
is a large float32 matmul timed in the same run, so "of matmul" is MFU on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from clipup_jax.config import ModelConfig, MoEPlan, TextConfig, VisionConfig
from clipup_jax.models import CLIP
from clipup_jax.models.flops import image_flops, text_flops
from clipup_jax.train.recipes import base_config, sparse
from clipup_jax.train.optimizer import make_optimizer
from clipup_jax.train.step import flops_per_step, init_state, make_train_step


def _step(cfg: ModelConfig, config: ml_collections.ConfigDict, batch: dict[str, jax.Array]):
    model = CLIP(cfg, nnx.Rngs(0))
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    tx, schedule = make_optimizer(config.optim, params, 1000)
    graphdef, state = init_state(model, tx)
    step = jax.jit(make_train_step(graphdef, tx, "clip", schedule))
    compiled = step.lower(state, batch).compile()
    return compiled, state, flops_per_step(compiled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    w, d = args.width, args.depth
    dense = ModelConfig(vision=VisionConfig(image_size=64, patch_size=8, width=w, depth=d, heads=w // 64, mlp_dim=4 * w),
                        text=TextConfig(vocab_size=1024, context_length=32, width=w, depth=d, heads=w // 64, mlp_dim=4 * w),
                        embed_dim=w)
    moe = sparse(dense, MoEPlan(num_experts=8, top_k=2, capacity_factor=1.25, eval_capacity_factor=1.25,
                                dispatch="sorted", grouped_matmul="padded"))
    rng = np.random.RandomState(0)
    batch = {"pixels": jnp.asarray(rng.randn(args.batch, 64, 64, 3), jnp.float32),
             "tokens": jnp.asarray(rng.randint(1, 1023, (args.batch, 32)), jnp.int32)}
    config = base_config(dense)

    steps = {name: (cfg, *_step(cfg, config, batch)) for name, cfg in (("dense", dense), ("CLIP-UP 8e top-2", moe))}
    mm = jax.jit(lambda x: x @ x)
    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    runs = {"matmul": lambda: mm(a), **{n: (lambda c=c, s=s: c(s, batch)[1]["loss"]) for n, (_, c, s, _) in steps.items()}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        jax.block_until_ready(fn())
    for _ in range(args.reps):  # interleaved, so machine noise hits every row alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    peak = 2 * 2048**3 / statistics.median(times["matmul"])
    rows = {name: (statistics.median(times[name]), 3 * args.batch * (image_flops(cfg) + text_flops(cfg)), xla)
            for name, (cfg, _, _, xla) in steps.items()}
    print(f"train step (fwd + bwd + AdamW): width {w}, depth {d}, batch {args.batch}, 64px/patch 8 images, "
          f"77->32 tokens, float32, {jax.default_backend()}; matmul reference {peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':<20}{'step ms':>10}{'model GFLOP':>13}{'XLA GFLOP':>11}{'GFLOP/s':>10}{'of matmul':>11}"
          f"{'time vs dense':>15}{'FLOPs vs dense':>16}")
    dense_t, dense_f = rows["dense"][:2]
    for name, (t, flops, xla) in rows.items():
        print(f"{name:<20}{t * 1e3:>10.1f}{flops / 1e9:>13.2f}{xla / 1e9:>11.2f}{flops / t / 1e9:>10.1f}"
              f"{flops / t / peak:>10.0%}{t / dense_t:>15.2f}{flops / dense_f:>16.2f}")


if __name__ == "__main__":
    main()
