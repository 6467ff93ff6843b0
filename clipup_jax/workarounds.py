"""Work-arounds for upstream problems, all here, each naming its problem; `tests/test_workarounds.py` fails when one
stops working or is no longer needed (the library was fixed: delete the work-around).

`apply()` installs the ones that cost nothing (idempotent); every CLI calls it on entry (`cli.errors.run_cli`), and
so does `train()` for programs that call the library directly. The malloc arena cap has a price and must come
before the first thread, so only the long-running entry points (clipup-train, clipup-sweep) call
`cap_malloc_arenas()`, first thing.

1. **TensorStore `Spec.to_json()` leaks** (tensorstore 0.1.78-0.1.86 at least): each call leaves one reference too
   many on every key and value of the dict it returns, about 60 bytes per JSON scalar. Orbax calls it once or
   twice per array per save (`KvStore.Spec(...).to_json()` for each array's OCDBT spec, `Spec.to_json()` for its
   Zarr metadata), so a long run's host memory grew with every checkpoint (`benchmarks/soak.py`). `repr()` of the
   same spec renders the same JSON as a Python literal and does not leak, so `to_json()` with no arguments is
   answered from it; the plug goes in only where a probe finds the leak.
2. **grain reads absl flags when it starts worker processes** (grain <= 0.2.18, google/grain#1355, fixed upstream
   by #1362) and raises `UnparsedFlagAccessError` in programs that do not run `absl.app`: the flags are marked
   parsed, so every one keeps its default.
3. **glibc's per-thread malloc arenas fragment** (sourceware bug 11261): a thread that finds the heap busy gets an
   arena of its own, up to 8 per core; XLA's, TensorStore's, Orbax's and grain's threads spread short-lived
   buffers over all of them, and fragmented arenas are seldom returned to the OS (the soak's training process
   grew several MiB per 1,000 steps with glibc's default). The cap binds only arenas created after it. Its price
   is malloc contention between threads (`benchmarks/host_memory.py`); an explicit `MALLOC_ARENA_MAX`, or
   tcmalloc / jemalloc preloaded, is the user's choice and is left alone. `release_free_memory()` hands freed
   pages back after a save or an eval.
4. **A failed save's threads outlive it** (orbax-checkpoint 0.12.8, tensorstore 0.1.86): with the store
   unreachable, Orbax's save times out (`config.checkpoint_timeout_s`) and says so, but the writes it started
   stay in flight in non-daemon executor threads (TensorStore retries a dead GCS endpoint for many minutes), and
   Python's exit joins them: `clipup-train` hung after printing its error. `exit_abandoning_threads()` ends the
   process without joining them; `clipup-train` calls it after a failed save, nothing else does.
5. **A lost peer process: JAX's only hook crashes** (jaxlib 0.10.2): when a process of a multi-process run dies
   (`kill -9`, a crash), JAX's distributed client calls its missed-heartbeat callback, whose default `LOG(QFATAL)`s
   a paragraph that names the lost task on a line of its own; `jax.distributed.initialize` takes no callback, and
   one passed to the client it builds (`_jax.get_distributed_runtime_client(missed_heartbeat_callback=...)`)
   aborts the process with `std::bad_cast` when called (the `absl::Status` argument has no Python conversion).
   So `PeerWatch` watches the peers itself: every process holds a TCP connection to process 0, which the kernel
   closes the moment its process dies; process 0 tells the others which one went, and each says so in one line
   and exits (`parallel/distributed.py`). A clean exit says goodbye first. JAX's heartbeat stays the backstop for
   a host that vanishes without closing its connections.
6. **Reads that finish after Orbax's restore gave up** (orbax-checkpoint 0.12.8, tensorstore 0.1.86): when one
   array of a restore fails to read (a damaged checkpoint, which `TrainCheckpoints.restore` then falls back from),
   Orbax's `asyncio` loop ends with that error and is closed while the other arrays' reads are still in flight. As
   each finishes, TensorStore's awaitable calls `call_soon_threadsafe` on the closed loop from its own thread, and
   Python printed the `RuntimeError: Event loop is closed` as "Exception ignored in: None" with a traceback, up to
   one per array, after the fallback's warning had said what happened. Those are dropped
   (`is_closed_loop_completion`: that error, raised in that asyncio method and reported by native code); every
   other unraisable exception is reported as before.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import functools
import os
import sys
import threading
from typing import Any, Callable

DEFAULT_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def apply() -> None:
    """Installs work-arounds 1, 2 and 6 (idempotent)."""
    plug_tensorstore_to_json()
    _mark_absl_flags_parsed()
    quiet_closed_loop_completions()


# --- 1. TensorStore Spec.to_json() leak -------------------------------------------------------------------------

_PLUGGED: dict[type, Any] = {}  # class -> its own `to_json` attribute (pybind11's method descriptor, restorable)


def tensorstore_to_json_leaks(calls: int = 200) -> bool:
    """Whether TensorStore's own `KvStore.Spec.to_json()` leaves memory behind: a leak-free call nets zero Python
    allocations, a leaking one 4 for this 2-key spec (half that is the threshold: no false alarm from noise)."""
    import tensorstore as ts

    spec = ts.KvStore.Spec({"driver": "file", "path": "/clipup-leak-probe/"})
    to_json = _PLUGGED[ts.KvStore.Spec].__get__(spec) if _PLUGGED else spec.to_json
    to_json()
    before = sys.getallocatedblocks()
    for _ in range(calls):
        to_json()
    return sys.getallocatedblocks() - before >= 2 * calls


def _to_json_from_repr(original: Any, prefix: str) -> Callable:
    def to_json(self: Any, *args: Any, **kwargs: Any) -> Any:
        text = repr(self)
        if args or kwargs or not (text.startswith(prefix) and text.endswith(")")):
            return original.__get__(self)(*args, **kwargs)
        try:
            return ast.literal_eval(text[len(prefix):-1])
        except (ValueError, SyntaxError):  # something repr does not render as a literal: be correct, not lean
            return original.__get__(self)()

    to_json.__doc__ = original.__doc__
    return to_json


def plug_tensorstore_to_json() -> bool:
    """Installs the repr-based `to_json` on `ts.Spec` and `ts.KvStore.Spec` when TensorStore leaks; idempotent.
    Returns whether the plug is (now) installed."""
    import tensorstore as ts

    if not _PLUGGED and tensorstore_to_json_leaks():
        for cls, prefix in ((ts.Spec, "Spec("), (ts.KvStore.Spec, "KvStore.Spec(")):
            _PLUGGED[cls] = cls.__dict__["to_json"]
            cls.to_json = _to_json_from_repr(_PLUGGED[cls], prefix)
    return bool(_PLUGGED)


def unplug_tensorstore_to_json() -> None:
    """Restores TensorStore's own methods (for tests)."""
    for cls, original in _PLUGGED.items():
        cls.to_json = original
    _PLUGGED.clear()


