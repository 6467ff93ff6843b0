"""clipup-plan: per-device memory of an experiment config on a mesh, without the devices.

    clipup-plan --config experiments/clipup_b16.py --devices 64 [--config.batch_size=16384 ...]

Prints the parameter layout (which mesh axes split each parameter group, bytes per device) and the memory
plan: params, optimizer state, gradients and batch exactly as the trainer lays them out, plus an estimate of
the activations the backward pass keeps (`config.remat`, compute dtype, MoE capacity buffers). `--devices`
defaults to this machine's device count; `--device-memory-gib` (default: what the local accelerator reports)
adds a fits / does-not-fit verdict; `--platform cpu` plans for XLA:CPU (remat saves nothing there).
"""

from __future__ import annotations

import pathlib
import sys

from clipup_jax.cli.errors import Parser, run_cli
from clipup_jax.train.configs import load_config, split_overrides


def main(argv: list[str] | None = None) -> None:
    overrides, argv = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = Parser(prog="clipup-plan", description=__doc__)
    parser.add_argument("--config", type=pathlib.Path, required=True, help="experiment file exposing get_config()")
    parser.add_argument("--devices", type=int, default=None, help="devices of the mesh (default: this machine's)")
    parser.add_argument("--device-memory-gib", type=float, default=None,
                        help="memory per device in GiB (default: the local accelerator's, if it reports one)")
    parser.add_argument("--platform", choices=("accelerator", "cpu"), default="accelerator",
                        help="cpu: plan for XLA:CPU, where remat saves no memory (default: GPU/TPU)")
    args = parser.parse_args(argv)
    if args.devices is not None and args.devices < 1:
        parser.error(f"--devices={args.devices}: must be >= 1")

    def body() -> None:
        import jax  # deferred: argument errors come back before jax starts

        from clipup_jax.parallel.layout import format_layout
        from clipup_jax.parallel.memory_plan import format_plan, plan_memory
        from clipup_jax.train.trainer import abstract_train_state

        config = load_config(args.config, overrides)
        memory = None if args.device_memory_gib is None else int(args.device_memory_gib * 2**30)
        if memory is None:
            stats = jax.local_devices()[0].memory_stats() or {}
            memory = stats.get("bytes_limit")
        plan = plan_memory(config, abstract_train_state(config)[3], args.devices or jax.device_count(), memory,
                           args.platform)
        print(f"{args.config}:")
        print(format_layout(plan.layout, compact=True))
        print(format_plan(plan))

    run_cli("clipup-plan", body)


if __name__ == "__main__":
    main()
