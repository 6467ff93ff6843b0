"""Accelerator readiness: correctness against the CPU float32 result, then train-step MFU per dispatch path.

    python -m benchmarks.accelerator [--out results.json] [--batch 256] [--budget-s 300]
    python -m benchmarks.accelerator --smoke          # tiny sizes, any backend (CPU: a few seconds)

(from the repository root; `python benchmarks/accelerator.py` works too.)

One self-contained file (it imports only `clipup_jax`), so it can be shipped to a GPU/TPU host
as is. It builds a ViT-B/16 dense CLIP and CLIP-UP B/16 (8 experts, top-2, every other block of
both towers, capacity factor 1.25) with bfloat16 compute (parameters float32), then:

1. Correctness: image and text features of a small batch on the accelerator, for the dense model
   and for every MoE dispatch path, against the same weights run in float32 on the CPU
   (`jax.devices("cpu")`; the sparse reference is the `dense_reference` dispatch: every expert
   on every token, weighted by the combine weights). Passes when every L2-normalised feature
   row is within TOLERANCE (Euclidean distance) of the reference: bfloat16's 8-bit mantissa
   through 12 blocks, with the router's top-2 allowed to flip on near ties.
2. Speed: the jitted train step (forward, backward, clipping, AdamW; state donated; no remat) at
   a realistic batch (256 per device by default, halved on out-of-memory), median of timed
   blocks. MFU = analytic model FLOPs (3 x forward; `clipup_jax.models.flops`) / step time /
   the device's peak bf16 FLOP/s from PEAK_TFLOPS; "of matmul" divides by a large bf16 matmul
   measured in the same run instead.

Paths: `einsum` (one-hot dispatch/combine), `padded` (scatter into per-expert
buffers, batched matmul), `ragged_dot` (rows sorted by expert, `jax.lax.ragged_dot`: grouped kernels on
GPU/TPU), `pallas` (sorted, the Megablox TPU kernel: run on TPU only, reported as skipped
elsewhere, where it would run in interpret mode). Prints one markdown table; `--out` also
writes the results as JSON. Rows that do not fit in `--budget-s` are reported as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root holds `clipup_jax`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipup_jax.checkpoints.params import model_from_params
from clipup_jax.config import ModelConfig, MoEPlan, TextConfig, VisionConfig, preset
from clipup_jax.models.clip import l2_normalize
from clipup_jax.models.flops import image_flops, text_flops
from clipup_jax.models.param_tree import abstract_params
from clipup_jax.train.optimizer import make_optimizer
from clipup_jax.train.recipes import base_config, sparse
from clipup_jax.train.step import init_state, make_train_step

# Dense bf16 peak TFLOP/s per device, matched in order against the lower-cased `device_kind`.
PEAK_TFLOPS = (("h100", 989.0), ("h200", 989.0), ("a100", 312.0), ("v5 lite", 197.0), ("v5e", 197.0),
               ("v5p", 459.0), ("v4", 275.0))
GOALS = {"dense": 0.45, "sparse": 0.35}  # MFU on an H100/H200-class GPU
TOLERANCE = 0.05  # max Euclidean distance between an L2-normalised bf16 feature row and the float32 one
SMOKE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
# In run order: the grouped kernel first, since it is the accelerator path (rows past --budget-s are skipped).
PATHS = {name: dict(dispatch=name, eval_dispatch=name) for name in ("ragged_dot", "padded", "einsum", "pallas")}
REFERENCE = dict(dispatch="dense_reference", eval_dispatch="dense_reference")  # every expert on every token, f32


@dataclasses.dataclass(frozen=True)
class Sizes:
    dense: ModelConfig
    batch: int  # train step, per device
    check_batch: int  # correctness
    matmul: int  # n of the n^3 bf16 reference matmul
    steps: int  # steps per timed block (3 blocks)
    moe_layers: str | tuple[int, ...] = "every_2"
    moe_towers: tuple[str, ...] = ("vision", "text")
    timed: tuple[str, ...] | None = None  # dispatch paths whose train step is timed (None: all)


def sizes(smoke: bool, batch: int) -> Sizes:
    if smoke:
        # XLA:CPU compile time, not compute, bounds a smoke run: one block per tower (the image block a MoE one),
        # and the train step timed for the dense model only (every path's gradients are tested in
        # tests/models/test_moe.py, sparse train steps in tests/train); every path's forward is still checked.
        tiny = ModelConfig(vision=VisionConfig(image_size=32, patch_size=8, width=64, depth=1, heads=2, mlp_dim=256),
                           text=TextConfig(vocab_size=256, context_length=16, width=64, depth=1, heads=2, mlp_dim=256),
                           embed_dim=64)
        return Sizes(tiny, batch=8, check_batch=4, matmul=256, steps=2, moe_layers=(0,), moe_towers=("vision",),
                     timed=("-",))
    return Sizes(preset("ViT-B-16"), batch=batch, check_batch=4, matmul=8192, steps=5)


def clipup(sz: Sizes, dispatch: dict[str, str]) -> ModelConfig:
    """8 experts, top-2, capacity factor 1.25 (every other block of both towers outside smoke mode)."""
    return sparse(sz.dense, MoEPlan(num_experts=8, top_k=2, layers=sz.moe_layers, capacity_factor=1.25,
                                    eval_capacity_factor=1.25, **dispatch), sz.moe_towers)


def peak_flops(device: jax.Device) -> float | None:
    kind = device.device_kind.lower()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in kind), None)


def inputs(cfg: ModelConfig, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    v, t = cfg.vision, cfg.text
    tokens = rng.randint(1, t.vocab_size - 1, (batch, t.context_length)).astype(np.int32)
    return {"pixels": rng.randn(batch, v.image_size, v.image_size, 3).astype(np.float32), "tokens": tokens}


def host_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights on the host (no XLA init: on CPU its compiles cost more than the check).

    Kernels and embeddings N(0, 0.02), biases N(0, 0.01), LayerNorm scales 1 + N(0, 0.1), so a swapped
    scale/bias or a mis-routed expert changes the features; every model below is built from these.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in abstract_params(cfg).items():
        if name == "logit_scale":
            out[name] = np.asarray(np.log(1 / 0.07), np.float32)
        elif name.endswith("/scale"):
            out[name] = (1 + 0.1 * rng.standard_normal(shape.shape)).astype(np.float32)
        else:
            std = 0.01 if name.endswith("bias") else 0.02
            out[name] = (std * rng.standard_normal(shape.shape)).astype(np.float32)
    return out


def _compile(fn: Any, smoke: bool, *args: Any) -> Any:
    """Ahead-of-time compile; smoke runs skip LLVM's optimisation passes (compile time is all a tiny model costs)."""
    lowered = jax.jit(fn).lower(*args) if not hasattr(fn, "lower") else fn.lower(*args)
    return lowered.compile(SMOKE_COMPILER_OPTIONS if smoke else None)


