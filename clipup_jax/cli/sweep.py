"""clipup-sweep: run the arms of a sweep one after another, or print their launch commands.

A sweep file defines `BASE` (an experiment file, relative to the sweep file) and `get_sweep()`,
returning `[{"name": str, "overrides": ["--config.a.b=v", ...]}, ...]`: sweeps are data.
Each arm trains in WORKDIR/NAME (resumed if present), so a stopped sweep continues where it was.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import shlex
import sys

from clipup_jax.cli.errors import Parser, quiet_libraries, run_cli
from clipup_jax.train.configs import ConfigFileError, load_config
from clipup_jax.train.host_memory import cap_malloc_arenas


def load_sweep(path: pathlib.Path) -> tuple[pathlib.Path, list[dict]]:
    if not path.is_file():
        raise ConfigFileError(f"{path}: sweep file not found")
    spec = importlib.util.spec_from_file_location(f"clipup_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        arms = module.get_sweep() if hasattr(module, "BASE") and hasattr(module, "get_sweep") else None
    except Exception as e:  # the user's code: one line, like any other bad input
        raise ConfigFileError(f"{path}: failed to load ({type(e).__name__}: {e})") from e
    if arms is None:
        raise ConfigFileError(f"{path}: a sweep file defines BASE and get_sweep()")
    if not isinstance(arms, list) or not all(isinstance(a, dict) and isinstance(a.get("overrides"), list)
                                             for a in arms):
        raise ConfigFileError(f"{path}: get_sweep() must return a list of {{'name': str, 'overrides': [str, ...]}}")
    names = [arm.get("name", "") for arm in arms]
    bad = [n for n in names if not re.fullmatch(r"[\w.+-]+", n)]
    if bad or len(set(names)) != len(names):
        raise ConfigFileError(f"{path}: arm names must be unique and [A-Za-z0-9_.+-]+, got {names}")
    base = (path.parent / module.BASE).resolve()
    for arm in arms:  # every override must apply before anything runs
        load_config(base, arm["overrides"])
    return base, arms


def _sweep(path: pathlib.Path, workdir: pathlib.Path, dry_run: bool) -> None:
    from clipup_jax.train.trainer import check_config

    base, arms = load_sweep(path)
    for arm in arms:  # every arm's config is sound before the first one trains
        try:
            check_config(load_config(base, arm["overrides"]), workdir / arm["name"])
        except (ValueError, FileNotFoundError) as e:
            raise ConfigFileError(f"{path}: arm {arm['name']!r}: {e}") from e
    for i, arm in enumerate(arms, 1):
        command = ["clipup-train", "--config", str(base), "--workdir", str(workdir / arm["name"]), *arm["overrides"]]
        print(f"[{i}/{len(arms)}] {arm['name']}: {shlex.join(command)}", flush=True)
        if not dry_run:
            from clipup_jax.train.run import run_experiment

            run_experiment(load_config(base, arm["overrides"]), workdir / arm["name"])


def main(argv: list[str] | None = None) -> None:
    cap_malloc_arenas()  # first: before any library starts a thread
    quiet_libraries()
    parser = Parser(prog="clipup-sweep", description=__doc__)
    parser.add_argument("sweep", type=pathlib.Path)
    parser.add_argument("--workdir", type=pathlib.Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="print the clipup-train commands only")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run_cli("clipup-sweep", lambda: _sweep(args.sweep, args.workdir, args.dry_run))


if __name__ == "__main__":
    main()
