"""Scaling curve: train-step time and memory as experts grow at fixed active FLOPs, and as the batch grows.

    python -m benchmarks.scaling [--quick] [--experts 8 16 32 64] [--batches 8 16 32 64] [--reps 3]

Experts sweep: CLIP-UP with E = 8 .. 64 experts, always top-2 every other block of both towers,
so each token's active FLOPs stay fixed while parameters (and AdamW state) grow with E. Batch
sweep: dense and CLIP-UP 8e side by side at batch 8 .. 64. Rows within a sweep are interleaved
and the median step time reported.

Memory is per device on one device: the compiled step's argument bytes (parameters, AdamW
moments, batch; donated, so the updated state reuses them) plus its temporary bytes
(activations kept for the backward pass, dispatch buffers, gradients), from XLA's
`memory_analysis()`. One device rather than the 8-device simulated mesh: the simulated devices
share this machine's 2 cores, so their step times would time the simulation, and per-device
memory under an expert axis of n follows from these figures (expert weights and their
moments divide by n, activations by the data axis). The curves are plotted to
`benchmarks/scaling.png`.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import textwrap
import time

import jax

from benchmarks.run import Goal, Section
from benchmarks.train_step import batch_for, clipup, compile_step, dense_model, model_flops
from clipup_jax.config import ModelConfig
from clipup_jax.models.param_tree import abstract_params
from clipup_jax.train.recipes import base_config

MIB = 2**20
PNG = pathlib.Path(__file__).with_name("scaling.png")


def _memory(compiled) -> tuple[int, int]:
    """(argument bytes, temporary bytes) of a compiled step."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes), int(m.temp_size_in_bytes)


def sweep(models: dict[str, tuple[ModelConfig, int]], reps: int) -> dict[str, dict[str, float]]:
    """Each model at its batch size: median step seconds (rows interleaved) and compiled memory."""
    runs = {}
    for name, (cfg, batch_size) in models.items():
        batch = batch_for(cfg, batch_size)
        compiled, state, xla = compile_step(cfg, base_config(cfg), batch)
        args, temp = _memory(compiled)
        params = sum(s.size for s in abstract_params(cfg).values())
        runs[name] = {"compiled": compiled, "state": state, "batch": batch,
                      "row": {"batch": batch_size, "params": params, "flops": model_flops(cfg, batch_size),
                              "xla_flops": xla, "args": args, "temp": temp}}

    def step(name: str) -> None:
        r = runs[name]
        r["state"], metrics = r["compiled"](r["state"], r["batch"])
        jax.block_until_ready(metrics["loss"])

    for name in runs:
        step(name)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name in runs:
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, r in runs.items():
        out[name] = dict(r["row"], seconds=statistics.median(times[name]))
        del r["state"], r["compiled"]  # free each model's state before the next sweep compiles
    return out


def _base(quick: bool) -> tuple[ModelConfig, int]:
    if quick:
        return dense_model(64, 64, 2, 32, 8, context=16, vocab=512), 8
    return dense_model(256, 256, 4, 64, 8, context=32, vocab=1024), 16


