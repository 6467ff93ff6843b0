"""Upcycling cost: a random-weight ViT-B-16 dense checkpoint -> 8 experts, top-2, every other block of both towers.

    python -m benchmarks.upcycle [--moments] [--expert-noise S] [--drop-upcycling R] [--preset tiny]

Each step runs in its own child process, which reports its wall time and its own peak
RSS (`ru_maxrss`). The parent stays small (no jax import): Linux carries a parent's
high-water mark into a forked child's `ru_maxrss`, so a large parent would inflate them.

* `convert`: `upcycle_checkpoint` (read the dense checkpoint, stream the sparse one out);
* `plain`: the same sparse tree built fully in memory, then one `StandardCheckpointer.save`
  (only the save is timed: the baseline a conversion is compared with);
* `floor`: the interpreter with jax, orbax and clipup_jax imported, nothing else.

Targets: convert time <= 2x plain, convert peak RSS <= 1.5x the output size.
`--moments` also gives the dense checkpoint Adam moments and converts them too;
`--expert-noise` / `--drop-upcycling` make every expert a fresh array (the worst case for time).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

PRESET = "ViT-B-16"
GIB = 2**30


def _options(args: argparse.Namespace):
    from clipup_jax.checkpoints.upcycle import UpcycleOptions
    from clipup_jax.config import MoEPlan

    return UpcycleOptions(plan=MoEPlan(num_experts=8, top_k=2, layers="every_2", eval_capacity_factor=None),
                          expert_noise=args.expert_noise, drop_upcycling=args.drop_upcycling)


def _step(name: str, root: pathlib.Path, args: argparse.Namespace) -> dict[str, float]:
    """Runs in the child process."""
    import orbax.checkpoint as ocp

    from clipup_jax.checkpoints import format as ckpt_format
    from clipup_jax.checkpoints.upcycle import upcycle, upcycle_checkpoint
    from clipup_jax.models.param_tree import count_params, nest

    seconds, output = 0.0, 0
    if name == "dense":
        _write_dense(root, args.moments, args.preset)
    elif name == "convert":
        t0 = time.perf_counter()
        up = upcycle_checkpoint(root / "dense", root / "sparse", _options(args))
        seconds = time.perf_counter() - t0
        output = 4 * (count_params(up.params) + (2 * count_params(up.params) if up.opt_state is not None else 0))
    elif name == "plain":
        dense = ckpt_format.load_checkpoint(root / "dense")
        up = upcycle(dense.config, dense.params, _options(args), dense.opt_state)
        tree = {"params": nest(up.host_params())}
        if up.opt_state is not None:
            tree["opt_state"] = nest({"count": np.asarray(up.opt_state.count, np.int32),
                                       **{f"mu/{k}": _host(v) for k, v in up.opt_state.mu.items()},
                                       **{f"nu/{k}": _host(v) for k, v in up.opt_state.nu.items()}})
        t0 = time.perf_counter()
        for item, subtree in tree.items():
            ckptr = ocp.StandardCheckpointer()
            ckptr.save((root / "plain" / item).resolve(), subtree)
            ckptr.wait_until_finished()
            ckptr.close()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "output": output, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _host(value):
    return value.materialize() if hasattr(value, "materialize") else value


def _run_child(name: str, root: pathlib.Path, args: argparse.Namespace) -> dict[str, float]:
    argv = [sys.executable, "-m", "benchmarks.upcycle", "--step", name, "--root", str(root), "--preset", args.preset,
            "--expert-noise", str(args.expert_noise), "--drop-upcycling", str(args.drop_upcycling)]
    done = subprocess.run(argv + (["--moments"] if args.moments else []), check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _write_dense(root: pathlib.Path, moments: bool, name: str) -> None:
    from clipup_jax.checkpoints.format import AdamMoments, save_checkpoint
    from clipup_jax.models.param_tree import abstract_params
    from clipup_jax.config import preset

    cfg = preset(name)
    rng = np.random.default_rng(0)
    shapes = abstract_params(cfg)
    params = {k: 0.02 * rng.standard_normal(v.shape, np.float32) for k, v in shapes.items()}
    opt = None
    if moments:
        opt = AdamMoments(1000, {k: 1e-3 * rng.standard_normal(v.shape, np.float32) for k, v in shapes.items()},
                          {k: 1e-6 * rng.random(v.shape, np.float32) for k, v in shapes.items()})
    save_checkpoint(root / "dense", cfg, params, source={"format": "random-init"}, opt_state=opt)


def _du(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """convert / plain / floor results, each from its own child process, plus sizes on disk."""
    tmp = pathlib.Path(tempfile.gettempdir())
    need = (9 if args.moments else 3) * 2 * GIB * (1 if args.preset == PRESET else 0.01)  # dense + 2 outputs
    free = shutil.disk_usage(tmp).free
    if free < need:
        sys.exit(f"benchmarks.upcycle: {free / GIB:.1f} GiB free in {tmp}, need about {need / GIB:.0f} GiB")
    root = pathlib.Path(tempfile.mkdtemp(prefix="clipup-upcycle-bench-", dir=tmp))
    try:
        _run_child("dense", root, args)
        results = {name: _run_child(name, root, args) for name in ("floor", "convert", "plain")}
        results["disk"] = {"dense": _du(root / "dense"), "sparse": _du(root / "sparse")}
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


def table(results: dict[str, dict[str, float]]) -> list[str]:
    convert, plain, floor = results["convert"], results["plain"], results["floor"]
    output = convert["output"]
    lines = ["| step | wall s | peak RSS GiB | peak RSS / output |", "|---|---:|---:|---:|"]
    for name, label in (("convert", "convert (read dense + stream sparse)"),
                        ("plain", "plain Orbax save of the in-memory sparse tree"),
                        ("floor", "interpreter + imports only")):
        r = results[name]
        wall = f"{r['seconds']:.1f}" if name != "floor" else "-"
        lines.append(f"| {label} | {wall} | {r['peak_rss'] / GIB:.2f} | {r['peak_rss'] / output:.2f} |")
    lines += ["", f"Time ratio convert / plain save: **{convert['seconds'] / plain['seconds']:.2f}** (target <= 2). "
              f"Peak RSS / output: **{convert['peak_rss'] / output:.2f}** (target <= 1.5); "
              f"{(convert['peak_rss'] - floor['peak_rss']) / output:.2f} above the import floor."]
    return lines


def _output_line(results: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    return (f"Output: {results['convert']['output'] / GIB:.2f} GiB of float32 ({results['disk']['sparse'] / GIB:.2f} "
            f"GiB on disk), {'params + Adam moments' if args.moments else 'params only'}, expert noise "
            f"{args.expert_noise:g}, drop-upcycling {args.drop_upcycling:g}.")


def _args(**changes) -> argparse.Namespace:
    return argparse.Namespace(**dict(dict(moments=False, expert_noise=0.0, drop_upcycling=0.0, preset=PRESET),
                                     **changes))


def section(quick: bool = False):
    from benchmarks.run import Goal, Section

    runs = [_args(preset="tiny")] if quick else [_args(), _args(moments=True)]
    lines = [f"Command: `python -m benchmarks.upcycle{' --preset tiny' if quick else ''}` and `... --moments`"
             f"{'' if not quick else ' (not in --quick)'}. A random-weight fp32 {runs[0].preset} dense checkpoint is "
             "written to a temp dir, then each step runs in its own child process that reports its wall time and its "
             "own `ru_maxrss` (the parent never imports jax, since Linux carries a parent's high-water mark into a "
             "forked child). `convert` is `upcycle_checkpoint`: read the dense checkpoint, stream the sparse one out "
             "(experts are `LazyStack`s written one per chunk). `plain` builds the same sparse tree in memory and "
             "times only one `StandardCheckpointer.save` of it."]
    goals = []
    for args in runs:
        results = measure(args)
        convert, plain = results["convert"], results["plain"]
        lines += ["", f"`{'--moments' if args.moments else 'params only'}`: {_output_line(results, args)}", "",
                  *table(results)]
        what = "params + Adam moments" if args.moments else "params"
        t, m = convert["seconds"] / plain["seconds"], convert["peak_rss"] / convert["output"]
        judged = args.preset == PRESET  # a tiny model's output is far below the interpreter's own RSS
        goals += [Goal(f"upcycle {what}: time <= 2x a plain Orbax save", f"{t:.2f}x", t <= 2 if judged else None,
                       "" if t <= 2 else "streaming writes slower than one save"),
                  Goal(f"upcycle {what}: peak RSS <= 1.5x the output", f"{m:.2f}x", m <= 1.5 if judged else None,
                       "" if m <= 1.5 else "the dense tree + write buffers")]
    lines += ["", NOTES]
    return Section(f"Upcycling: dense {PRESET} -> 8 experts, top-2, every other block of both towers",
                   "\n".join(lines), goals)


NOTES = ("The convert peak is the dense tree + imports + tensorstore's write buffers, which glibc keeps mapped "
         "after the writes; the plain save holds the dense tree, the whole sparse tree and Orbax's defensive copy "
         "of it. `--expert-noise 0.01 --drop-upcycling 0.25` (every expert a fresh array, noise drawn while earlier "
         "experts are written) is the worst case for time.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moments", action="store_true", help="dense checkpoint carries Adam moments, converted too")
    parser.add_argument("--expert-noise", type=float, default=0.0, help="per-expert kernel noise std")
    parser.add_argument("--drop-upcycling", type=float, default=0.0, help="fraction of hidden units re-initialised")
    parser.add_argument("--preset", default=PRESET, help="dense model preset (tiny: a smoke run)")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(_step(args.step, args.root, args)))
        return
    results = measure(args)
    print(f"dense random {args.preset}: {results['disk']['dense'] / GIB:.2f} GiB on disk")
    print(_output_line(results, args))
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
