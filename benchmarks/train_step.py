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


def _timed(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops_per_s(n: int = 2048, reps: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    return 2 * n**3 / _timed(mm, a, reps=reps)


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

    peak = matmul_flops_per_s(reps=args.reps)
    rows = {}
    for name, cfg in (("dense", dense), ("CLIP-UP 8e top-2", moe)):
        compiled, state, xla_flops = _step(cfg, config, batch)
        t = _timed(lambda s: compiled(s, batch)[1]["loss"], state, reps=args.reps)
        model_flops = 3 * args.batch * (image_flops(cfg) + text_flops(cfg))
        rows[name] = (t, model_flops, xla_flops)
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
