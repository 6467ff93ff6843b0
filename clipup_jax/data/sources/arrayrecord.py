"""ArrayRecord shards of (image bytes, captions): the on-disk format, its reader and its writer.

Each record is one msgpack map (msgpack: language-neutral, compact for binary, and already a dependency through
flax) ``{"v": 1, "key": str, "image": bin, "captions": [str | bin, ...]}``: the image file's bytes untouched and
all captions of the image (a caption that is not UTF-8 is kept as ``bin`` so the pipeline can skip and count it).
Shards are ``data-SSSSS-of-NNNNN.array_record`` written with ``group_size:1`` (one record per chunk: the fastest
random access), beside a ``metadata.json`` naming the format, the record count and the shards.

Shards on gs:// are read from local copies (`storage.staged`: downloaded whole when the source opens, kept in
the local cache and reused by later runs): array_record's reader takes local files only (given a gs:// path,
array_record 0.8.6 hung on the emulator). Not streaming, then: a data set on a bucket costs its size in local disk.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Iterable, Sequence

import msgpack

from clipup_jax.data.sources.paths import resolve_files
from clipup_jax.data.sources.records import record
from clipup_jax.storage import as_path, staged

FORMAT = "clipup-image-text"
FORMAT_VERSION = 1
SHARD_SUFFIX = ".array_record"
METADATA_FILE = "metadata.json"
WRITER_OPTIONS = "group_size:1"


def encode_record(image: bytes, captions: Sequence[str | bytes], key: str) -> bytes:
    """One shard record (see module doc)."""
    return msgpack.packb({"v": FORMAT_VERSION, "key": key, "image": bytes(image), "captions": list(captions)},
                         use_bin_type=True)


def decode_record(raw: bytes) -> dict:
    """The pipeline record for one stored record; a record from a newer format version is refused, not misread."""
    data = msgpack.unpackb(raw, raw=False)
    if not isinstance(data, dict) or data.get("v") != FORMAT_VERSION:
        version = data.get("v") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} record (got version {version!r})")
    return record(data["image"], tuple(data["captions"]), data["key"])


def shard_paths(pattern: str) -> list[str]:
    """A directory (all its shards), a glob or a brace pattern of shard files."""
    directory = as_path(os.path.expanduser(pattern))
    if directory.is_dir():
        pattern = os.fspath(directory / ("*" + SHARD_SUFFIX))
    return resolve_files(pattern, "ArrayRecord shards")


class ArrayRecordSource:
    """``len``/``getitem`` over the records of all shards (local, or on gs:// staged locally), decoded to pipeline
    records."""

    def __init__(self, shards: Sequence[str]) -> None:
        import grain  # heavy import deferred so the CLI writer starts fast

        if not shards:
            raise ValueError("ArrayRecord source: no shards given")
        self._shards = [os.fspath(s) for s in shards]
        self._records = grain.sources.ArrayRecordDataSource([os.fspath(staged(s)) for s in shards])

    @classmethod
    def from_pattern(cls, pattern: str) -> ArrayRecordSource:
        return cls(shard_paths(pattern))

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return decode_record(self._records[int(index)])

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self._shards)} shards, {len(self)} records)"


def write_shards(records: Iterable[tuple[str, bytes, Sequence[str | bytes]]], directory: pathlib.Path,
                 num_records: int, shard_size: int) -> list[pathlib.Path]:
    """Write ``(key, image bytes, captions)`` in order into ``ceil(num_records / shard_size)`` shards + metadata.

    ``num_records`` is needed up front because shard names carry the shard count; fewer or more records than
    announced is an error (a caller bug), not a silently mislabelled data set.
    """
    from array_record.python import array_record_module

    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if num_records < 1:
        raise ValueError("no records to write")
    num_shards = math.ceil(num_records / shard_size)
    paths = [directory / f"data-{s:05d}-of-{num_shards:05d}{SHARD_SUFFIX}" for s in range(num_shards)]
    written = 0
    writer = None
    try:
        for key, image, captions in records:
            if written % shard_size == 0:
                if writer is not None:
                    writer.close()
                if written // shard_size >= num_shards:
                    raise ValueError(f"more records than the {num_records} announced")
                writer = array_record_module.ArrayRecordWriter(str(paths[written // shard_size]), WRITER_OPTIONS)
            writer.write(encode_record(image, captions, key))
            written += 1
    finally:
        if writer is not None:
            writer.close()
    if written != num_records:
        raise ValueError(f"wrote {written} records, {num_records} announced")
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "num_records": num_records,
                "shard_size": shard_size, "shards": [p.name for p in paths]}
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return paths
