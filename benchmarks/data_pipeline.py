"""Input-pipeline throughput: examples/s of the train and eval pipelines, 256px JPEGs -> 224px, tokenisation included.

Run from the repo root: ``python -m benchmarks.data_pipeline [--images 1024] [--batches 24] [--workers 0 2]``.
Images are smooth gradients plus noise (JPEG sizes close to photos'), written as ArrayRecord shards, so the numbers
include reading records, JPEG decode, random-resized-crop (or resize + centre crop), normalisation, BPE
tokenisation and batching. The first batch (worker start-up, caches) is timed separately.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import random
import tempfile
import time

import numpy as np
from PIL import Image

from clipup_jax.data.bpe_trainer import train_bpe, write_hf_tokenizer
from clipup_jax.data.pipeline import eval_pipeline, train_pipeline
from clipup_jax.data.sources import make_source
from clipup_jax.data.sources.arrayrecord import write_shards
from clipup_jax.data.tokenizer import Tokenizer

WORDS = ("a an the of on in with and near two three man woman dog cat car street red blue green small large old young "
         "sitting standing holding riding walking table kitchen bus train pizza plate grass field water snow").split()


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, (x + y) / 2], -1) * rng.uniform(80, 255, 3) + rng.normal(0, 12, (size, size, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def _captions(rnd: random.Random) -> tuple[str, ...]:
    return tuple(" ".join(rnd.choices(WORDS, k=rnd.randint(8, 16))) for _ in range(5))


def _measure(ds, batches: int, batch_size: int) -> tuple[float, float]:
    """(seconds to the first batch, examples/s over the next ``batches``)."""
    t0 = time.perf_counter()
    it = iter(ds)
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch_size / (time.perf_counter() - t1)
    if hasattr(it, "close"):
        it.close()
    return first, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--read-threads", type=int, default=None, help="default: CPUs / processes")
    args = parser.parse_args()

    rng, rnd = np.random.default_rng(0), random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        records = [(f"{i:06d}.jpg", _jpeg(rng, 256), _captions(rnd)) for i in range(args.images)]
        write_shards(iter(records), root, len(records), shard_size=256)
        mean_kb = np.mean([len(r[1]) for r in records]) / 1024
        tokenizer = Tokenizer.from_path(write_hf_tokenizer(train_bpe([c for r in records for c in r[2]], 2000),
                                                           root / "tok"))
        source = make_source(f"arrayrecord:{root}")
        common = dict(tokenizer=tokenizer, image_size=224, context_length=77, batch_size=args.batch_size,
                      read_threads=args.read_threads)
        print(f"{args.images} JPEGs 256x256 (mean {mean_kb:.1f} KiB), 5 captions each, batch {args.batch_size}, "
              f"224px, L=77, {os.cpu_count()} CPUs, read_threads={args.read_threads or 'auto'}")
        print("| pipeline | num_workers | first batch (s) | examples/s |\n|---|---:|---:|---:|")
        for workers in args.workers:
            first, rate = _measure(train_pipeline(source, seed=0, num_workers=workers, **common),
                                   args.batches, args.batch_size)
            print(f"| train (random-resized-crop) | {workers} | {first:.2f} | {rate:.0f} |", flush=True)
        for workers in args.workers:
            n = args.images // args.batch_size - 1  # one pass over the data
            first, rate = _measure(eval_pipeline(source, num_workers=workers, **common), n, args.batch_size)
            print(f"| eval (resize + centre crop, 5 captions) | {workers} | {first:.2f} | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
