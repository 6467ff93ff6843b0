"""Paths that may be local or on object storage (``gs://bucket/...``): one path type through the code.

A pod's hosts share their run directory through a bucket, so every path a user passes (workdir, checkpoint,
tokenizer, data) is an `etils.epath.Path`, the type Orbax itself takes: local paths behave as `pathlib` ones,
``gs://`` paths go through gcsfs, and Orbax writes its arrays through TensorStore. Emulators are picked up from
the standard variables (``STORAGE_EMULATOR_HOST`` for gcsfs, ``TENSORSTORE_GCS_HTTP_URL`` for TensorStore), so
nothing here names an endpoint.

Object stores differ from a file system in ways the code must respect, and this module is the one place that
knows it: there is no append (an object is written whole, when its writer closes), no lock that dies with its
holder (`ConditionalObject`), and ``resolve()`` would turn ``gs://b/x`` into a local path under the working
directory. And gcsfs caches directory listings, by default forever, per process: a pod's hosts, a relaunch and
an evaluator all write and read one run directory, so a cached listing would hide the others' steps. Listings
are not cached (an explicit ``FSSPEC_GCS_USE_LISTINGS_CACHE`` is the user's choice and kept).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import threading
import urllib.parse
from typing import IO, Callable, Iterator, Sequence

from etils import epath

Path = epath.Path
PathLike = str | os.PathLike

try:
    import fsspec.config

    for _protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)
except ImportError:  # no gcs extra: local paths only
    pass


_MANGLED_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):/(?!/)")


def as_path(path: PathLike) -> epath.Path:
    """`path` (a local path or a URL such as ``gs://bucket/run``) as the project's path type. A URL that went
    through `pathlib.Path` on the way (``gs:/bucket/run``: its ``//`` collapsed) is refused, naming it: taken
    for a local path, it would write a run into a local ``./gs:`` directory without a word."""
    mangled = _MANGLED_URL.match(os.fspath(path))
    if mangled:
        url = f"{mangled.group(1)}://{os.fspath(path)[mangled.end():]}"
        raise ValueError(f"{url}: reached here as {os.fspath(path)!r} (pathlib.Path collapses the '//' of a URL), "
                         "so the option or code that passed it takes local paths only")
    return epath.Path(path)


def absolute(path: PathLike) -> epath.Path:
    """A local path made absolute (Orbax requires it), a URL as it is (`resolve` would make it a local path)."""
    path = epath.Path(path)
    return path if is_remote(path) else path.resolve()


def is_remote(path: PathLike) -> bool:
    """Whether `path` names an object in a store (it has a URL scheme) rather than a local file."""
    return "://" in os.fspath(path)


def files_under(directory: PathLike) -> list[epath.Path]:
    """Every file below `directory`, at any depth (an object store's objects under a prefix)."""
    found, pending = [], [as_path(directory)]
    while pending:  # iterdir level by level: epath refuses `**` globs (a recursive glob is many requests on GCS)
        for p in pending.pop().iterdir():
            (pending if p.is_dir() else found).append(p)
    return sorted(found)


def copy_tree(src: PathLike, dst: PathLike, last: Sequence[str] = ()) -> None:
    """Copies every file below `src` to the same place below `dst`, those named in `last` (relative paths) after
    all others: on an object store, where a directory cannot be renamed into place, a reader that checks for a
    `last` file (a checkpoint's metadata) never sees a partial copy."""
    src, dst = as_path(src), as_path(dst)
    files = [(f, os.fspath(f.relative_to(src))) for f in files_under(src)]
    for f, rel in sorted(files, key=lambda item: item[1] in last):
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        f.copy(target, overwrite=True)


@contextlib.contextmanager
def local_copy(path: PathLike, siblings: Sequence[str] = ()) -> Iterator[epath.Path]:
    """`path` as a local file or directory for the block: itself when local; else downloaded into a temporary
    directory (with the `siblings` beside it that exist), removed after. For readers that need a real file
    (memory maps, torch.load); the download costs local disk the size of `path`."""
    path = as_path(path)
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="clipup-download-") as tmp:
        local = epath.Path(tmp) / path.name
        if path.is_dir():
            copy_tree(path, local)
        else:
            for name in (path.name, *siblings):
                if (path.parent / name).is_file():
                    (path.parent / name).copy(local.parent / name)
        yield local


ENV_CACHE = "CLIPUP_CACHE_DIR"


def cache_directory() -> epath.Path:
    """Where `staged` keeps its local copies: ``CLIPUP_CACHE_DIR``, else ``$XDG_CACHE_HOME/clipup`` (``~/.cache``)."""
    if os.environ.get(ENV_CACHE):
        return epath.Path(os.environ[ENV_CACHE])
    return epath.Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "clipup"


def staged(path: PathLike) -> epath.Path:
    """`path` as a local file for a reader that takes local files only (array_record): itself when local; else a
    copy in `cache_directory()/staged`, downloaded whole on first use (not streaming: it costs local disk the
    file's size) and reused while the object is unchanged (the copy's name carries its generation). Processes
    sharing the cache each download to a name of their own and rename it into place, so none reads a partial copy."""
    import fsspec

    path = as_path(path)
    if not is_remote(path):
        return path
    fs, name = fsspec.core.url_to_fs(os.fspath(path))
    info = fs.info(name)
    version = info.get("generation") or info.get("md5Hash") or info.get("etag") or info.get("size")
    key = hashlib.sha256(f"{path}\n{version}".encode()).hexdigest()[:16]
    local = cache_directory() / "staged" / f"{key}-{path.name}"
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f"{local.name}.partial-{os.getpid()}-{threading.get_ident()}")
        try:
            fs.get_file(name, os.fspath(partial))
            os.replace(partial, local)
        finally:
            partial.unlink(missing_ok=True)
    return local


def remove_tree(path: PathLike) -> None:
    """Deletes a file or directory tree (every object under a prefix), if there."""
    path = as_path(path)
    if not is_remote(path) and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.is_dir():
        path.rmtree(missing_ok=True)
    elif path.exists():
        path.unlink(missing_ok=True)


class RangeReader:
    """Byte ranges of one file, from any thread: `os.pread` locally; on an object store one ranged request of
    exactly those bytes (a buffered file object would fetch a whole read-ahead block per random read). Pickles
    without its file descriptor, so each worker process of a data pipeline opens its own."""

    def __init__(self, path: PathLike) -> None:
        self.path = as_path(path)
        self._remote = is_remote(self.path)
        self._fd: int | None = None
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        if self._remote:
            import fsspec

            fs, name = fsspec.core.url_to_fs(os.fspath(self.path))  # the cached filesystem instance
            return fs.cat_file(name, start=offset, end=offset + size)
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self._fd, size, offset)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)


