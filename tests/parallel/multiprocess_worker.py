"""One process of the multi-process training test (tests/parallel/test_multiprocess.py), and its config file.

    python multiprocess_worker.py WORKDIR STEPS TOKENIZER [--config.X=Y ...]   # with CLIPUP_COORDINATOR/... env

WORKDIR is local or gs://; each process writes its `rows_<process>.json` to its working directory.

It goes through `clipup-train` (`clipup_jax.cli.train.main`) with this file as the experiment config; so does the
test's one-process reference (`train`, called in the test's own 8-device process).
"""

from __future__ import annotations

import json
import pathlib
import sys

from clipup_jax.config import ModelConfig, MoEPlan, TextConfig, VisionConfig
from clipup_jax.train.recipes import base_config, sparse

TINY = ModelConfig(vision=VisionConfig(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64),
                   text=TextConfig(vocab_size=768, context_length=16, width=32, depth=1, heads=2, mlp_dim=64),
                   embed_dim=16)

def get_config():
    config = base_config(sparse(TINY, MoEPlan(layers="last_1", num_experts=8, top_k=2)))
    config.mesh.data, config.mesh.fsdp, config.mesh.expert = 2, 1, 4
    config.data.synthetic_size = 200
    config.data.eval_size = 40
    config.batch_size = 16
    config.total_steps = 4
    config.optim.warmup_steps = 2
    config.optim.eps = 1.0  # >= every clipped gradient element: the update is Lipschitz in the gradient (the test's bound)
    config.log_every = 1
    config.eval_every = 0
    config.checkpoint_every = 2
    return config


def _row_owners(out: pathlib.Path) -> None:
    """Which global batch rows each process's local batch fills (written by every process)."""
    import jax

    from clipup_jax.train.trainer import batch_shardings, config_mesh

    sharding = batch_shardings(config_mesh(get_config()))["tokens"]
    rows = sorted({idx[0].indices(16)[:2] for idx in sharding.addressable_devices_indices_map((16, 16)).values()})
    lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
    (out / f"rows_{jax.process_index()}.json").write_text(json.dumps(
        {"process": jax.process_index(), "count": jax.process_count(), "devices": jax.device_count(),
         "local_devices": jax.local_device_count(), "rows": [lo, hi],
         "contiguous": sum(b - a for a, b in rows) == hi - lo}))


def train(workdir, steps: int, tokenizer: pathlib.Path, overrides: tuple[str, ...] = ()) -> None:
    from clipup_jax.cli.train import main as train_main

    argv = ["--config", __file__, "--workdir", str(workdir), f"--config.total_steps={steps}",
            f"--config.data.tokenizer={tokenizer}", *overrides]
    try:
        train_main(argv)  # calls clipup_jax.parallel.distributed.initialize() (a no-op without CLIPUP_* env)
    except SystemExit as e:
        if e.code:
            raise


def main() -> None:
    workdir, steps, tokenizer = sys.argv[1:4]
    train(workdir, int(steps), pathlib.Path(tokenizer), tuple(sys.argv[4:]))
    import jax

    _row_owners(pathlib.Path.cwd())
    print(f"worker done: process {jax.process_index()}/{jax.process_count()} devices {jax.device_count()}",
          flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
