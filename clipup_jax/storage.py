"""Paths that may be local or on object storage (``gs://bucket/...``): one path type through the code.

A pod's hosts share their run directory through a bucket, so every path a user passes (workdir, checkpoint,
tokenizer, data) is an `etils.epath.Path`, the type Orbax itself takes: local paths behave as `pathlib` ones,
``gs://`` paths go through gcsfs, and Orbax writes its arrays through TensorStore. Emulators are picked up from
the standard variables (``STORAGE_EMULATOR_HOST`` for gcsfs, ``TENSORSTORE_GCS_HTTP_URL`` for TensorStore), so
nothing here names an endpoint.

Object stores differ from a file system in two ways the code must respect, and this module is the one place
that knows it: there is no append (an object is written whole, when its writer closes), and ``resolve()`` would
turn ``gs://b/x`` into a local path under the working directory.
"""

from __future__ import annotations

import os
from typing import IO

from etils import epath

Path = epath.Path
PathLike = str | os.PathLike


def as_path(path: PathLike) -> epath.Path:
    """`path` (a local path or a URL such as ``gs://bucket/run``) as the project's path type."""
    return epath.Path(path)


def absolute(path: PathLike) -> epath.Path:
    """A local path made absolute (Orbax requires it), a URL as it is (`resolve` would make it a local path)."""
    path = epath.Path(path)
    return path if is_remote(path) else path.resolve()


def is_remote(path: PathLike) -> bool:
    """Whether `path` names an object in a store (it has a URL scheme) rather than a local file."""
    return "://" in os.fspath(path)


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

    def close(self) -> None:
        """Flushes (on an object store: writes the file whole, again if closed twice) and closes."""
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
