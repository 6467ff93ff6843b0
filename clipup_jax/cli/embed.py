"""clipup-embed: image and text features of a checkpoint, written to one .npz."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Iterator

import numpy as np

from clipup_jax.checkpoints.format import atomic_file, load_checkpoint
from clipup_jax.checkpoints.params import model_from_params
from clipup_jax.cli.errors import Parser, run_cli
from clipup_jax.data.image_ops import list_images, load_image
from clipup_jax.evaluate.embedding import Embedder, chunks
from clipup_jax.storage import Path, as_path  # every path local or gs://


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="clipup-embed", description=__doc__)
    parser.add_argument("--checkpoint", type=as_path, required=True)
    images = parser.add_mutually_exclusive_group()
    images.add_argument("--pixels", type=as_path, help="float32 (N, H, W, 3) normalised model input, .npy")
    images.add_argument("--images", type=as_path, nargs="+", help="image files and/or directories of images")
    texts = parser.add_mutually_exclusive_group()
    texts.add_argument("--tokens", type=as_path, help="int32 (N, L) token ids, .npy")
    texts.add_argument("--texts", type=as_path, help="text file, one caption per line")
    parser.add_argument("--tokenizer", type=as_path,
                        help="for --texts: a tokenizer (bpe .txt.gz, or a dir with vocab.json + merges.txt) to use "
                             "instead of the checkpoint's, e.g. for one imported without any")
    parser.add_argument("--out", type=as_path, required=True, help="output .npz")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser


def _load_npy(path: Path, what: str, ndim: int) -> np.ndarray:
    try:
        with path.open("rb") as f:  # local or gs://
            array = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read {what} as .npy ({e})") from e
    if array.ndim != ndim:
        raise ValueError(f"{path}: {what} must have {ndim} dimensions, got shape {array.shape}")
    return array


def _captions(path: Path) -> list[str]:
    """One caption per line; a blank line or a table row is a mistake, not a caption."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read captions ({e})") from e
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path}: line {i} is empty; --texts takes one caption per line")
        if "\t" in line:
            raise ValueError(f"{path}: line {i} holds a tab; --texts takes one caption per line, not a table "
                             f"(give the caption column alone)")
    return lines


def _image_batches(paths: list[Path], size: int, batch: int) -> Iterator[np.ndarray]:
    for start in range(0, len(paths), batch):
        yield np.stack([load_image(p, size) for p in paths[start:start + batch]])


def _embed(args: argparse.Namespace) -> None:
    if args.pixels is None and args.images is None and args.tokens is None and args.texts is None:
        raise ValueError("nothing to embed: give --pixels/--images and/or --tokens/--texts")
    if args.out.exists() and not args.force:
        raise ValueError(f"{args.out}: already exists (pass --force to replace it)")
    ckpt = load_checkpoint(args.checkpoint, opt_state=False)
    cfg = ckpt.config
    tokenizer = ckpt.tokenizer(args.tokenizer) if args.texts is not None else None  # before any embedding work
    embedder = Embedder(model_from_params(cfg, ckpt.params, source=str(args.checkpoint)), args.batch_size)
    size = cfg.vision.image_size
    results: dict[str, np.ndarray] = {"logit_scale": np.float32(embedder.logit_scale)}
    t0 = time.perf_counter()
    if args.pixels is not None:
        pixels = _load_npy(args.pixels, "pixels", 4)
        if not np.issubdtype(pixels.dtype, np.floating):
            raise ValueError(f"{args.pixels}: pixels must be float (the normalised model input), got {pixels.dtype}; "
                             f"for image files use --images")
        pixels = pixels.astype(np.float32)
        if pixels.shape[1:] != (size, size, 3):
            raise ValueError(f"{args.pixels}: pixels must be (N, {size}, {size}, 3) for this checkpoint, got {pixels.shape}")
        results["image_features"] = embedder.images(chunks(pixels, args.batch_size))
    elif args.images is not None:
        paths = list_images(args.images)
        results["image_features"] = embedder.images(_image_batches(paths, size, args.batch_size))
        results["image_paths"] = np.array([str(p) for p in paths])
    if args.tokens is not None:
        tokens = _load_npy(args.tokens, "tokens", 2)
        if not np.issubdtype(tokens.dtype, np.integer) or tokens.shape[1] > cfg.text.context_length:
            raise ValueError(f"{args.tokens}: tokens must be integer (N, L<={cfg.text.context_length}), "
                             f"got {tokens.dtype} {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.text.vocab_size):
            raise ValueError(f"{args.tokens}: token ids must be in [0, {cfg.text.vocab_size}), "
                             f"got [{tokens.min()}, {tokens.max()}]")
        results["text_features"] = embedder.texts(chunks(tokens.astype(np.int32), args.batch_size))
    elif args.texts is not None:
        captions = _captions(args.texts)
        tokens = tokenizer(captions, context_length=cfg.text.context_length)
        results["text_features"] = embedder.texts(chunks(tokens, args.batch_size))
    atomic_file(args.out, lambda f: np.savez(f, **results))
    counts = ", ".join(f"{k} {v.shape}" for k, v in results.items() if k.endswith("features"))
    print(f"wrote {args.out}: {counts} in {time.perf_counter() - t0:.1f}s")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    run_cli("clipup-embed", lambda: _embed(args))


if __name__ == "__main__":
    main()