def features(cfg: ModelConfig, params: dict[str, np.ndarray], batch: dict[str, np.ndarray], dtype: Any,
             device: jax.Device, smoke: bool) -> np.ndarray:
    """L2-normalised image and text features, (2, B, E), of `params` run at `dtype` on `device`."""
    with jax.default_device(device):
        graphdef, state = nnx.split(model_from_params(cfg, params, dtype))
        batch = jax.device_put(batch, device)

    def encode(state, batch):
        model = nnx.merge(graphdef, state)
        return jnp.stack([l2_normalize(model.encode_image(batch["pixels"])),
                          l2_normalize(model.encode_text(batch["tokens"]))])

    return np.asarray(_compile(encode, smoke, state, batch)(state, batch))


def _oom(e: Exception) -> bool:
    text = str(e).lower()
    return "resource_exhausted" in text or "out of memory" in text


def train_seconds(cfg: ModelConfig, params: dict[str, np.ndarray], batch_size: int, sz: Sizes, device: jax.Device,
                  dtype: Any, smoke: bool) -> tuple[float, int]:
    """(median step seconds, batch used): the batch halves on out-of-memory, down to 8."""
    while True:
        try:
            return _time_steps(cfg, params, batch_size, sz, device, dtype, smoke), batch_size
        except Exception as e:  # XlaRuntimeError: the backend's OOM type differs across jax versions
            if not _oom(e) or batch_size <= 8:
                raise
            batch_size //= 2
            print(f"  out of memory: retrying at batch {batch_size}", file=sys.stderr, flush=True)


def _time_steps(cfg: ModelConfig, params: dict[str, np.ndarray], batch_size: int, sz: Sizes, device: jax.Device,
                dtype: Any, smoke: bool) -> float:
    """The package's train step (AdamW, clipping, state donated), median over 3 blocks of `sz.steps` steps."""
    with jax.default_device(device):
        model = model_from_params(cfg, params, dtype)
        tx, schedule = make_optimizer(base_config(cfg).optim, nnx.state(model, nnx.Param), 1000)
        graphdef, state = init_state(model, tx)
        batch = {k: jnp.asarray(v) for k, v in inputs(cfg, batch_size).items()}
    step = _compile(jax.jit(make_train_step(graphdef, tx, "clip", schedule), donate_argnums=0), smoke, state, batch)
    for _ in range(2):
        state, metrics, _ = step(state, batch)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"{cfg.vision.moe}: train step loss is {loss}")
    blocks = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(sz.steps):
            state, metrics, _ = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        blocks.append((time.perf_counter() - t0) / sz.steps)
    return statistics.median(blocks)


