"""clipup-eval: retrieval (and zero-shot, where the data has labels) of a checkpoint or training workdir.

    clipup-eval --checkpoint runs/clipup_b16 [--config experiments/clipup_b16.py] [--config.data.eval=...] [--out m.json]

The checkpoint's own model config and tokenizer are used (or --tokenizer); the config names the eval data. A
training workdir's own saved config.json is the default, so a run is evaluated on what it was evaluated on.
"""

from __future__ import annotations

import json
import pathlib
import sys

from clipup_jax.cli.errors import Parser, run_cli
from clipup_jax.checkpoints.train_workdir import SAVED_CONFIG
from clipup_jax.train.configs import load_config, split_overrides


def _evaluate(checkpoint: pathlib.Path, config_path: pathlib.Path | None, overrides: list[str],
              tokenizer: pathlib.Path | None, out: pathlib.Path | None) -> None:
    from clipup_jax.checkpoints.format import atomic_file, load_checkpoint
    from clipup_jax.checkpoints.params import model_from_params
    from clipup_jax.evaluate.run import evaluate
    from clipup_jax.train.run import eval_data_for

    if config_path is None:
        config_path = checkpoint / SAVED_CONFIG
        if not config_path.is_file():
            raise ValueError(f"--checkpoint {checkpoint}: not a training workdir with a saved {SAVED_CONFIG}; "
                             "pass --config (an experiment file naming the eval data)")
    config = load_config(config_path, overrides)
    ckpt = load_checkpoint(checkpoint, opt_state=False)
    data = eval_data_for(config, ckpt.tokenizer(tokenizer))
    print(f"evaluating on {config.data.eval} (config {config_path})", flush=True)
    metrics = evaluate(model_from_params(ckpt.config, ckpt.params, source=str(checkpoint)), data,
                       config.eval_batch_size)
    step = ckpt.metadata.get("step")
    print(f"{checkpoint}{f' (step {step})' if step is not None else ''} on {config.data.eval}, "
          f"{metrics.pop('eval_images'):.0f} images / {metrics.pop('eval_captions'):.0f} captions:")
    for key, value in metrics.items():  # fractions, as the trainer's eval lines and the --out JSON have them
        print(f"  {key:<34}{value:.4f}")
    if out is not None:
        atomic_file(out, lambda f: f.write(json.dumps({"checkpoint": str(checkpoint), "step": step, **metrics},
                                                      indent=2).encode() + b"\n"))


def main(argv: list[str] | None = None) -> None:
    overrides, argv = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = Parser(prog="clipup-eval", description=__doc__)
    parser.add_argument("--checkpoint", type=pathlib.Path, required=True, help="checkpoint dir or training workdir")
    parser.add_argument("--config", type=pathlib.Path,
                        help=f"experiment file (or saved {SAVED_CONFIG}) naming the eval data; default: the training "
                             f"workdir's own {SAVED_CONFIG}")
    parser.add_argument("--tokenizer", type=pathlib.Path,
                        help="a tokenizer (bpe .txt.gz, or a dir with vocab.json + merges.txt) instead of the "
                             "checkpoint's, e.g. for one imported without any")
    parser.add_argument("--out", type=pathlib.Path, help="write the metrics as JSON too")
    args = parser.parse_args(argv)
    run_cli("clipup-eval", lambda: _evaluate(args.checkpoint, args.config, overrides, args.tokenizer, args.out))


if __name__ == "__main__":
    main()
