"""clipup-eval: retrieval (and zero-shot, where the data has labels) of a checkpoint or training workdir.

    clipup-eval --checkpoint runs/clipup_b16 [--config experiments/clipup_b16.py] [--config.data.eval=...] [--out m.json]
    clipup-eval --checkpoint runs/clipup_b16 --task retrieval --dataset mscoco_captions --data-root /data/coco \
        [--out result.json]

The checkpoint's own model config and tokenizer are used (or --tokenizer). Either a config names the eval data
(a training workdir's own saved config.json is the default, so a run is evaluated on what it was evaluated on),
or --task/--dataset/--data-root name one of CLIP_benchmark's sets (`clipup_jax/evaluate/benchmark_sets.py`),
and --out then holds a CLIP_benchmark result record (its keys and metric names).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from clipup_jax.checkpoints.train_workdir import SAVED_CONFIG
from clipup_jax.cli.errors import Parser, run_cli
from clipup_jax.data.image_ops import RESIZE_MODES
from clipup_jax.storage import as_path  # --checkpoint, --tokenizer and --out local or gs://
from clipup_jax.train.configs import load_config, split_overrides

TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}  # CLI name -> CLIP_benchmark's


def _evaluate(args: argparse.Namespace, overrides: list[str]) -> None:
    from clipup_jax.checkpoints.format import atomic_file, load_checkpoint
    from clipup_jax.checkpoints.params import model_from_params
    from clipup_jax.data.sources import make_source
    from clipup_jax.evaluate import benchmark_sets
    from clipup_jax.evaluate.run import eval_data, evaluate
    from clipup_jax.train.run import eval_data_for

    checkpoint = args.checkpoint
    benchmark = None
    if args.dataset is not None:
        if args.config is not None or overrides:
            raise ValueError("--dataset names the eval data; drop --config and --config.* overrides")
        if args.data_root is None or args.task is None:
            raise ValueError("--dataset needs --task (zeroshot or retrieval) and --data-root")
        benchmark = benchmark_sets.find(args.dataset, args.data_root, args.split)
        if TASKS[args.task] != benchmark.task:
            raise ValueError(f"--task {args.task}: {args.dataset} is a {benchmark.task} set")
    elif args.task is not None or args.data_root is not None:
        raise ValueError("--task and --data-root go with --dataset")
    elif args.resize_mode is not None:
        raise ValueError("--resize-mode goes with --dataset; a config names it as --config.data.eval_resize")
    config = None
    if benchmark is None:  # the config first: a typo in it fails before a checkpoint is read
        config_path = args.config
        if config_path is None:
            config_path = checkpoint / SAVED_CONFIG
            if not config_path.is_file():
                raise ValueError(f"--checkpoint {checkpoint}: not a training workdir with a saved {SAVED_CONFIG}; "
                                 "pass --config (an experiment file naming the eval data) or --dataset")
        config = load_config(config_path, overrides)
    ckpt = load_checkpoint(checkpoint, opt_state=False)
    tokenizer = ckpt.tokenizer(args.tokenizer)
    if benchmark is not None:
        data = eval_data(make_source(benchmark.source), tokenizer, zero_shot=benchmark.zero_shot,
                         resize=args.resize_mode or "shortest")
        batch_size, what = args.batch_size, f"{benchmark.name} ({benchmark.source['path']})"
    else:
        data = eval_data_for(config, tokenizer)
        batch_size, what = config.eval_batch_size, f"{config.data.eval} (config {config_path})"
    # The CLIP tokenizer lowercases every caption (OpenAI's clean-up); the resize mode is the eval's choice.
    preprocessing = {"resize_mode": data.resize, "interpolation": "bicubic", "caption_case": "lower"}
    print(f"evaluating on {what}; images: {data.resize} resize, bicubic; captions lowercased", flush=True)
    metrics = evaluate(model_from_params(ckpt.config, ckpt.params, source=str(checkpoint)), data, batch_size,
                       progress=_Progress())
    step = ckpt.metadata.get("step")
    print(f"{checkpoint}{f' (step {step})' if step is not None else ''}, {metrics['eval_images']:.0f} images / "
          f"{metrics['eval_captions']:.0f} captions:")
    for key, value in metrics.items():  # fractions, as the trainer's eval lines and the --out JSON have them
        if not key.startswith("eval_"):
            print(f"  {key:<34}{value:.4f}")
    if out := args.out:
        record = ({"checkpoint": str(checkpoint), "step": step, **metrics} if benchmark is None else
                  benchmark_sets.clip_benchmark_result(benchmark, metrics, str(checkpoint), f"step {step}"))
        record["preprocessing"] = preprocessing
        atomic_file(out, lambda f: f.write(json.dumps(record, indent=2).encode() + b"\n"))


class _Progress:
    """Prints how far the eval set is (about every 5 %), with its rate and ETA."""

    def __init__(self):
        self.started, self.shown = time.perf_counter(), 0

    def __call__(self, done: int, total: int) -> None:
        if done < total and done - self.shown < max(1, total // 20):
            return
        self.shown = done
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (total - done)
        print(f"[eval] {done}/{total} batches, {done / elapsed:.2f} batches/s, ETA {eta:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> None:
    overrides, argv = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = Parser(prog="clipup-eval", description=__doc__)
    parser.add_argument("--checkpoint", type=as_path, required=True, help="checkpoint dir or training workdir")
    parser.add_argument("--config", type=pathlib.Path,
                        help=f"experiment file (or saved {SAVED_CONFIG}) naming the eval data; default: the training "
                             f"workdir's own {SAVED_CONFIG}")
    parser.add_argument("--task", choices=sorted(TASKS), help="with --dataset: zero-shot classification or retrieval")
    parser.add_argument("--dataset", help="a CLIP_benchmark set: imagenet1k, mscoco_captions, flickr30k, flickr8k")
    parser.add_argument("--data-root", type=pathlib.Path, help="with --dataset: the directory holding it")
    parser.add_argument("--split", default="test", help="with --dataset: the Karpathy split (default test)")
    parser.add_argument("--batch-size", type=int, default=64, help="with --dataset: images per batch")
    parser.add_argument("--resize-mode", choices=RESIZE_MODES,
                        help="with --dataset: how images become square: shortest side + centre crop (CLIP's, the "
                             "default), squash, or longest side + padding")
    parser.add_argument("--tokenizer", type=as_path,
                        help="a tokenizer (bpe .txt.gz, or a dir with vocab.json + merges.txt) instead of the "
                             "checkpoint's, e.g. for one imported without any")
    parser.add_argument("--out", type=as_path, help="write the metrics as JSON too")
    args = parser.parse_args(argv)
    run_cli("clipup-eval", lambda: _evaluate(args, overrides))


if __name__ == "__main__":
    main()
