"""Host memory vs speed of the malloc arena cap: RSS growth and step rate, capped and glibc's default, side by side.

    python -m benchmarks.host_memory [--quick]
    python -m benchmarks.run --only host_memory [--quick]   (rewrites its RESULTS.md section)

Not part of CI (~15 min; --quick ~6). `clipup-train` caps glibc's malloc arenas (clipup_jax/workarounds.py);
`MALLOC_ARENA_MAX` set in a child's environment overrides the cap, so each arm is one environment variable: the
cap, or glibc's own default of 8 per core. Arms alternate, so a noisy neighbour hits both. Three runs per arm:
  memory  the soak's config (benchmarks/soak.py: checkpoint every 10, eval every 25, a log line every step):
          RSS growth per 1,000 steps after warm-up (peak RSS of each 50-step window, least squares)
  speed   the same tiny model, nothing but train steps: steps/s after the first logged step
  wide    ViT-B/16 widths (768, 12 heads, 2 blocks per tower, 4 experts in one), batch 16: steps/s
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import signal
import tempfile
import time

from benchmarks import soak

WIDE = ["--config.model.vision.width=768", "--config.model.vision.mlp_dim=3072", "--config.model.vision.heads=12",
        "--config.model.text.width=768", "--config.model.text.mlp_dim=3072", "--config.model.text.heads=12",
        "--config.model.embed_dim=512"]


def _overrides(changes: list[str]) -> list[str]:
    """The soak's overrides with `changes` replacing fields of the same name."""
    names = {c.split("=", 1)[0] for c in changes}
    return [o for o in soak.OVERRIDES if o.split("=", 1)[0] not in names] + changes


@dataclasses.dataclass
class Arm:
    arenas: int
    slope: float | None = None
    rates: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {"speed": [], "wide": []})


def _launch(root: pathlib.Path, name: str, arenas: int, steps: int, changes: list[str]) -> soak.Launch:
    """One uninterrupted clipup-train child with MALLOC_ARENA_MAX=arenas."""
    launch = soak.Launch(cycle=0, signal="none", resumed_from=None)
    try:
        soak._run(root / name, steps, root / "children.log", None, signal.SIGKILL, launch,
                  overrides=_overrides(changes), env={"MALLOC_ARENA_MAX": str(arenas)})
    finally:
        shutil.rmtree(root / name, ignore_errors=True)
    return launch


def measure(quick: bool, root: pathlib.Path) -> list[Arm]:
    from clipup_jax.workarounds import DEFAULT_ARENAS

    arms = [Arm(DEFAULT_ARENAS), Arm(8 * (os.cpu_count() or 1))]
    memory_steps, speed_steps, wide_steps, repeats = (1200, 1500, 40, 1) if quick else (3000, 3000, 120, 2)
    quiet = ["--config.checkpoint_every=100000", "--config.eval_every=0", "--config.log_every=10"]
    for arm in arms:
        arm.slope = _launch(root, f"memory{arm.arenas}", arm.arenas, memory_steps, []).slope()
    for _ in range(repeats):
        for arm in arms:
            arm.rates["speed"].append(_launch(root, "speed", arm.arenas, speed_steps, quiet).steps_per_s)
            arm.rates["wide"].append(_launch(root, "wide", arm.arenas, wide_steps, quiet + WIDE).steps_per_s)
    return arms


def section(quick: bool = False, workdir: pathlib.Path | None = None):
    from benchmarks.run import Goal, Section
    from clipup_jax.cli.errors import quiet_libraries

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    quiet_libraries()
    root = workdir or pathlib.Path(tempfile.mkdtemp(prefix="clipup-host-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        capped, default = measure(quick, root)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    def rate(arm: Arm, kind: str) -> float:
        return sum(arm.rates[kind]) / len(arm.rates[kind])

    def slope(arm: Arm) -> str:
        return "n/a (too short)" if arm.slope is None else f"{arm.slope:+.1f}"

    rows = ["| malloc arenas | RSS growth, soak config, MiB / 1k steps | steps/s tiny model | steps/s B/16 widths |",
            "|---|---:|---:|---:|"]
    for arm, label in ((capped, f"{capped.arenas} (clipup-train's cap)"), (default, f"{default.arenas} (glibc)")):
        rows.append(f"| {label} | {slope(arm)} | {rate(arm, 'speed'):.1f} | {rate(arm, 'wide'):.2f} |")
    ratios = {kind: rate(capped, kind) / rate(default, kind) for kind in ("speed", "wide")}
    command = f"python -m benchmarks.host_memory{' --quick' if quick else ''}"
    body = (f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()}-core CPU, one simulated device per "
            f"child, arms alternating). Each arm is one `clipup-train` child per row with `MALLOC_ARENA_MAX` set.\n\n"
            + "\n".join(rows) + f"\n\nStep rate, capped / glibc default: tiny model {ratios['speed']:.2f}x, "
            f"B/16 widths {ratios['wide']:.2f}x.\n")
    flat = capped.slope is not None and abs(capped.slope) <= soak.RSS_FLAT_MIB_PER_1K_STEPS
    goals = [Goal(f"host memory: RSS flat with the arena cap (<= {soak.RSS_FLAT_MIB_PER_1K_STEPS:g} MiB / 1k steps)",
                  f"{slope(capped)} MiB / 1k steps (glibc default: {slope(default)})", flat),
             Goal("host memory: step rate cost of the arena cap", f"tiny {ratios['speed']:.2f}x, B/16 widths "
                  f"{ratios['wide']:.2f}x of glibc's default", None)]
    return Section("Host memory: malloc arenas", body, goals,
                   {"arena_cap_speed_ratio": ratios["speed"], "arena_cap_wide_ratio": ratios["wide"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, one repeat (~6 min)")
    args = parser.parse_args()
    print(section(quick=args.quick).markdown())


if __name__ == "__main__":
    main()