# --- 2. grain's absl flags --------------------------------------------------------------------------------------

def _mark_absl_flags_parsed() -> None:
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# --- 3. glibc malloc arenas -------------------------------------------------------------------------------------

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
    """Hands freed heap pages in every arena back to the OS (glibc `malloc_trim`; elsewhere a no-op)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# --- 4. a failed save's threads ---------------------------------------------------------------------------------

def exit_abandoning_threads(code: int) -> None:
    """Ends the process now, with `code`, without joining its threads (after a failed save; see 4.)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --- 5. a lost peer process -------------------------------------------------------------------------------------

class PeerWatch:
    """Process `me` of `count` watches the others (see 5.): `on_lost(who)` is called, from a thread, with the lost
    process named ("process 1", "the coordinator (process 0)"); it must end the process. `publish(port)` and
    `lookup() -> port` share process 0's listening port (JAX's key-value store); `host` is process 0's host."""

    KEY = "clipup/peer_watch_port"

    def __init__(self, me: int, count: int, host: str, publish: Callable[[int], None], lookup: Callable[[], int],
                 on_lost: Callable[[str], None], keepalive_s: int = 30) -> None:
        import atexit
        import socket

        self.me, self._on_lost, self._keepalive_s = me, on_lost, keepalive_s
        self._conns: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._closing = False
        if me == 0:
            server = socket.create_server(("", 0))
            publish(server.getsockname()[1])
            threading.Thread(target=self._accept, args=(server, count - 1), daemon=True).start()
        else:
            conn = socket.create_connection((host, lookup()), timeout=60)
            conn.settimeout(None)
            conn.sendall(f"hello {me}\n".encode())
            self._keepalive(conn)
            self._conns[0] = conn
            threading.Thread(target=self._read, args=(0, conn), daemon=True).start()
        atexit.register(self.close)

    def _keepalive(self, conn: Any) -> None:
        import socket

        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", self._keepalive_s // 3), ("TCP_KEEPINTVL", self._keepalive_s // 3),
                            ("TCP_KEEPCNT", 2)):
            if hasattr(socket, name):  # Linux; elsewhere the system's defaults
                conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), max(1, value))

    def _accept(self, server: Any, expected: int) -> None:
        for _ in range(expected):
            conn, _ = server.accept()
            lines = conn.makefile("r")
            hello = lines.readline().split()
            if len(hello) != 2 or hello[0] != "hello":
                conn.close()
                continue
            self._keepalive(conn)
            with self._lock:
                self._conns[int(hello[1])] = conn
            threading.Thread(target=self._read, args=(int(hello[1]), conn, lines), daemon=True).start()
        server.close()

    def _read(self, peer: int, conn: Any, lines: Any = None) -> None:
        try:
            for line in lines or conn.makefile("r"):
                word, _, arg = line.strip().partition(" ")
                if word == "bye":
                    with self._lock:
                        self._conns.pop(peer, None)
                    return
                if word == "lost":  # process 0 lost another process
                    return self._lost(f"process {arg}")
        except OSError:
            pass
        if not self._closing:
            self._lost(f"process {peer}" if self.me == 0 else "the coordinator (process 0)")

    def _lost(self, who: str) -> None:
        with self._lock:
            others = [c for c in self._conns.values()]
        if self.me == 0:
            for conn in others:  # the rest learn who it was before this process goes
                with contextlib.suppress(OSError):
                    conn.sendall(f"lost {who.split()[-1]}\n".encode())
        self._on_lost(who)

    def close(self) -> None:
        """Says goodbye (a clean exit: atexit)."""
        self._closing = True
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.sendall(b"bye\n")
                conn.close()


# --- 6. reads that finish after a failed restore ----------------------------------------------------------------

def is_closed_loop_completion(unraisable: Any) -> bool:
    """Whether an unraisable exception (`sys.unraisablehook`'s argument) is a TensorStore future telling a closed
    event loop that it finished: `RuntimeError('Event loop is closed')` raised in asyncio's `call_soon_threadsafe`
    and reported without an object, as native code reports it (Python's own reports name the `__del__` or
    callback they came from)."""
    tb = unraisable.exc_traceback
    return (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
            and unraisable.object is None and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


class _QuietClosedLoops:
    """`sys.unraisablehook` minus `is_closed_loop_completion`'s reports."""

    def __init__(self, previous: Callable[[Any], None]):
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        if not is_closed_loop_completion(unraisable):
            self.previous(unraisable)


def quiet_closed_loop_completions() -> None:
    """Puts `_QuietClosedLoops` in front of the current `sys.unraisablehook` (idempotent)."""
    if not isinstance(sys.unraisablehook, _QuietClosedLoops):
        sys.unraisablehook = _QuietClosedLoops(sys.unraisablehook)
