"""CPU soak: train, evaluate and checkpoint continuously while being killed; resumes must be exact, memory flat.

    python -m benchmarks.soak [--minutes 20] [--steps N] [--seed 0] [--workdir DIR]
    python -m benchmarks.run --only soak [--quick]      (rewrites its RESULTS.md section; --quick: 1 minute)

Not part of CI. A tiny CLIP-UP config (experiments/clipup_demo.py, shrunk; eval and checkpoints every few
steps) first trains `--steps` steps uninterrupted: the reference. Then, until `--minutes` are up, cycles of
the same run are trained by `python -m clipup_jax.cli.train` subprocesses that are SIGKILLed (every third
time SIGTERMed instead) at random moments and relaunched. Between launches the latest checkpoint must load
with finite parameters and the relaunch must resume from exactly that step. Every cycle that reaches
`--steps` must end with parameters bitwise equal to the reference; when time is up the current cycle is
finished without kills and compared too. Each child's RSS is sampled (psutil, else /proc/PID/status) and
its growth per 1000 steps after warm-up is reported: it must be flat.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Mapping, Sequence

import numpy as np

ROOT = pathlib.Path(__file__).parents[1]
CONFIG = ROOT / "experiments" / "clipup_demo.py"
OVERRIDES = [  # ~0.1 M params, 2 blocks per tower, block 1 of each an MoE layer (4 experts, top-2)
    "--config.model.vision.width=32", "--config.model.vision.mlp_dim=64", "--config.model.vision.heads=2",
    "--config.model.vision.depth=2", "--config.model.text.width=32", "--config.model.text.mlp_dim=64",
    "--config.model.text.heads=2", "--config.model.text.depth=2", "--config.model.embed_dim=16",
    "--config.batch_size=16", "--config.data.synthetic_size=2000", "--config.data.eval_size=48",
    "--config.eval_batch_size=48", "--config.log_every=1", "--config.eval_every=25", "--config.checkpoint_every=10",
    "--config.keep_checkpoints=2", "--config.optim.warmup_steps=10",
]
WARMUP_STEPS = 300  # RSS before this many steps of a launch (compile, first evals and saves) is not growth
RSS_WINDOW_STEPS = 50  # growth is fitted to the peak RSS of each window: robust to the allocator's sawtooth
RSS_FLAT_MIB_PER_1K_STEPS = 5.0


@dataclasses.dataclass
class Launch:
    cycle: int
    signal: str  # "KILL", "TERM", "late" (after the last save, while exiting) or "none" (ran to the end)
    resumed_from: int | None
    last_step: int = 0
    seconds: float = 0.0
    rss: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, MiB)
    returncode: int | None = None
    steps_per_s: float = 0.0  # after the first step (compile, data start-up excluded)

    def slope(self) -> float | None:
        """RSS growth in MiB per 1000 steps after warm-up: a least-squares line through the peak RSS of each
        RSS_WINDOW_STEPS-step window; None when the launch lived too few steps past warm-up."""
        first = (self.resumed_from or 0) + WARMUP_STEPS
        peaks: dict[int, tuple[int, float]] = {}
        for step, mib in self.rss:
            window = step // RSS_WINDOW_STEPS
            if step >= first and mib > peaks.get(window, (0, 0.0))[1]:
                peaks[window] = (step, mib)
        if len(peaks) < 4:
            return None
        steps, mib = np.array(sorted(peaks.values()), float).T
        return float(np.polyfit(steps, mib, 1)[0] * 1000)


def rss_mib(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        pass
    except Exception:  # the child is gone
        return None
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Child:
    """One `clipup-train` subprocess; a thread follows its output for the current step."""

    def __init__(self, workdir: pathlib.Path, steps: int, log: pathlib.Path, cache: pathlib.Path,
                 overrides: Sequence[str] = OVERRIDES, env: Mapping[str, str] | None = None):
        # A relaunch reuses the compiled step from JAX's persistent cache, as a production restart would.
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
               "PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": str(cache),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
               **(env or {})}
        cmd = [sys.executable, "-m", "clipup_jax.cli.train", "--config", str(CONFIG), *overrides,
               f"--config.total_steps={steps}", "--workdir", str(workdir)]
        self.log = open(log, "a")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=ROOT)
        self.step = 0
        self.resumed_from: int | None = None
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.lines.append(line)
            if line.startswith("[step "):
                self.step = int(line[6:].split("/")[0])
            elif line.startswith("resumed from "):
                self.resumed_from = int(line.rsplit(" ", 1)[1])

    def finish(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join()
        self.log.close()
        return code

    def tail(self) -> str:
        return "".join(self.lines[-15:])


def _latest(workdir: pathlib.Path) -> tuple[int | None, dict[str, np.ndarray] | None]:
    """(step, params) of the workdir's latest complete checkpoint, or (None, None) before the first save. A
    newest step that does not read (the loader falls back to an earlier one with a warning) is an error here."""
    from clipup_jax.checkpoints.errors import CheckpointError
    from clipup_jax.checkpoints.format import load_checkpoint

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*earlier step")  # the loader skipped a damaged newest step
        try:
            ckpt = load_checkpoint(workdir, opt_state=False)
        except CheckpointError:
            return None, None
    return ckpt.metadata["step"], ckpt.params


def _run(workdir: pathlib.Path, steps: int, log: pathlib.Path, kill_after: float | None, sig: signal.Signals,
         launch: Launch, overrides: Sequence[str] = OVERRIDES, env: Mapping[str, str] | None = None) -> None:
    """Runs one child (`overrides` on the config, `env` added to its environment) until it exits, or sends it
    `sig` `kill_after` seconds after its first step."""
    child = Child(workdir, steps, log, log.parent / "jax_cache", overrides, env)
    t0, first_step_at, first_step = time.monotonic(), None, 0
    while child.proc.poll() is None:
        rss = rss_mib(child.proc.pid)
        if child.step and rss:  # 0 once the child is exiting
            launch.rss.append((child.step, rss))
            if first_step_at is None:
                first_step_at, first_step = time.monotonic(), child.step
        if kill_after is not None and first_step_at and time.monotonic() - first_step_at >= kill_after:
            child.proc.send_signal(sig)
            break
        time.sleep(0.2)
    launch.returncode = child.finish(timeout=300)
    launch.seconds = time.monotonic() - t0
    launch.last_step, launch.resumed_from = child.step, child.resumed_from
    if first_step_at is not None and child.step > first_step:
        launch.steps_per_s = (child.step - first_step) / (time.monotonic() - first_step_at)
    term_saved = any(line.startswith("SIGTERM: saved step") for line in child.lines)
    if launch.returncode == -signal.SIGKILL and sig == signal.SIGKILL and kill_after is not None:
        launch.signal = "KILL"
    elif launch.returncode == 0 and term_saved and sig == signal.SIGTERM:
        launch.signal = "TERM"
    elif launch.returncode == 0 and launch.last_step == steps:
        launch.signal = "none"  # finished before any signal came
    elif launch.returncode == -sig and launch.last_step == steps and kill_after is not None:
        launch.signal = "late"  # came after the run's last save was durable, while the process was exiting
    else:
        raise RuntimeError(f"launch ended with {launch.returncode} after sending {sig.name if kill_after else 'nothing'}"
                           f":\n{child.tail()}")


def _allocator() -> str:
    """What the children's malloc does (clipup-train caps glibc's arenas unless the environment chooses)."""
    if platform.libc_ver()[0] != "glibc":
        return f"{platform.libc_ver()[0] or 'not glibc'}, left alone"
    if "MALLOC_ARENA_MAX" in os.environ:
        return f"glibc, MALLOC_ARENA_MAX={os.environ['MALLOC_ARENA_MAX']} from the environment"
    from clipup_jax.workarounds import DEFAULT_ARENAS

    return f"glibc arenas capped at {DEFAULT_ARENAS} by clipup-train"


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@dataclasses.dataclass
class SoakResult:
    reference: Launch
    launches: list[Launch]
    steps: int
    verified: int  # checkpoints loaded and found finite after a launch
    equal: list[bool]  # per cycle: its final params equal the reference's bitwise
    kills: int  # launches ended by a signal before the run's end
    stale: int  # orbax temporary directories left at the end of a cycle
    seconds: float

    @property
    def slopes(self) -> list[float]:
        return [s for s in (launch.slope() for launch in [self.reference, *self.launches]) if s is not None]

    @property
    def flat(self) -> bool:
        ref = self.reference.slope()
        return ref is not None and all(abs(s) <= RSS_FLAT_MIB_PER_1K_STEPS for s in (ref, float(np.median(self.slopes))))

    def cycle_table(self) -> str:
        rows = ["| cycle | launches | SIGKILL | SIGTERM | resumed at steps | s | RSS at first step MiB | "
                "peak RSS MiB | final params == reference |", "|---:|---:|---:|---:|---|---:|---:|---:|---|"]
        ref = self.reference
        rows.append(f"| reference | 1 | 0 | 0 | - | {ref.seconds:.0f} | {ref.rss[0][1]:.0f} | "
                    f"{max(m for _, m in ref.rss):.0f} | - |")
        for cycle, equal in enumerate(self.equal, 1):
            runs = [launch for launch in self.launches if launch.cycle == cycle]
            starts = [launch.rss[0][1] for launch in runs if launch.rss]
            peak = max((m for launch in runs for _, m in launch.rss), default=float("nan"))
            resumed = ", ".join(str(launch.resumed_from) for launch in runs if launch.resumed_from is not None) or "-"
            rows.append(f"| {cycle} | {len(runs)} | {sum(r.signal == 'KILL' for r in runs)} | "
                        f"{sum(r.signal == 'TERM' for r in runs)} | {resumed} | "
                        f"{sum(r.seconds for r in runs):.0f} | {min(starts):.0f}-{max(starts):.0f} | {peak:.0f} | "
                        f"{'bitwise' if equal else 'DIFFERENT'} |")
        return "\n".join(rows)

    def launch_table(self) -> str:
        rows = ["| launch | cycle | signal | resumed from | last step | s | RSS start MiB | RSS end MiB | "
                "MiB / 1k steps |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for i, launch in enumerate([self.reference, *self.launches]):
            start = f"{launch.rss[0][1]:.0f}" if launch.rss else "-"
            end = f"{launch.rss[-1][1]:.0f}" if launch.rss else "-"
            slope = launch.slope()
            rows.append(f"| {'reference' if i == 0 else i} | {launch.cycle} | {launch.signal} | "
                        f"{launch.resumed_from if launch.resumed_from is not None else '-'} | {launch.last_step} | "
                        f"{launch.seconds:.1f} | {start} | {end} | {'-' if slope is None else f'{slope:+.2f}'} |")
        return "\n".join(rows)

    def summary(self) -> str:
        executed = sum(launch.last_step - (launch.resumed_from or 0) for launch in self.launches)
        ref = self.reference.slope()
        summary = [
            f"- {self.seconds / 60:.1f} min in all; {len(self.launches)} launches, {self.kills} ended by a signal "
            f"({sum(launch.signal == 'TERM' for launch in self.launches)} of them SIGTERM), every relaunch "
            "resumed from the newest checkpoint",
            f"- steps executed {executed} (+{self.reference.last_step} reference); cycles of {self.steps} steps: "
            f"{len(self.equal)}, final params bitwise equal to the uninterrupted reference: "
            f"{sum(self.equal)}/{len(self.equal)}",
            f"- checkpoints verified (newest step loaded, finite) after each launch: {self.verified}; orbax "
            f"temporary directories left at the end of a cycle: {self.stale}",
            f"- RSS trend: runs too short to measure (a launch needs {WARMUP_STEPS} steps of warm-up, then "
            f"{4 * RSS_WINDOW_STEPS}+ more)" if ref is None else
            f"- RSS growth after warm-up (peak RSS per {RSS_WINDOW_STEPS}-step window, least squares): reference "
            f"{ref:+.2f} MiB / 1k steps over {self.reference.last_step} steps; median over the {len(self.slopes)} "
            f"runs that lived long enough {float(np.median(self.slopes)):+.2f} MiB / 1k steps -> "
            f"{'flat' if self.flat else 'NOT flat'} (limit {RSS_FLAT_MIB_PER_1K_STEPS:g})",
        ]
        return "\n".join(summary)


def soak(minutes: float, steps: int, seed: int, root: pathlib.Path) -> SoakResult:
    rng = random.Random(seed)
    log = root / "children.log"
    t_start = time.monotonic()
    reference = Launch(cycle=0, signal="none", resumed_from=None)
    _run(root / "reference", steps, log, None, signal.SIGKILL, reference)
    ref_step, ref_params = _latest(root / "reference")
    assert ref_step == steps, f"reference ended at step {ref_step}"
    deadline = time.monotonic() + minutes * 60
    launches: list[Launch] = []
    verified, kills, stale, equal = 0, 0, 0, []
    while True:
        cycle = len(equal) + 1
        workdir = root / f"cycle{cycle}"
        done = False
        while not done:
            before, _ = _latest(workdir)
            out_of_time = time.monotonic() >= deadline
            sig = signal.SIGTERM if kills % 3 == 2 else signal.SIGKILL
            launch = Launch(cycle=cycle, signal="none", resumed_from=None)
            # Seconds after the first step: from "during the first save or eval" to "hundreds of steps in".
            # Up to 30 s, and at most ~80 % of what is left of the run, so that most signals land mid-run.
            latest_delay = min(30.0, 0.8 * (steps - (before or 0)) / reference.steps_per_s)
            _run(workdir, steps, log, None if out_of_time else rng.uniform(0.2, max(latest_delay, 0.5)), sig, launch)
            launches.append(launch)
            if launch.resumed_from != before:
                raise RuntimeError(f"{workdir}: resumed from {launch.resumed_from}, latest checkpoint was {before}")
            step, params = _latest(workdir)
            if step is not None:
                if not all(np.isfinite(v).all() for v in params.values()):
                    raise RuntimeError(f"{workdir}: checkpoint step {step} has non-finite parameters")
                verified += 1
            done = step == steps
            kills += launch.signal != "none"
        equal.append(_equal(_latest(workdir)[1], ref_params))
        stale += len(list((workdir / "checkpoints").glob("*tmp*")))
        shutil.rmtree(workdir)
        if time.monotonic() >= deadline:
            break
    return SoakResult(reference, launches, steps, verified, equal, kills, stale, time.monotonic() - t_start)


def section(quick: bool = False, minutes: float | None = None, steps: int | None = None, seed: int = 0,
            workdir: pathlib.Path | None = None, verbose: bool = False):
    """The RESULTS.md section (`python -m benchmarks.run --only soak`); quick = a 1-minute smoke run."""
    from benchmarks.run import Goal, Section
    from clipup_jax.cli.errors import quiet_libraries

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only reads checkpoints
    quiet_libraries()
    minutes = minutes if minutes is not None else (1.0 if quick else 20.0)
    steps = steps or max(150, int(100 * minutes))
    root = workdir or pathlib.Path(tempfile.mkdtemp(prefix="clipup-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = soak(minutes, steps, seed, root)
        if verbose:
            print(result.launch_table() + "\n")
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    command = f"python -m benchmarks.soak --minutes {minutes:g} --steps {steps} --seed {seed}"
    body = (f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()}-core CPU, one simulated device "
            f"per child). Config: experiments/clipup_demo.py shrunk to width 32, one MoE block (4 experts, top-2) "
            f"per tower, batch 16; `log_every=1`, eval every 25 steps, checkpoint every 10 (keep 2). Children are "
            f"SIGKILLed (every third SIGTERMed) 0.2-30 s after their first step (at most ~80 % of the time the "
            f"run has left); compiled programs come from JAX's persistent cache after the first launch. Host "
            f"allocator: {_allocator()}.\n\n{result.cycle_table()}\n\n{result.summary()}\n")
    ref = result.reference.slope()
    goals = [Goal("soak: every kill survived, every cycle ends bitwise equal to an uninterrupted run",
                  f"{result.kills} kills, {sum(result.equal)}/{len(result.equal)} cycles equal",
                  all(result.equal)),
             Goal(f"soak: RSS flat (<= {RSS_FLAT_MIB_PER_1K_STEPS:g} MiB per 1k steps after warm-up)",
                  "n/a" if ref is None else f"{ref:+.1f} MiB / 1k steps (reference run)", result.flat,
                  "" if result.flat else "see the section's notes")]
    return Section("Soak: kills, resumes, memory", body, goals, {"rss_mib_per_1k_steps": ref or float("nan")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="time spent killing and relaunching")
    parser.add_argument("--steps", type=int, help="total_steps of the run, one cycle (default: 100 per minute, "
                                                  "at least 150; the reference run's length, so its RSS trend)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--workdir", type=pathlib.Path, help="keep the runs here (children.log, reference run); "
                                                             "default: a temporary directory, removed")
    args = parser.parse_args()
    print(section(minutes=args.minutes, steps=args.steps, seed=args.seed, workdir=args.workdir,
                  verbose=True).markdown())


if __name__ == "__main__":
    main()
