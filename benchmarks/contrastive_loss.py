"""Contrastive loss + gradients: global (B, B) logits against the shard_map version, per device.

    python -m benchmarks.contrastive_loss [--batches 1024 4096 16384] [--dim 64] [--reps 3] [--loss clip]

On 8 simulated CPU devices, mesh (data=8), Auto axes, the trainer's layout. For each global batch B:
per-device temporary memory of the compiled loss+grad (`memory_analysis()`, the SPMD-partitioned
program of one device) and the median wall time, for

* global, batch-sharded features: what the trainer compiles today (GSPMD partitions the logits);
* sharded: `loss_impl="sharded"` (each device its B/8 x B rows);
* global, replicated features: the same global loss when the features reach it unsharded (compiled
  only, never run: at B=16384 that is GiBs per device), i.e. what GSPMD falls back to without a
  propagated batch sharding; the sharded version reshards such inputs to rows itself.

Wall times on simulated devices share the host's cores: compare rows with each other, not with a GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax is imported
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from clipup_jax.parallel.mesh import make_mesh  # noqa: E402
from clipup_jax.parallel.sharding import batch_spec  # noqa: E402
from clipup_jax.train.losses import make_contrastive_loss  # noqa: E402

MIB = 2**20


def _fn(loss: str, impl: str):
    f = make_contrastive_loss(loss, impl)
    return jax.jit(jax.value_and_grad(lambda i, t, s, b: f(i, t, s, b), argnums=(0, 1, 2, 3)))


def _inputs(batch: int, dim: int, sharding: NamedSharding):
    keys = jax.random.split(jax.random.key(0), 2)
    make = jax.jit(lambda k: jax.random.normal(k, (batch, dim)) / np.sqrt(dim), out_shardings=sharding)
    return make(keys[0]), make(keys[1]), np.float32(10.0), np.float32(-5.0)


def _time(compiled: dict, args, reps: int) -> dict[str, float]:
    """Median seconds per call of each compiled function, calls interleaved so load changes hit all alike."""
    for c in compiled.values():
        jax.block_until_ready(c(*args))  # warm-up
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(reps):
        for name, c in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(c(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dim", type=int, default=64, help="embedding width E (the B x B work does not depend on it)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--loss", choices=("clip", "siglip"), default="clip")
    args = parser.parse_args()

    mesh = make_mesh({"data": 8})
    print(f"{args.loss} loss + grads, E={args.dim}, mesh {dict(mesh.shape)}, {jax.devices()[0].platform}, "
          f"jax {jax.__version__}; per-device temp MiB (B x B f32 = B^2 * 4 bytes), median ms of {args.reps}")
    print("| B | B x B f32 MiB | global temp MiB | sharded temp MiB | global / sharded | "
          "global (replicated in) temp MiB | global ms | sharded ms | global / sharded |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with jax.set_mesh(mesh):
        rows, replicated = NamedSharding(mesh, batch_spec(mesh, 2)), NamedSharding(mesh, P())
        for batch in args.batches:
            inputs = _inputs(batch, args.dim, rows)
            compiled = {impl: _fn(args.loss, impl).lower(*inputs).compile() for impl in ("global", "sharded")}
            temp = {impl: c.memory_analysis().temp_size_in_bytes / MIB for impl, c in compiled.items()}
            abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated) for x in inputs[:2]]
            rep = _fn(args.loss, "global").lower(*abstract, *inputs[2:]).compile().memory_analysis()
            ms = {impl: 1e3 * t for impl, t in _time(compiled, inputs, args.reps).items()}
            print(f"| {batch} | {batch * batch * 4 / MIB:,.0f} | {temp['global']:,.1f} | {temp['sharded']:,.1f} | "
                  f"{temp['global'] / temp['sharded']:.2f} | {rep.temp_size_in_bytes / MIB:,.1f} | "
                  f"{ms['global']:,.1f} | {ms['sharded']:,.1f} | {ms['global'] / ms['sharded']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
