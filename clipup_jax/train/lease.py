"""One trainer per workdir: a second run on a workdir that a live run holds is refused at once, naming the holder.

`WORKDIR/lease.json` names the holder: host, pid, when it took the lease and when it last renewed it. Two
checkpointers interleaving saves in one directory would corrupt each other's steps silently, so this is checked
before anything is written (only process 0 of a multi-process run takes the lease: the others share its run).

* **Local disk**: the holder keeps the file `flock`ed. The kernel drops the lock when the holder dies, `kill -9`
  included, so a dead run's lease is taken over at once and a live one's never (NFSv4 carries the lock across
  hosts; on a file system without locks, some FUSE mounts, the run goes on and says that nothing guards it).
* **Object store** (gs://): nothing dies with its holder, so the holder renews the lease every `RENEW_S` seconds
  from a thread (a long compile or save does not stop it), and a lease is **stale**, and taken over, when its
  holder is on this host and its pid is gone, or when it was not renewed for `TIMEOUT_S` seconds by the taker's
  clock (hosts' clocks assumed synchronised, as NTP keeps them on cloud VMs). Every change is conditional on the
  generation read (`storage.ConditionalObject`), so of two runs racing for a lease exactly one wins; a holder
  that stalled past the timeout and lost its lease learns so at its next renewal, and `check()` stops its run.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import threading
import time
from typing import Iterator

from clipup_jax.storage import ConditionalObject, PathLike, as_path, is_remote

LEASE_FILE = "lease.json"
RENEW_S = 10.0
TIMEOUT_S = 60.0


class WorkdirBusy(RuntimeError):
    """Another live run holds the workdir (or took it over from this one)."""


def _holder() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": now, "renewed": now}


def _describe(holder: dict) -> str:
    since = datetime.datetime.fromtimestamp(holder.get("since", 0), datetime.timezone.utc)
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"since {since.strftime('%Y-%m-%d %H:%M:%S')} UTC")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


class _LocalLease:
    def __init__(self, path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.unlocked: str | None = None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder()
            os.close(self._fd)
            raise WorkdirBusy(f"workdir {path.parent} is held by a live run ({_describe(holder)}; lease {path}): "
                              "wait for it to end or stop it first") from None
        except OSError as e:  # a file system without locks (some FUSE mounts): run, but say nothing guards it
            self.unlocked = f"file locks unsupported here ({e.strerror}): nothing stops a second run on it"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(_holder()).encode(), 0)

    def _read_holder(self) -> dict:
        for _ in range(20):  # the holder writes its name just after locking: a moment without one
            try:
                return json.loads(self.path.read_text())
            except (ValueError, OSError):
                time.sleep(0.05)
        return {}

    def check(self) -> None:
        pass

    def release(self) -> None:
        os.close(self._fd)  # unlocks; the file stays (deleting it would race a taker's open)


class _RemoteLease:
    def __init__(self, path) -> None:
        self.path, self._object = path, ConditionalObject(path)
        self._lost: str | None = None
        self._stop = threading.Event()
        self.took_over: str | None = None
        self._me = _holder()
        for _ in range(5):  # lost races re-read and decide again
            found = self._object.read()
            generation = 0
            if found is not None:
                data, generation = found
                try:
                    holder = json.loads(data)
                except ValueError:
                    holder = {}
                stale = self._stale(holder)
                if stale is None:
                    raise WorkdirBusy(f"workdir {path.parent} is held by a live run ({_describe(holder)}, renewed "
                                      f"{time.time() - holder.get('renewed', 0):.0f}s ago; lease {path}): wait for "
                                      f"it to end, or {TIMEOUT_S:.0f}s after its last renewal")
                self.took_over = f"took over the lease of {_describe(holder)}: {stale}"
            self._generation = self._object.write(json.dumps(self._me).encode(), generation)
            if self._generation is not None:
                break
        else:
            raise WorkdirBusy(f"workdir {path.parent}: lost the race for its lease {path} to another run")
        self._last_renewal = time.monotonic()
        self._thread = threading.Thread(target=self._renew, name="clipup-lease", daemon=True)
        self._thread.start()

    @staticmethod
    def _stale(holder: dict) -> str | None:
        """Why `holder`'s lease may be taken over; None while it may be alive."""
        if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
            return "its process is gone"
        age = time.time() - holder.get("renewed", 0)
        return f"not renewed for {age:.0f}s (> {TIMEOUT_S:.0f}s)" if age > TIMEOUT_S else None

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            self._me["renewed"] = time.time()
            try:
                generation = self._object.write(json.dumps(self._me).encode(), self._generation)
            except Exception as e:  # the store unreachable: retried; fatal only once others may take over
                if time.monotonic() - self._last_renewal > TIMEOUT_S:
                    self._lost = f"could not renew it for {TIMEOUT_S:.0f}s ({type(e).__name__})"
                    return
                continue
            if generation is None:
                found = self._object.read()
                holder = json.loads(found[0]) if found else {}
                self._lost = f"another run took it over ({_describe(holder)})" if found else "it was deleted"
                return
            self._generation, self._last_renewal = generation, time.monotonic()

    def check(self) -> None:
        if self._lost:
            raise WorkdirBusy(f"workdir {self.path.parent}: this run lost its lease {self.path}: {self._lost}")

    def release(self) -> None:
        """Deletes the lease if it is still this run's; with the store unreachable it stays, and is taken over as
        any dead run's is."""
        self._stop.set()
        self._thread.join(timeout=2 * ConditionalObject.timeout_s)
        if not self._lost:
            try:
                self._object.delete(self._generation)
            except Exception:  # noqa: BLE001 (the run's own error, if any, is the one to report)
                pass


_HELD: dict[str, _LocalLease | _RemoteLease] = {}


def current(workdir: PathLike) -> _LocalLease | _RemoteLease | None:
    """The lease this process holds on `workdir`, if any."""
    return _HELD.get(os.fspath(as_path(workdir)))


@contextlib.contextmanager
def hold(workdir: PathLike, enabled: bool = True) -> Iterator[_LocalLease | _RemoteLease | None]:
    """Holds `workdir`'s lease for the block (the workdir must exist); raises WorkdirBusy at once if a live run
    holds it. Re-entrant: a block inside another on the same workdir (run_experiment, then train) holds it once.
    `enabled=False` (processes other than 0) holds nothing."""
    key = os.fspath(as_path(workdir))
    if not enabled or key in _HELD:
        yield _HELD.get(key)
        return
    path = as_path(workdir) / LEASE_FILE
    lease = _RemoteLease(path) if is_remote(path) else _LocalLease(path)
    for note in (getattr(lease, "took_over", None), getattr(lease, "unlocked", None)):
        if note:
            print(f"{workdir}: {note}", flush=True)
    _HELD[key] = lease
    try:
        yield lease
    finally:
        del _HELD[key]
        lease.release()
