"""The malloc arena cap of the training entry points: it binds (counted with glibc's own malloc_info), it yields
to the user's MALLOC_ARENA_MAX, and the entry points start no thread before setting it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="malloc arenas are glibc's")

# Counts glibc heaps (main arena + thread arenas) after threads that allocate concurrently, with jax started.
PROGRAM = """
import ctypes, os, sys, tempfile, threading
from clipup_jax.workarounds import cap_malloc_arenas
print(cap_malloc_arenas())
import jax.numpy as jnp
libc = ctypes.CDLL("libc.so.6")
libc.fdopen.restype = ctypes.c_void_p
libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
def work():
    for _ in range(3000):
        bytearray(32768)
threads = [threading.Thread(target=work) for _ in range(12)]
[t.start() for t in threads]
[t.join() for t in threads]
jnp.ones((64, 64)).sum().block_until_ready()
with tempfile.TemporaryFile() as f:
    stream = libc.fdopen(os.dup(f.fileno()), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    f.seek(0)
    print("arenas", f.read().decode().count("<heap nr="))
"""


def _run(env_update: dict[str, str]) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", PROGRAM], env={**env, "JAX_PLATFORMS": "cpu", **env_update},
                         capture_output=True, text=True, timeout=600, check=True).stdout.splitlines()
    return out[0], int(out[-1].split()[1])


def test_cap_binds_arenas_created_afterwards():
    message, arenas = _run({})
    assert message == "malloc arenas: capped at 2 (set MALLOC_ARENA_MAX to choose)"
    assert arenas <= 2


def test_users_malloc_arena_max_wins():
    message, arenas = _run({"MALLOC_ARENA_MAX": "3"})
    assert message == "malloc arenas: MALLOC_ARENA_MAX=3 (from the environment)"
    assert arenas <= 3


def test_entry_points_start_no_thread_before_the_cap():
    # clipup-train and clipup-sweep (the long jobs) call cap_malloc_arenas() first in main(); what their imports
    # started would escape the cap. (clipup-demo runs minutes: it keeps glibc's faster default.)
    code = ("import threading, clipup_jax.cli.train, clipup_jax.cli.sweep; "
            "print(threading.active_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    assert out.stdout.strip() == "1"
