"""Flat host memory for long runs: cap glibc's malloc arenas before the first thread starts.

glibc gives a thread that finds the heap busy an arena of its own, up to 8 per core. XLA's, TensorStore's,
Orbax's and grain's threads then spread short-lived buffers over all of them, and fragmented arenas are seldom
returned to the OS: the soak's training process (benchmarks/soak.py, checkpoint every 10 steps, eval every 25)
grew ~7 MiB per 1,000 steps with glibc's default and ~1 with 2 arenas. The cap binds only arenas created after
it, so the long-running entry points (clipup-train, clipup-sweep) set it first thing, while the process has one
thread. The price is malloc contention between threads: on CPU a tiny model's step rate drops ~15-20 %
(benchmarks/host_memory.py); set `MALLOC_ARENA_MAX` to choose otherwise. An explicit `MALLOC_ARENA_MAX`, or
tcmalloc / jemalloc preloaded, is the user's choice and is left alone.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading

DEFAULT_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (musl and macOS have neither arenas to cap nor malloc_trim)."""
    try:
        libc = ctypes.CDLL(None)  # symbols already loaded: no library search, no subprocess
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def cap_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> str:
    """Caps glibc's arena count at `arenas` unless the user chose an allocator setting; says what it did."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return f"malloc arenas: MALLOC_ARENA_MAX={os.environ['MALLOC_ARENA_MAX']} (from the environment)"
    preloaded = os.environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preloaded or "jemalloc" in preloaded:
        return "malloc arenas: left to the preloaded allocator"
    libc = _glibc()
    if libc is None:
        return "malloc arenas: not glibc, left alone"
    if threading.active_count() > 1:  # arenas may exist already; the cap would be partial, and misleading
        return f"malloc arenas: not capped ({threading.active_count()} threads already running)"
    if libc.mallopt(_M_ARENA_MAX, arenas) != 1:
        return "malloc arenas: mallopt refused the cap"
    return f"malloc arenas: capped at {arenas} (set MALLOC_ARENA_MAX to choose)"


def release_free_memory() -> None:
    """Hands freed heap pages in every arena back to the OS (glibc `malloc_trim`; ~0.1 ms; elsewhere a no-op)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
