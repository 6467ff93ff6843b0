"""clipup-sweep: run the arms of a sweep one after another, once per seed, or print their launch commands; report.

A sweep file defines `BASE` (an experiment file, relative to the sweep file) and `get_sweep()`,
returning `[{"name": str, "overrides": ["--config.a.b=v", ...]}, ...]`: sweeps are data. An arm may name its own
`"config"` (another experiment file, relative to the sweep file) and may start `"from"` an earlier arm: it is
initialised from that arm's final checkpoint (model, and tokenizer, as `config.init.checkpoint`), the way the
paper forks every continued arm from one dense parent; an arm others start from therefore runs once (seed 0).
The sweep file may name its `BASELINE` arm (default: the first), which the report compares every other arm with,
seed by seed. Each (arm, seed) trains in WORKDIR/NAME/seed_S with `config.seed = S` (resumed if present, skipped
if finished), so a stopped sweep continues where it was. With `--report`, a run that fails is recorded and the sweep goes on;
then WORKDIR/report.md, report.json and report.png list every arm's mean and 95 % interval, its paired
difference from the baseline, its training FLOPs and time, and every run that did not finish.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shlex
import sys
import time
from typing import TYPE_CHECKING

from clipup_jax.cli.errors import Parser, run_cli
from clipup_jax.storage import Path, as_path
from clipup_jax.train.configs import ConfigFileError, load_config, run_entry
from clipup_jax.workarounds import cap_malloc_arenas

if TYPE_CHECKING:  # the report module imports jax: loaded when a sweep runs, not for --help or a bad sweep file
    from clipup_jax.train.sweep_report import Run


ARM_KEYS = ("name", "overrides", "config", "from")


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: pathlib.Path
    arms: list[dict]
    baseline: str
    base: pathlib.Path

    def config_file(self, arm: dict) -> pathlib.Path:
        """The arm's experiment file: its own `config` or the sweep's `BASE`, relative to the sweep file."""
        return (self.path.parent / arm.get("config", self.base)).resolve()

    @property
    def parents(self) -> set[str]:
        """Arms that others start from: each runs once."""
        return {arm["from"] for arm in self.arms if "from" in arm}


def load_sweep(path: pathlib.Path) -> Sweep:
    module, arms = run_entry(path, "sweep", "get_sweep")
    if not hasattr(module, "BASE"):
        raise ConfigFileError(f"{path}: a sweep file defines BASE (its experiment config) and get_sweep()")
    if not isinstance(arms, list) or not all(isinstance(a, dict) and isinstance(a.get("overrides"), list)
                                             for a in arms):
        raise ConfigFileError(f"{path}: get_sweep() must return a list of {{'name': str, 'overrides': [str, ...]}}")
    names = [arm.get("name", "") for arm in arms]
    bad = [n for n in names if not re.fullmatch(r"[\w.+-]+", n)]
    if bad or len(set(names)) != len(names):
        raise ConfigFileError(f"{path}: arm names must be unique and [A-Za-z0-9_.+-]+, got {names}")
    for i, arm in enumerate(arms):
        unknown = sorted(set(arm) - set(ARM_KEYS))
        if unknown:
            raise ConfigFileError(f"{path}: arm {arm['name']!r} has unknown keys {unknown} (expected {ARM_KEYS})")
        if "from" in arm and arm["from"] not in names[:i]:
            raise ConfigFileError(f"{path}: arm {arm['name']!r} starts from {arm['from']!r}, which is not an "
                                  f"earlier arm ({names[:i]})")
    baseline = getattr(module, "BASELINE", names[0] if names else "")
    if baseline not in names:
        raise ConfigFileError(f"{path}: BASELINE {baseline!r} is not one of its arms {names}")
    sweep = Sweep(path, arms, baseline, module.BASE)
    if baseline in sweep.parents:
        raise ConfigFileError(f"{path}: BASELINE {baseline!r} is an arm others start from, so it runs once: "
                              "no seeds to pair with")
    for arm in arms:  # every config file loads and every override applies before anything runs
        load_config(sweep.config_file(arm), arm["overrides"])
    return sweep


def _run_dir(workdir: Path, arm: str, seed: int) -> Path:
    return workdir / arm / f"seed_{seed}"


def _runs(sweep: Sweep, workdir: Path, seeds: int) -> list[tuple[dict, list[str], Run]]:
    """(arm, overrides, run) of every (arm, seed), arm by arm. An arm that starts from another has its init checkpoint
    among the overrides; its `run.config` leaves it out: the parent may not be trained yet."""
    from clipup_jax.train.sweep_report import Run

    out = []
    for arm in sweep.arms:
        for seed in range(1 if arm["name"] in sweep.parents else seeds):
            overrides = [*arm["overrides"], f"--config.seed={seed}"]
            run = Run(arm["name"], seed, _run_dir(workdir, arm["name"], seed),
                      load_config(sweep.config_file(arm), overrides))
            if "from" in arm:
                overrides.append(f"--config.init.checkpoint={_run_dir(workdir, arm['from'], 0)}")
            out.append((arm, overrides, run))
    return out


def _sweep(path: pathlib.Path, workdir: Path, seeds: int, dry_run: bool, report: bool) -> None:
    from clipup_jax.train.run import run_experiment, use_compile_cache
    from clipup_jax.train.sweep_report import build_report, check_comparable, read_run, write_report
    from clipup_jax.train.trainer import check_config

    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: at least 1")
    sweep = load_sweep(path)
    runs = _runs(sweep, workdir, seeds)
    use_compile_cache(workdir)
    for *_, run in runs:  # every arm's config is sound before the first one trains
        try:
            check_config(run.config, run.workdir)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigFileError(f"{path}: arm {run.arm!r}: {e}") from e
    if report:
        comparisons = [(a["name"], sweep.baseline) for a in sweep.arms
                       if a["name"] != sweep.baseline and a["name"] not in sweep.parents]
        check_comparable([run for *_, run in runs], comparisons)  # before anything trains
    started, trained = time.perf_counter(), 0
    for i, (arm, overrides, run) in enumerate(runs, 1):
        command = ["clipup-train", "--config", str(sweep.config_file(arm)), "--workdir", str(run.workdir), *overrides]
        # ETA from the runs trained in this invocation (finished ones are skipped, not timed).
        eta = f" (ETA {(time.perf_counter() - started) / trained * (len(runs) - i + 1) / 60:.0f} min)" if trained else ""
        print(f"[{i}/{len(runs)}] {run.arm} seed {run.seed}{eta}: {shlex.join(command)}", flush=True)
        if dry_run:
            continue
        if read_run(run)["state"] == "finished":
            print(f"  finished earlier: {run.workdir}", flush=True)
            continue
        trained += 1
        try:
            # Read again now that the parent (if any) has trained: its checkpoint gives the model.
            run_experiment(load_config(sweep.config_file(arm), overrides) if "from" in arm else run.config,
                           run.workdir)
        except Exception as e:
            if not report:
                raise
            print(f"  FAILED: {type(e).__name__}: {e}", flush=True)  # listed in the report as not finished
    if report:
        result = build_report([run for *_, run in runs], comparisons)
        command = shlex.join(["clipup-sweep", str(path), "--workdir", str(workdir), "--seeds", str(seeds), "--report"])
        paths = write_report(result, sweep.baseline, workdir, command)
        print((workdir / "report.md").read_text())
        print("wrote " + ", ".join(map(str, paths)), flush=True)


def main(argv: list[str] | None = None) -> None:
    cap_malloc_arenas()  # first: before any library starts a thread
    parser = Parser(prog="clipup-sweep", description=__doc__)
    parser.add_argument("sweep", type=pathlib.Path)
    parser.add_argument("--workdir", type=as_path, required=True, help="local or gs://: every run's workdir is below it")
    parser.add_argument("--seeds", type=int, default=1, help="runs of every arm, with config.seed = 0 .. N-1")
    parser.add_argument("--dry-run", action="store_true", help="print the clipup-train commands only")
    parser.add_argument("--report", action="store_true",
                        help="after the runs (finished ones are skipped; with --dry-run: none), write "
                             "report.md/json/png to --workdir")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run_cli("clipup-sweep", lambda: _sweep(args.sweep, args.workdir, args.seeds, args.dry_run, args.report))


if __name__ == "__main__":
    main()
