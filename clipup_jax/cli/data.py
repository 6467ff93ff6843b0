"""clipup-data: build ArrayRecord image-text shards (``arrayrecord:`` sources) from a folder and a captions file.

    clipup-data write --images DIR --captions FILE.(tsv|csv|txt) --out DIR [--shard-size N] [--force]

``.tsv``/``.csv``: (path, caption) rows, paths relative to ``--images`` (header optional; several rows of one
image become one record with all its captions). ``.txt``: one caption per line, matched in order to the images
directly inside ``--images`` sorted by name. Image bytes are stored untouched (corrupt ones are skipped and counted
by the pipeline at read time). The output appears atomically: written to a hidden sibling, then renamed.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Iterator

from clipup_jax.checkpoints.format import atomic_directory, check_output
from clipup_jax.cli.errors import Parser, run_cli
from clipup_jax.data.image_ops import list_images
from clipup_jax.data.sources.arrayrecord import write_shards
from clipup_jax.data.sources.captions_table import group_rows, read_table
from clipup_jax.data.sources.records import caption_text

Entry = tuple[pathlib.Path, str, tuple[str | bytes, ...]]  # image file, key, captions


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="clipup-data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    write = commands.add_parser("write", help="build ArrayRecord shards from images + captions",
                                description=__doc__)
    write.add_argument("--images", type=pathlib.Path, required=True, help="folder holding the images")
    write.add_argument("--captions", type=pathlib.Path, required=True, help=".tsv/.csv (path, caption) or .txt")
    write.add_argument("--out", type=pathlib.Path, required=True, help="output folder (must not exist)")
    write.add_argument("--shard-size", type=int, default=10_000, help="records per shard (default 10000)")
    write.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser


def _table_entries(images: pathlib.Path, captions: pathlib.Path) -> list[Entry]:
    entries = []
    for rel, texts, line in group_rows(read_table(captions)):
        path = images / rel
        if not path.is_file():
            raise FileNotFoundError(f"{captions}: line {line}: image {rel} does not exist in {images}")
        entries.append((path, pathlib.PurePath(rel).as_posix(), texts))
    return entries


def _text_entries(images: pathlib.Path, captions: pathlib.Path) -> list[Entry]:
    lines = captions.read_bytes().removeprefix(b"\xef\xbb\xbf").splitlines()
    files = list_images([images])
    if len(lines) != len(files):
        raise ValueError(f"{captions}: {len(lines)} caption lines for {len(files)} images in {images} "
                         "(a .txt captions file holds one line per image, in sorted file-name order)")
    return [(f, f.name, (caption_text(line.strip()),)) for f, line in zip(files, lines)]


def _entries(images: pathlib.Path, captions: pathlib.Path) -> list[Entry]:
    """Every (image, captions) pair, checked before anything is written so a bad input leaves no output."""
    if not images.is_dir():
        raise FileNotFoundError(f"--images {images}: no such directory")
    if not captions.is_file():
        raise FileNotFoundError(f"--captions {captions}: no such file")
    suffix = captions.suffix.lower()
    if suffix == ".txt":
        return _text_entries(images, captions)
    if suffix in (".tsv", ".csv"):
        return _table_entries(images, captions)
    raise ValueError(f"--captions {captions}: must be .tsv, .csv or .txt, got {suffix or 'no suffix'!r}")


def _records(entries: list[Entry]) -> Iterator[tuple[str, bytes, tuple[str | bytes, ...]]]:
    for path, key, captions in entries:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise FileNotFoundError(f"{path}: cannot read ({e.strerror or e})") from e
        yield key, data, captions


def _write(args: argparse.Namespace) -> None:
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    check_output(args.out, args.force)
    entries = _entries(args.images, args.captions)
    t0 = time.perf_counter()
    shards: list[pathlib.Path] = []
    atomic_directory(args.out, args.force,
                     lambda tmp: shards.extend(write_shards(_records(entries), tmp, len(entries), args.shard_size)))
    num_captions = sum(len(c) for _, _, c in entries)
    print(f"wrote {args.out}: {len(entries)} images, {num_captions} captions in {len(shards)} shard(s) "
          f"in {time.perf_counter() - t0:.1f}s")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    run_cli("clipup-data", lambda: _write(args))


if __name__ == "__main__":
    main()
