"""clipup-train: run (or resume) an experiment config in a work directory.

    clipup-train --config experiments/clipup_b16.py --workdir runs/b16 [--config.optim.lr=3e-4 ...]

Multi-host: run the same command on every host. TPU pods, SLURM and mpirun are detected; elsewhere set
CLIPUP_COORDINATOR=host:port, CLIPUP_NUM_PROCESSES and CLIPUP_PROCESS_ID on each process.
"""

from __future__ import annotations

import pathlib
import sys

from clipup_jax.cli.errors import Parser, run_cli
from clipup_jax.storage import as_path
from clipup_jax.train.configs import load_config, split_overrides
from clipup_jax.workarounds import cap_malloc_arenas


def main(argv: list[str] | None = None) -> None:
    arenas = cap_malloc_arenas()  # first: before any library starts a thread
    overrides, argv = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = Parser(prog="clipup-train", description=__doc__)
    parser.add_argument("--config", type=pathlib.Path, required=True, help="experiment file exposing get_config()")
    parser.add_argument("--workdir", type=as_path, required=True,
                        help="checkpoints, logs (a local directory or gs://bucket/path); resumed if present")
    args = parser.parse_args(argv)

    def body() -> None:
        import jax

        from clipup_jax.parallel.distributed import initialize
        from clipup_jax.train.run import run_experiment  # deferred: jax start-up after argument errors
        from clipup_jax.train.trainer import check_config

        config = load_config(args.config, overrides)
        initialize()  # multi-host: TPU pod / SLURM auto, or CLIPUP_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID; else no-op
        check_config(config, args.workdir)  # before run_experiment writes anything
        if jax.process_index() == 0:
            print(arenas, flush=True)
        run_experiment(config, args.workdir)

    from clipup_jax.train.checkpointing import SaveFailed

    run_cli("clipup-train", body, abandon=(SaveFailed,))


if __name__ == "__main__":
    main()