def plot(experts: dict[int, dict[str, float]], batches: dict[str, dict[int, dict[str, float]]],
         path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(10, 7.5))
    es = sorted(experts)
    bs = sorted(next(iter(batches.values())))
    ax[0, 0].plot(es, [experts[e]["seconds"] * 1e3 for e in es], "o-")
    ax[0, 1].plot(es, [experts[e]["args"] / MIB for e in es], "o-", label="arguments (params, AdamW, batch)")
    ax[0, 1].plot(es, [experts[e]["temp"] / MIB for e in es], "s-", label="temporaries (activations, grads)")
    for name, rows in batches.items():
        ax[1, 0].plot(bs, [rows[b]["seconds"] / b * 1e3 for b in bs], "o-", label=name)
        ax[1, 1].plot(bs, [(rows[b]["args"] + rows[b]["temp"]) / MIB for b in bs], "o-", label=name)
    for a, xs, xlabel, ylabel, t in (
            (ax[0, 0], es, "experts (top-2: fixed active FLOPs)", "step ms", "step time vs experts"),
            (ax[0, 1], es, "experts (top-2: fixed active FLOPs)", "MiB per device", "memory vs experts"),
            (ax[1, 0], bs, "batch", "step ms per example", "time per example vs batch"),
            (ax[1, 1], bs, "batch", "MiB per device (arguments + temporaries)", "memory vs batch")):
        a.set_xscale("log", base=2)
        a.set_xticks(xs, [str(x) for x in xs])
        a.minorticks_off()
        a.set(xlabel=xlabel, ylabel=ylabel, title=t, ylim=(0, None))
        if a is not ax[0, 0]:
            a.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def section(quick: bool = False, experts: tuple[int, ...] = (8, 16, 32, 64), batches: tuple[int, ...] | None = None,
            reps: int | None = None, png: pathlib.Path | None = None) -> Section:
    dense, batch = _base(quick)
    experts = (8, 64) if quick else experts
    batches = batches or ((4, 8) if quick else (8, 16, 32, 64))
    reps = reps or (2 if quick else 3)
    png = png or (pathlib.Path(tempfile.gettempdir()) / "clipup-scaling-quick.png" if quick else PNG)
    by_experts = sweep({str(e): (clipup(dense, num_experts=e), batch) for e in experts}, reps)
    e_rows = {int(k): v for k, v in by_experts.items()}
    by_batch = sweep({f"{kind} {b}": (cfg, b) for b in batches
                      for kind, cfg in (("dense", dense), ("CLIP-UP 8e", clipup(dense)))}, reps)
    b_rows = {kind: {b: by_batch[f"{kind} {b}"] for b in batches} for kind in ("dense", "CLIP-UP 8e")}
    v, t = dense.vision, dense.text
    desc = (f"vision {v.width} / text {t.width} wide, {v.depth} blocks per tower, {v.image_size} px (patch "
            f"{v.patch_size}), {t.context_length} tokens, float32, AdamW, top-2 every other block, capacity factor "
            "1.25, `sorted` dispatch with padded buffers")
    plot(e_rows, b_rows, png, f"CLIP-UP train step on {jax.default_backend()}: {desc}")
    lines = [f"Command: `python -m benchmarks.scaling{' --quick' if quick else ''}` (jax {jax.__version__}, "
             f"{jax.default_backend()}, one device, median of {reps} interleaved reps). Model: {desc}. "
             f"Plot: `{png.name if png == PNG else png}`.",
             "",
             "Memory is XLA's compiled figure for one device: arguments (parameters, AdamW moments, batch) + "
             "temporaries. One device, not the simulated 8-device mesh: those 8 devices share 2 cores, so their "
             "times would measure the simulation; under an expert axis of n the expert weights and moments divide "
             "by n.",
             "",
             f"Experts, batch {batch}:", "",
             "| experts | params M | model GFLOP | XLA GFLOP | step ms | vs 8 experts | args MiB | temp MiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = e_rows[min(e_rows)]
    for e, r in sorted(e_rows.items()):
        lines.append(f"| {e} | {r['params'] / 1e6:.1f} | {r['flops'] / 1e9:.2f} | {r['xla_flops'] / 1e9:.2f} | "
                     f"{r['seconds'] * 1e3:.1f} | {r['seconds'] / base['seconds']:.2f} | {r['args'] / MIB:.0f} | "
                     f"{r['temp'] / MIB:.0f} |")
    lines += ["", "Batch, dense vs CLIP-UP 8 experts:", "",
              "| batch | dense ms | CLIP-UP ms | sparse / dense | dense ms/example | dense MiB | CLIP-UP MiB |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for b in batches:
        d, s = b_rows["dense"][b], b_rows["CLIP-UP 8e"][b]
        lines.append(f"| {b} | {d['seconds'] * 1e3:.1f} | {s['seconds'] * 1e3:.1f} | {s['seconds'] / d['seconds']:.2f} "
                     f"| {d['seconds'] / b * 1e3:.1f} | {(d['args'] + d['temp']) / MIB:.0f} | "
                     f"{(s['args'] + s['temp']) / MIB:.0f} |")
    top = e_rows[max(e_rows)]
    lines += ["", f"From {min(e_rows)} to {max(e_rows)} experts the parameters grow "
              f"{top['params'] / base['params']:.1f}x and the step time {top['seconds'] / base['seconds']:.2f}x at "
              f"the same model FLOPs; XLA's count grows {top['xla_flops'] / base['xla_flops']:.2f}x, because per-sample "
              "capacity rounds up to a multiple of 4 slots per expert (more experts, more padded slots), and AdamW "
              "touches every expert's weights whatever the routing."]
    ratio = top["seconds"] / base["seconds"]
    goals = [Goal(f"step time {min(e_rows)} -> {max(e_rows)} experts at fixed active FLOPs (reported, no target)",
                  f"{ratio:.2f}x time, {top['params'] / base['params']:.1f}x params", None)]
    return Section("Scaling: experts and batch", "\n".join(lines), goals, {"experts_time_ratio": ratio})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 8 and 64 experts, batch 4 and 8, 2 reps, "
                        "plot to the temp dir")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--png", type=pathlib.Path, default=None)
    a = parser.parse_args()
    print(section(a.quick, tuple(a.experts), tuple(a.batches) if a.batches else None, a.reps, a.png).markdown())


if __name__ == "__main__":
    main()
