"""Start-up of a CLIP-UP run, old code against new in one run: fresh / upcycle on the fly / resume.

Time to the first step, peak host memory, train state, compile and step time, per path and code tree.

    python -m benchmarks.startup [--baseline 15be120] [--reps 1] [--steps 6] [--blocks 4] [--image-size 224]

"old" is a temporary `git worktree` of `--baseline` (removed afterwards), "new" this working tree. A child runs a
tree's code from its root with PYTHONPATH set to it (ahead of the venv's editable install) and that tree's
experiments/ configs; each tree makes its own dense parent (untimed) and workdirs (layouts may differ).

Each path is one `clipup-train` child on 8 simulated CPU devices with an expert axis of 8: CLIP-UP at ViT-B/16
widths (8 experts, top-2, every other block of both towers; `--blocks` blocks per tower), batch 8, the embedded
data set, no eval, log_every=1, a checkpoint at the last step only:
  fresh    a random init, `--steps` steps
  upcycle  from the tree's dense checkpoint of the same widths (a dense one-step run), `--steps` steps
  resume   that round's fresh run relaunched to 2 x `--steps` (restores straight into the shardings)
Per path, old and new run back to back, the order swapped each `--reps` round; the tables show the median per
(tree, path) and the new / old ratios. The parent samples the child's resident memory (/proc/PID/status VmRSS,
every 20 ms) and stamps each line it prints. Simulated devices keep their buffers in host memory, so start-up is
judged by its transient: the peak RSS up to the first step's line against the median RSS while it then trains,
up to its last step line (1.0 = start-up holds no copy the run does not keep), and the seconds from launch to
that line (imports and compile included).
Train state and compile seconds are the child's own lines (`train state from ... in Xs` / `restored in Xs`,
`compiled the train step in Xs`); step time is the median `ms/step` its `[step N]` lines print after the first
(the time between successive logged steps), or, where a tree prints none, the median gap between those lines'
arrival stamps. Not part of CI (minutes, ~13 GiB per child at 4 blocks, 224 px).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import soak

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPARSE, DENSE = pathlib.Path("experiments", "clipup_b16.py"), pathlib.Path("experiments", "clip_b16_dense.py")
PATHS = ("fresh", "upcycle", "resume")
TREES = ("old", "new")
_STATE = re.compile(r"(?:train state from .* in|restored in) ([0-9.]+)s")
_COMPILE = re.compile(r"compiled the train step in ([0-9.]+)s")
_STEP_MS = re.compile(r"([0-9.]+) ms/step")


def _overrides(blocks: int, image_size: int) -> list[str]:
    return [f"--config.model.vision.depth={blocks}", f"--config.model.text.depth={blocks}",
            f"--config.model.vision.image_size={image_size}", "--config.batch_size=8",
            "--config.data.train=synthetic:train", "--config.data.eval=", "--config.data.tokenizer=",
            "--config.data.synthetic_size=64", "--config.data.num_workers=0", "--config.eval_every=0",
            "--config.log_every=1", "--config.checkpoint_every=1000000", "--config.optim.warmup_steps=1",
            "--config.compute_dtype=float32", "--config.remat=none"]


def run_child(tree: pathlib.Path, config: pathlib.Path, workdir: pathlib.Path, overrides: list[str], steps: int,
              log: pathlib.Path) -> dict[str, float]:
    """Launches one child on `tree`'s code (its root as cwd and PYTHONPATH) up to `steps` total steps; returns
    seconds to the first step line, the child's train state and compile seconds (nan where not printed), the
    median step time after the first step (ms), and peak RSS until the first step and the median RSS from it to
    the last step line (MiB)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "clipup_jax.cli.train", "--config", str(tree / config), *overrides,
           f"--config.total_steps={steps}", "--workdir", str(workdir)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tree)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = soak.rss_mib(proc.pid)
            if rss is not None:
                samples.append((time.perf_counter() - start, rss))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    arrivals: list[float] = []  # this launch's [step N] lines (the first is step 1, or the resumed step + 1)
    printed_ms: list[float] = []  # the ms/step of those after the first
    state_s = compile_s = float("nan")
    with open(log, "a") as out:
        out.write(f"$ cd {tree} && PYTHONPATH={tree} {' '.join(cmd)}\n")
        for line in proc.stdout:
            now = time.perf_counter() - start
            out.write(line)
            if line.startswith("[step "):
                if arrivals and (m := _STEP_MS.search(line)):
                    printed_ms.append(float(m.group(1)))
                arrivals.append(now)
            elif m := _STATE.search(line):
                state_s = float(m.group(1))
            elif m := _COMPILE.search(line):
                compile_s = float(m.group(1))
    code = proc.wait()
    done.set()
    sampler.join()
    if code != 0 or not arrivals:
        raise RuntimeError(f"child exited {code} {'before its first step ' if not arrivals else ''}(log: {log})")
    first = arrivals[0]
    gaps = printed_ms or [(b - a) * 1e3 for a, b in zip(arrivals, arrivals[1:])]
    before = [rss for t, rss in samples if t <= first]
    # What the run holds while it trains: the median between the first and the last step line (a single sample
    # right after the first step can catch the step's buffers freed; the last step's save is not training).
    steady = [rss for t, rss in samples if first < t <= arrivals[-1]] or \
        [rss for t, rss in samples if t > first][:1] or before[-1:]
    return {"first_step_s": first, "state_s": state_s, "compile_s": compile_s,
            "step_ms": statistics.median(gaps) if gaps else float("nan"),
            "peak_mib": max(before), "after_mib": statistics.median(steady)}


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def add_worktree(rev: str, path: pathlib.Path) -> pathlib.Path:
    """A detached `git worktree` of `rev` at `path` (remove it with `remove_worktree`)."""
    _git("worktree", "add", "--detach", str(path), rev)
    return path


