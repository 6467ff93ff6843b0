"""Shard path patterns: brace ranges (``{00000..00009}``, as img2dataset/webdataset users write them) and globs,
local or on gs:// (there a glob in the file name only)."""

from __future__ import annotations

import glob
import os
import re

from clipup_jax.storage import as_path, is_remote

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = frozenset("*?[")


def expand_braces(pattern: str) -> list[str]:
    """All strings a shell-style brace pattern names, in order: ``{a,b}`` lists and ``{00..09}`` zero-padded ranges."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        lo, hi = numeric.groups()
        step = 1 if int(hi) >= int(lo) else -1
        width = len(lo) if lo.lstrip("-").startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # a literal '{x}' names itself, like bash
        head, tail = pattern[: match.end()], pattern[match.end():]
        return [head + rest for rest in expand_braces(tail)]
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [out for option in options for out in expand_braces(head + option + tail)]


def resolve_files(pattern: str, what: str) -> list[str]:
    """Existing files a pattern names (braces first, then globs, each glob sorted); a clear error if any is missing.

    A named file that does not exist is an error even when others do: a silently shorter shard list would change
    the data a run trains on.
    """
    if not pattern:
        raise ValueError(f"no {what} path given")
    files: list[str] = []
    for part in expand_braces(os.path.expanduser(pattern)):
        if is_remote(part):  # gs://: a glob only in the last component (one listing, not a recursive walk)
            found = _remote_files(part)
            if not found:
                raise FileNotFoundError(f"{what}: {'no files match' if _GLOB_CHARS & set(part) else 'no such file'} "
                                        f"{part!r}")
            files.extend(found)
        elif _GLOB_CHARS & set(part):
            matched = sorted(p for p in glob.glob(part) if os.path.isfile(p))
            if not matched:
                raise FileNotFoundError(f"{what}: no files match {part!r}")
            files.extend(matched)
        elif os.path.isfile(part):
            files.append(part)
        else:
            origin = "" if part == pattern else f" (from {pattern!r})"
            raise FileNotFoundError(f"{what}: {part} does not exist{origin}")
    return files


def _remote_files(part: str) -> list[str]:
    path = as_path(part)
    if _GLOB_CHARS & set(path.name) and not _GLOB_CHARS & set(os.fspath(path.parent)):
        return sorted(os.fspath(p) for p in path.parent.glob(path.name) if p.is_file())
    return [part] if path.is_file() else []
