"""Random access into webdataset tar shards as img2dataset writes them (``00000.tar``: ``000000001.jpg`` + ``.txt``).

Each shard is indexed once at construction (member name, data offset, size: one pass over the tar headers, no
image bytes read), so ``source[i]`` is two ranged reads (``os.pread`` locally; on gs://, two range requests
through `storage.RangeReader`). This gives webdataset data what its streaming
readers lack: global shuffling, per-process slicing and an exactly resumable position. Only uncompressed tars are
accepted; gzip has no random access.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import os
import posixpath
import tarfile
from collections.abc import Sequence

import numpy as np

from clipup_jax.data.sources.paths import resolve_files
from clipup_jax.data.sources.records import record
from clipup_jax.storage import RangeReader, as_path

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
_MISSING = -1


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the base name, the rest is the extension."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def index_tar(path: str) -> tuple[list[str], np.ndarray]:
    """Keys in tar order and an int64 ``(n, 4)`` table: image offset, image size, caption offset, caption size.

    A sample lacking its image or caption keeps ``-1`` there; the pipeline skips and counts it like a corrupt image,
    so incomplete samples show up in the same counter instead of vanishing at index time.
    """
    rows: dict[str, list[int]] = {}
    try:
        with as_path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:  # local or gs://
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member(member.name)
                if ext in IMAGE_EXTENSIONS:
                    col = 0
                elif ext == CAPTION_EXTENSION:
                    col = 2
                else:
                    continue
                row = rows.setdefault(key, [_MISSING] * 4)
                if row[col] == _MISSING:  # a second image of one key (jpg + png) keeps the first, like webdataset
                    row[col:col + 2] = member.offset_data, member.size
    except tarfile.ReadError as e:
        raise ValueError(f"{path}: not an uncompressed tar shard ({e}); compressed shards have no random access") from e
    table = np.array(list(rows.values()), np.int64).reshape(-1, 4)
    return list(rows), table


class WebDatasetSource:
    """``len``/``getitem`` over the samples of all shards, in shard order then tar order."""

    def __init__(self, shards: Sequence[str], *, index_threads: int = 16) -> None:
        if not shards:
            raise ValueError("webdataset source: no shards given")
        self._shards = [os.fspath(s) for s in shards]
        with concurrent.futures.ThreadPoolExecutor(max(1, min(index_threads, len(self._shards)))) as pool:
            indexed = list(pool.map(index_tar, self._shards))
        self._keys = np.array([k.encode("utf-8", "surrogateescape") for keys, _ in indexed for k in keys], dtype=bytes)
        self._table = np.concatenate([table for _, table in indexed])
        self._starts = np.cumsum([0] + [len(keys) for keys, _ in indexed]).tolist()
        self._readers = [RangeReader(s) for s in self._shards]

    @classmethod
    def from_pattern(cls, pattern: str, *, index_threads: int = 16) -> WebDatasetSource:
        """``/data/{00000..00099}.tar`` or ``/data/*.tar``: every named shard must exist."""
        return cls(resolve_files(pattern, "webdataset shards"), index_threads=index_threads)

    def __len__(self) -> int:
        return len(self._table)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if offset == _MISSING:
            return b""
        data = self._readers[shard].read(offset, size)
        if len(data) != size:
            raise OSError(f"{self._shards[shard]}: short read at offset {offset} (shard changed since indexing?)")
        return data

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self._table):
            raise IndexError(f"index {index} out of range for {len(self._table)} samples")
        shard = bisect.bisect_right(self._starts, index) - 1
        image_off, image_size, text_off, text_size = self._table[index].tolist()
        key = self._keys[index].decode("utf-8", "surrogateescape")
        return record(self._read(shard, image_off, image_size), (self._read(shard, text_off, text_size),),
                      f"{posixpath.basename(self._shards[shard])}/{key}")

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self._shards)} shards, {len(self)} samples)"