def matmul_flops_per_s(n: int, device: jax.Device) -> float:
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16), device)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))
    reps = 20
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = mm(a)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / reps)
    return 2 * n**3 / statistics.median(times)


def model_flops(cfg: ModelConfig, batch: int) -> float:
    return 3.0 * batch * (image_flops(cfg) + text_flops(cfg))


def run(smoke: bool = False, batch: int = 256, budget_s: float = 300.0, dtype: Any = jnp.bfloat16) -> dict[str, Any]:
    """Every row: correctness against the CPU float32 features, then train-step speed. Returns the JSON report."""
    start = time.perf_counter()
    device, cpu = jax.devices()[0], jax.devices("cpu")[0]
    sz = sizes(smoke, batch)
    peak = peak_flops(device)
    matmul = matmul_flops_per_s(sz.matmul, device)
    check = inputs(sz.dense, sz.check_batch, seed=1)
    rows: list[dict[str, Any]] = []
    models = [("dense", "ViT-B/16 dense" if not smoke else "tiny dense", "-", sz.dense)]
    models += [("sparse", "CLIP-UP B/16 8e top-2" if not smoke else "tiny CLIP-UP 8e top-2", p,
                clipup(sz, PATHS[p])) for p in PATHS]
    references: dict[str, np.ndarray] = {}
    params_of: dict[str, dict[str, np.ndarray]] = {}
    for kind, name, path, cfg in models:
        row: dict[str, Any] = {"model": name, "kind": kind, "path": path}
        rows.append(row)
        if path == "pallas" and device.platform != "tpu":
            row["skipped"] = "Megablox kernel is TPU-only (interpret mode elsewhere)"
            continue
        if time.perf_counter() - start > budget_s:
            row["skipped"] = f"time budget ({budget_s:.0f} s) spent"
            continue
        try:
            _row(row, kind, cfg, sz, check, references, params_of, device, cpu, dtype, smoke, peak, matmul)
        except Exception as e:  # one failing path must not cost the others' rows on a one-shot device run
            row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", correct=False)
        print(f"  {name} [{path}]: {row}", file=sys.stderr, flush=True)
    inference_batch = 2 if smoke else 64
    inference_rows = None
    if time.perf_counter() - start <= budget_s:
        from benchmarks import inference  # it imports this module's helpers

        try:
            with jax.default_device(device):
                configs = inference.models(smoke)
                inference_rows = inference.table(configs, inference_batch, inference.measure(
                    configs, inference_batch, reps=3, dtype=dtype), device.platform)
        except Exception as e:
            inference_rows = [f"inference rows FAILED: {type(e).__name__}: {_cell(str(e).splitlines()[0][:300])}"]
    return {"device": device.device_kind, "platform": device.platform, "devices": jax.device_count(),
            "jax": jax.__version__, "dtype": jnp.dtype(dtype).name, "smoke": smoke, "inference": inference_rows,
            "peak_tflops": peak / 1e12 if peak else None, "matmul_tflops": matmul / 1e12, "matmul_n": sz.matmul,
            "tolerance": TOLERANCE, "rows": rows, "seconds": time.perf_counter() - start,
            "goals": goals(rows, peak is not None and not smoke)}


def _row(row: dict[str, Any], kind: str, cfg: ModelConfig, sz: Sizes, check: dict[str, np.ndarray],
         references: dict[str, np.ndarray], params_of: dict[str, dict[str, np.ndarray]], device: jax.Device,
         cpu: jax.Device, dtype: Any, smoke: bool, peak: float | None, matmul: float) -> None:
    """Fills `row`: feature error against the CPU float32 reference, then the timed train step."""
    if kind not in params_of:  # every sparse path shares one set of weights and one CPU reference
        params_of[kind] = host_params(cfg)
        ref_cfg = cfg if kind == "dense" else clipup(sz, REFERENCE)
        references[kind] = features(ref_cfg, params_of[kind], check, jnp.float32, cpu, smoke)
    got = features(cfg, params_of[kind], check, dtype, device, smoke)
    err = float(np.linalg.norm(got - references[kind], axis=-1).max())
    row.update(max_feature_err=err, correct=bool(err <= TOLERANCE))
    if sz.timed is not None and row["path"] not in sz.timed:
        row["untimed"] = "smoke mode times the dense train step only"
        return
    seconds, used = train_seconds(cfg, params_of[kind], sz.batch, sz, device, dtype, smoke)
    flops = model_flops(cfg, used)
    row.update(batch=used, step_ms=seconds * 1e3, model_tflop=flops / 1e12, tflops=flops / seconds / 1e12,
               of_matmul=flops / seconds / matmul, mfu=(flops / seconds / peak) if peak else None)