def remove_worktree(path: pathlib.Path) -> None:
    try:
        _git("worktree", "remove", "--force", str(path))
    except subprocess.CalledProcessError:  # half made: drop the directory and git's record of it
        shutil.rmtree(path, ignore_errors=True)
        _git("worktree", "prune")


def bench(trees: dict[str, pathlib.Path], scratch: pathlib.Path, blocks: int, image_size: int, steps: int,
          reps: int, log: pathlib.Path) -> dict[tuple[str, str], list[dict[str, float]]]:
    """Every (tree, path) child `reps` times, old and new interleaved per path; the runs per (tree, path)."""
    common = _overrides(blocks, image_size)
    sparse = [*common, "--config.mesh.expert=8"]
    for tree, code in trees.items():  # each tree's dense parent of its upcycle path, same widths, not timed
        print(f"{tree}: the dense parent ...", flush=True)
        run_child(code, DENSE, scratch / tree / "dense", common, 1, log)
    runs: dict[tuple[str, str], list[dict[str, float]]] = {(t, p): [] for t in trees for p in PATHS}
    for rep in range(reps):
        order = list(trees) if rep % 2 == 0 else list(trees)[::-1]
        for path in PATHS:
            for tree in order:
                code, work = trees[tree], scratch / tree
                fresh = work / f"fresh{rep}"
                if path == "fresh":
                    r = run_child(code, SPARSE, fresh, sparse, steps, log)
                elif path == "upcycle":
                    r = run_child(code, SPARSE, work / f"upcycle{rep}",
                                  [*sparse, f"--config.init.checkpoint={work / 'dense'}"], steps, log)
                else:
                    r = run_child(code, SPARSE, fresh, sparse, 2 * steps, log)
                runs[tree, path].append(r)
                print(f"round {rep + 1}/{reps} {path:<8} {tree}: first step {r['first_step_s']:.1f}s, "
                      f"peak {r['peak_mib']:.0f} MiB", flush=True)
    return runs


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def report(runs: dict[tuple[str, str], list[dict[str, float]]]) -> None:
    """Prints the (path x tree) table of medians and the new / old ratios per path."""
    med = {key: _median(rs) for key, rs in runs.items()}
    print(f"{'path':<9}{'tree':<5}{'first step (s)':>15}{'train state (s)':>16}{'compile (s)':>12}"
          f"{'step (ms)':>10}{'peak RSS to 1st step (MiB)':>27}{'RSS after (MiB)':>16}{'peak/after':>11}")
    for path in PATHS:
        for tree in TREES:
            r = med[tree, path]
            print(f"{path:<9}{tree:<5}{r['first_step_s']:>15.1f}{r['state_s']:>16.1f}{r['compile_s']:>12.1f}"
                  f"{r['step_ms']:>10.0f}{r['peak_mib']:>27.0f}{r['after_mib']:>16.0f}"
                  f"{r['peak_mib'] / r['after_mib']:>11.2f}")
    print(f"\nnew / old\n{'path':<9}{'first step':>11}{'compile':>9}{'step':>7}{'peak RSS':>10}")
    for path in PATHS:
        old, new = med["old", path], med["new", path]
        ratio = {k: new[k] / old[k] if old[k] else float("nan")
                 for k in ("first_step_s", "compile_s", "step_ms", "peak_mib")}
        print(f"{path:<9}{ratio['first_step_s']:>11.2f}{ratio['compile_s']:>9.2f}{ratio['step_ms']:>7.2f}"
              f"{ratio['peak_mib']:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="15be120", metavar="REV",
                        help="the old tree's git revision (a temporary worktree)")
    parser.add_argument("--new", default=None, metavar="REV",
                        help="the new tree's git revision (a second worktree); default: this working tree")
    parser.add_argument("--reps", type=int, default=1, help="rounds; the tables show the median per (tree, path)")
    parser.add_argument("--steps", type=int, default=6, help="steps per fresh/upcycle child (resume adds as many)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per tower (ViT-B/16 has 12)")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    if args.steps < 2 or args.reps < 1:
        parser.error("--steps must be >= 2 (a step time needs two step lines) and --reps >= 1")
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="clipup-startup-"))
    log = scratch / "children.log"
    worktrees: list[pathlib.Path] = []
    try:
        trees = {"old": add_worktree(args.baseline, scratch / "tree-old")}
        worktrees.append(trees["old"])
        if args.new is None:
            trees["new"] = ROOT
        else:
            trees["new"] = add_worktree(args.new, scratch / "tree-new")
            worktrees.append(trees["new"])
        runs = bench(trees, scratch, args.blocks, args.image_size, args.steps, args.reps, log)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        detail = e.stderr if isinstance(e, subprocess.CalledProcessError) else (
            log.read_text()[-3000:] if log.exists() else "")
        print(f"{e}\n{detail}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        for tree in worktrees:
            remove_worktree(tree)
        kept = ROOT / "out" / "startup_children.log"
        if log.exists():
            kept.parent.mkdir(exist_ok=True)
            shutil.copy(log, kept)
        shutil.rmtree(scratch, ignore_errors=True)
    new = f"{args.new} (worktree)" if args.new else "this working tree"
    print(f"\nCLIP-UP at ViT-B/16 widths, {args.blocks} blocks per tower, {args.image_size} px, 8 simulated devices "
          f"(expert=8), batch 8, {args.steps} steps (resume: {args.steps} more), median of {args.reps} round(s); "
          f"old = {args.baseline} (worktree), new = {new}; children's output in out/startup_children.log")
    report(runs)


if __name__ == "__main__":
    main()
