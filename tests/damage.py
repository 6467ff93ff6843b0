"""Disk trouble for the fallback tests: an Orbax checkpoint whose array data is cut short."""

from __future__ import annotations

import pathlib


def truncate_array_data(directory: pathlib.Path) -> list[pathlib.Path]:
    """Cuts every array data file (OCDBT's `d/` files) under `directory` to a third; returns them, so a caller
    can check that something was damaged."""
    files = [p for p in directory.rglob("*") if p.is_file() and p.stat().st_size > 64 and "d" in p.parts]
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    return files