def goals(rows: list[dict[str, Any]], judged: bool) -> dict[str, Any]:
    """Best MFU per kind against GOALS (judged only against a known peak, outside smoke mode)."""
    out = {}
    for kind, goal in GOALS.items():
        mfus = [r["mfu"] for r in rows if r["kind"] == kind and r.get("mfu") is not None]
        best = max(mfus) if mfus else None
        out[kind] = {"goal": goal, "best_mfu": best, "met": (best is not None and best >= goal) if judged else None}
    return out


def table(report: dict[str, Any]) -> str:
    peak = f"{report['peak_tflops']:.0f}" if report["peak_tflops"] else "unknown"
    lines = [f"{report['device']} ({report['platform']}), jax {report['jax']}, {report['dtype']} compute, peak "
             f"{peak} TFLOP/s, measured {report['matmul_n']}^3 matmul {report['matmul_tflops']:.1f} TFLOP/s, "
             f"{report['seconds']:.0f} s",
             "",
             "| model | dispatch | batch | step ms | TFLOP/s | MFU | of matmul | feature err | correct |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        if "skipped" in r or "error" in r:
            what = f"skipped: {r['skipped']}" if "skipped" in r else f"**FAILED**: {_cell(r['error'])}"
            lines.append(f"| {r['model']} | {r['path']} | | | | | | | {what} |")
            continue
        if "untimed" in r:
            lines.append(f"| {r['model']} | {r['path']} | | | | | | {r['max_feature_err']:.3g} | "
                         f"{'yes' if r['correct'] else 'NO'} ({r['untimed']}) |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"| {r['model']} | {r['path']} | {r['batch']} | {r['step_ms']:.1f} | {r['tflops']:.1f} | {mfu} "
                     f"| {r['of_matmul']:.1%} | {r['max_feature_err']:.3g} | {'yes' if r['correct'] else 'NO'} |")
    for kind, g in report["goals"].items():
        best = f"{g['best_mfu']:.1%}" if g["best_mfu"] is not None else "-"
        verdict = {True: "met", False: "not met", None: "not judged (smoke run or unknown peak)"}[g["met"]]
        lines.append(f"\n{kind} goal MFU >= {g['goal']:.0%}: best {best}, {verdict}")
    lines += ["", f"Inference ({report['dtype']}, `benchmarks/inference.py`'s models, interleaved medians of 3): "]
    lines += report["inference"] or ["skipped: time budget spent"]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def section(quick: bool = False):
    """For `python -m benchmarks.run --only accelerator`: full sizes on a GPU/TPU, smoke sizes on CPU or `quick`."""
    from benchmarks.run import Goal, Section

    smoke = quick or jax.default_backend() == "cpu"
    report = run(smoke=smoke)
    goals = []
    for kind, g in report["goals"].items():
        best = f"{g['best_mfu']:.1%}" if g["best_mfu"] is not None else "-"
        goals.append(Goal(f"{kind} train-step MFU on an H100/H200-class GPU >= {g['goal']:.0%}", best, g["met"],
                          "" if g["met"] is not False else "see the per-path rows"))
    wrong = [f"{r['model']} [{r['path']}]" for r in report["rows"] if r.get("correct") is False]
    goals.append(Goal(f"bf16 features on {report['platform']} within {TOLERANCE} of the CPU float32 result",
                      "all rows" if not wrong else f"failed: {', '.join(wrong)}", not wrong))
    body = (f"Command: `python -m benchmarks.accelerator{' --smoke' if smoke else ''}`"
            f"{' (no accelerator here: smoke sizes, figures not meaningful)' if smoke else ''}.\n\n" + table(report))
    return Section("Accelerator readiness (benchmarks/accelerator.py)", body, goals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check that the script works (CPU ok)")
    parser.add_argument("--batch", type=int, default=256, help="train-step batch per device (halved on OOM)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="rows not started within this many seconds are skipped (a row takes ~1-2 min on a GPU)")
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args(argv)
    report = run(args.smoke, args.batch, args.budget_s)
    print(table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if all(r.get("correct", True) for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