class LineLog:
    """A text file written line by line and read back whole: `metrics.jsonl`.

    Locally it is a file opened for append, flushed per line, so a kill loses nothing logged. On an object store
    the file is rewritten whole at each `flush()` (the trainer flushes when it checkpoints and when it closes):
    a kill loses the lines since the last checkpoint, which the relaunch logs again from that checkpoint.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = as_path(path)
        self._remote = is_remote(self.path)
        self._lines: list[str] = []
        if self._remote:
            self._earlier = self.path.read_text() if self.path.exists() else ""
            self.run_start = len(self._earlier)
            self._file: IO[str] | None = None
        else:
            self._file = open(self.path, "a")
            self.run_start = self._file.tell()

    def write(self, line: str) -> None:
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            self._lines.append(line + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        elif self._remote:
            self.path.write_text(self._earlier + "".join(self._lines))

    def this_run(self) -> list[str]:
        """The lines written since this log was opened (open or closed)."""
        if self._remote:
            return "".join(self._lines).splitlines()
        if self._file is not None:
            self._file.flush()
        with open(self.path) as f:
            f.seek(self.run_start)
            return f.read().splitlines()

    def close(self, flush: bool = True) -> None:
        """Flushes (on an object store: writes the file whole, again if closed twice; `flush=False`: what is
        unwritten stays so) and closes."""
        if flush:
            self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


class PartLog:
    """Bytes appended over a run, durable at each `flush()`: TensorBoard's event records.

    Locally one file, `name(0)`, opened for append. On an object store, which has no append (gcsfs turns mode
    'a' into an overwrite: TensorBoard's own writer kept only its last record there), each flush writes what came
    since the last one as a new object `name(part)`: readers that take a directory's files in name
    order (TensorBoard) see one stream, and no flush rewrites or holds more than its own records.
    """

    def __init__(self, directory: PathLike, name: Callable[[int], str]) -> None:
        self.directory, self._name = as_path(directory), name
        self._part, self._pending = 0, bytearray()
        self._file: IO[bytes] | None = None
        if not is_remote(self.directory):
            self._file = open(self.directory / name(0), "ab", buffering=0)  # each record on disk as written

    def write(self, data: bytes) -> None:
        if self._file is not None:
            self._file.write(data)
        else:
            self._pending += data

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        elif self._pending:
            (self.directory / self._name(self._part)).write_bytes(bytes(self._pending))
            self._part, self._pending = self._part + 1, bytearray()

    def close(self, flush: bool = True) -> None:
        if flush:
            self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


class ConditionalObject:
    """One object on GCS, written only on a condition of its generation (google-cloud-storage's preconditions):
    of two writers racing, exactly one wins. An object store has no lock that dies with its holder, so a lease
    on one is built from these (`clipup_jax.train.lease`). Each call is one request, `timeout_s` at most, without
    the client's own retries (up to 2 minutes): the caller decides what to retry."""

    timeout_s = 10.0

    def __init__(self, path: PathLike) -> None:
        from google.cloud import storage as gcs  # with gcsfs (the gcs extra); STORAGE_EMULATOR_HOST is honoured

        self.path = as_path(path)
        url = urllib.parse.urlsplit(os.fspath(self.path))
        if url.scheme != "gs":
            raise ValueError(f"{self.path}: conditional writes need a gs:// path")
        self._blob = gcs.Client().bucket(url.netloc).blob(url.path.lstrip("/"))

    def read(self) -> tuple[bytes, int] | None:
        """(contents, generation), or None when there is no such object."""
        from google.api_core import exceptions

        try:
            return self._blob.download_as_bytes(retry=None, timeout=self.timeout_s), self._blob.generation
        except exceptions.NotFound:
            return None

    def write(self, data: bytes, generation: int) -> int | None:
        """Writes `data` if the object's generation is still `generation` (0: if there is no object); its new
        generation, or None when another writer changed it first."""
        from google.api_core import exceptions

        try:
            self._blob.upload_from_string(data, if_generation_match=generation, retry=None, timeout=self.timeout_s)
        except exceptions.PreconditionFailed:
            return None
        return self._blob.generation

    def delete(self, generation: int) -> bool:
        """Deletes the object if its generation is still `generation`; whether it did."""
        from google.api_core import exceptions

        try:
            self._blob.delete(if_generation_match=generation, retry=None, timeout=self.timeout_s)
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            return False
        return True
