"""clipup-demo: the end-to-end path on data the project makes itself, no download needed.

Trains a BPE tokenizer on generated captions, writes a tiny dense CLIP checkpoint
(random weights) with that tokenizer inside, inspects it, then embeds generated
images and captions through the same code as `clipup-embed` and prints their
similarity matrix. Training (the CLIP-UP demo proper) replaces the random weights
once the trainer lands.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

from clipup_jax.checkpoints.format import load_checkpoint, save_checkpoint
from clipup_jax.checkpoints.params import model_from_params, params_of
from clipup_jax.checkpoints.summary import describe
from clipup_jax.cli.errors import Parser, run_cli
from clipup_jax.config import preset
from clipup_jax.data.bpe_trainer import train_bpe, write_hf_tokenizer
from clipup_jax.data.image_ops import list_images, load_image
from clipup_jax.data.tokenizer import Tokenizer, source_files
from clipup_jax.evaluate.embedding import Embedder, chunks

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")


def _draw(shape: str, colour: str, size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    lo, hi = size // 5, size - size // 5
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=fill)
    elif shape == "square":
        draw.rectangle((lo, lo, hi, hi), fill=fill)
    else:
        draw.polygon([(size // 2, lo), (lo, hi), (hi, hi)], fill=fill)
    return image


def _step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def _demo(workdir: pathlib.Path, force: bool) -> None:
    t0 = time.perf_counter()
    if workdir.exists():
        if not force and any(workdir.iterdir()):
            raise ValueError(f"{workdir}: exists and is not empty (pass --force to start over)")
        shutil.rmtree(workdir)
    (workdir / "images").mkdir(parents=True)

    _step("1/5 generate images and captions")
    pairs = list(itertools.product(SHAPES, COLOURS))
    captions = [f"a {colour} {shape} on a white background" for shape, colour in pairs]
    for i, (shape, colour) in enumerate(pairs):
        _draw(shape, colour).save(workdir / "images" / f"{i:02d}_{colour}_{shape}.png")
    (workdir / "captions.txt").write_text("\n".join(captions) + "\n")
    print(f"{len(pairs)} images in {workdir / 'images'}, captions in {workdir / 'captions.txt'}")

    _step("2/5 train a byte-level BPE tokenizer on the captions")
    corpus = captions + [f"{n} {c} {s}s" for n in ("two", "three", "many") for s in SHAPES for c in COLOURS]
    merges = train_bpe(corpus, num_merges=200)
    tokenizer_dir = write_hf_tokenizer(merges, workdir / "tokenizer")
    tokenizer = Tokenizer.from_path(tokenizer_dir)
    print(f"{len(merges)} merges, vocab {tokenizer.vocab_size}; "
          f"'{captions[0]}' -> {tokenizer.encode(captions[0])}")

    _step("3/5 write a tiny dense CLIP checkpoint (random weights)")
    from flax import nnx  # deferred: jax start-up is the slow part of the demo

    from clipup_jax.models import CLIP

    base = preset("tiny")
    cfg = base.replace(text=dataclasses.replace(base.text, vocab_size=tokenizer.vocab_size))
    checkpoint = workdir / "checkpoint"
    save_checkpoint(checkpoint, cfg, params_of(CLIP(cfg, nnx.Rngs(0))), source={"format": "random-init"},
                    tokenizer_files=source_files(tokenizer_dir))
    print(f"wrote {checkpoint}")

    _step("4/5 inspect it")
    ckpt = load_checkpoint(checkpoint)
    print(describe(ckpt))

    _step("5/5 embed the images and captions, rank captions per image")
    embedder = Embedder(model_from_params(ckpt.config, ckpt.params), batch_size=8)
    paths = list_images([workdir / "images"])
    size = ckpt.config.vision.image_size
    images = embedder.images(chunks(np.stack([load_image(p, size) for p in paths]), 8))
    texts = embedder.texts(chunks(Tokenizer.from_path(ckpt.tokenizer_path)(captions, ckpt.config.text.context_length), 8))
    np.savez(workdir / "embeddings.npz", image_features=images, text_features=texts,
             logit_scale=np.float32(embedder.logit_scale))
    images /= np.linalg.norm(images, axis=-1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=-1, keepdims=True)
    sims = images @ texts.T
    top1 = float(np.mean(np.argmax(sims, axis=1) == np.arange(len(paths))))
    print(f"image features {images.shape}, text features {texts.shape} -> {workdir / 'embeddings.npz'}")
    print(f"image->text recall@1 {top1:.2f} (chance {1 / len(paths):.2f}: these weights are untrained)")
    print(f"\ndone in {time.perf_counter() - t0:.1f}s")


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="clipup-demo", description=__doc__)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("out/demo"))
    parser.add_argument("--force", action="store_true", help="replace a non-empty --workdir")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run_cli("clipup-demo", lambda: _demo(args.workdir, args.force))


if __name__ == "__main__":
    main()
