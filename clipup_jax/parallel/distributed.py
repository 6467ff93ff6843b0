"""Multi-host start-up: `jax.distributed.initialize()` before anything touches a device.

    initialize()                                   # auto: TPU pod / SLURM / Open MPI, env vars, or single process
    initialize("10.0.0.1:1234", num_processes=2, process_id=0, local_device_count=4)   # explicit (CPU test rig)

Where the process and its peers come from, first match wins:

1. explicit arguments, else the env vars ``CLIPUP_COORDINATOR`` (``host:port``), ``CLIPUP_NUM_PROCESSES``,
   ``CLIPUP_PROCESS_ID`` (``CLIPUP_LOCAL_DEVICE_COUNT`` simulates that many CPU devices per process);
2. a cluster JAX detects by itself: SLURM with ``SLURM_NTASKS`` > 1, Open MPI (``mpirun``) with more than one
   rank, a Cloud TPU VM (``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` / ``MEGASCALE_COORDINATOR_ADDRESS``,
   or libtpu with a TPU device node), or ``JAX_COORDINATOR_ADDRESS``: plain ``jax.distributed.initialize()``;
3. otherwise a single process: nothing to do (a ``local_device_count`` still sets the CPU device count).

On CPU, cross-process collectives use gloo (``jax_cpu_collectives_implementation``); ``local_device_count`` sets
``jax_num_cpu_devices`` (the config form of ``--xla_force_host_platform_device_count``). Both must be set before
the backend starts, so this raises a clear error when devices were already touched. Calling it again is a no-op.

A process that dies (``kill -9``, a crash) is noticed by the others at once (its connection to process 0 closes:
`workarounds.PeerWatch`): each prints one line naming the lost process and exits with status 3, whatever it was
blocked in (a collective, a checkpoint barrier), instead of waiting on it; relaunching every process resumes
from the latest complete checkpoint. A host that vanishes without closing its connections is noticed after
``CLIPUP_HEARTBEAT_TIMEOUT`` seconds (default 30; JAX's own default is 100): TCP keepalive, and JAX's heartbeat.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import socket
import sys
import time
from typing import Callable

import jax

from clipup_jax import workarounds

ENV_COORDINATOR = "CLIPUP_COORDINATOR"
ENV_NUM_PROCESSES = "CLIPUP_NUM_PROCESSES"
ENV_PROCESS_ID = "CLIPUP_PROCESS_ID"
ENV_LOCAL_DEVICE_COUNT = "CLIPUP_LOCAL_DEVICE_COUNT"
ENV_TIMEOUT = "CLIPUP_INIT_TIMEOUT"  # seconds to wait for the coordinator and peers
ENV_HEARTBEAT = "CLIPUP_HEARTBEAT_TIMEOUT"  # seconds without heartbeats after which a process counts as lost

DEFAULT_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_S = 30
LOST_PEER_EXIT = 3

_done: dict | None = None  # the arguments of the call that did the work
_watch: workarounds.PeerWatch | None = None  # this process's watch on its peers (multi-process)
_aligned: dict[str, int] = {}  # `align` calls per name: each barrier id is used once


def _backends_started() -> bool:
    from jax._src import xla_bridge  # no public query for "has a backend been created"

    return xla_bridge.backends_are_initialized()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def cluster_detected() -> str | None:
    """The multi-process environment `jax.distributed.initialize()` can configure itself from, or None."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in env for v in slurm) and (_env_int("SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    if any(env.get(v) for v in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")):
        return "tpu"
    if importlib.util.find_spec("libtpu") is not None and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        return "tpu"  # a TPU VM: JAX reads the worker list from the GCE metadata server
    return None


def _check_coordinator(coordinator: str) -> None:
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator must be 'host:port' (e.g. 10.0.0.1:1234), got {coordinator!r}")


def _wait_for_coordinator(coordinator: str, timeout_s: float) -> None:
    """Polls the coordinator's port: JAX aborts the whole process (SIGABRT) when it never answers; this raises."""
    host, _, port = coordinator.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"coordinator {coordinator} did not answer within {timeout_s:g}s ({e}); is process 0 "
                                   f"running with the same {ENV_COORDINATOR}, and is the port reachable?") from None
            time.sleep(0.5)


def _exit_on_lost_peer(me: int, count: int) -> Callable[[str], None]:
    def lost(who: str) -> None:
        print(f"clipup: error: process {me} of {count} lost {who} (its connection closed: killed or crashed); "
              "exiting: relaunch every process to resume from the latest complete checkpoint",
              file=sys.stderr, flush=True)
        workarounds.exit_abandoning_threads(LOST_PEER_EXIT)  # threads blocked on the lost peer are not joined

    return lost


def _watch_peers(heartbeat_s: int, timeout_s: int) -> workarounds.PeerWatch:
    from jax._src import distributed as jax_distributed  # the client and who we are: no public accessor

    state = jax_distributed.global_state
    client, key = state.client, workarounds.PeerWatch.KEY
    return workarounds.PeerWatch(
        state.process_id, state.num_processes, state.coordinator_address.rpartition(":")[0].strip("[]"),
        publish=lambda port: client.key_value_set(key, str(port)),
        lookup=lambda: int(client.blocking_key_value_get(key, timeout_s * 1000)),
        on_lost=_exit_on_lost_peer(state.process_id, state.num_processes), keepalive_s=heartbeat_s)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_count: int | None = None, *, timeout_s: int | None = None) -> None:
    """Joins this process to the multi-controller runtime (see module doc); a no-op for one process."""
    global _done, _watch
    if _done is not None or jax.distributed.is_initialized():
        return
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if local_device_count is None:
        local_device_count = _env_int(ENV_LOCAL_DEVICE_COUNT)
    timeout_s = timeout_s if timeout_s is not None else (_env_int(ENV_TIMEOUT) or DEFAULT_TIMEOUT_S)
    heartbeat_s = _env_int(ENV_HEARTBEAT) or DEFAULT_HEARTBEAT_S

    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if explicit:
        missing = [flag for flag, v in (("coordinator", coordinator), ("num_processes", num_processes),
                                        ("process_id", process_id)) if v is None]
        if missing and num_processes != 1:
            raise ValueError(f"multi-process start-up needs coordinator, num_processes and process_id together "
                             f"(arguments or {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); "
                             f"missing: {', '.join(missing)}")
        if num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {num_processes}")
        if num_processes > 1:
            _check_coordinator(coordinator)
            if not 0 <= process_id < num_processes:
                raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if local_device_count is not None and local_device_count < 1:
        raise ValueError(f"local_device_count must be >= 1, got {local_device_count}")

    multi = (num_processes or 1) > 1 if explicit else cluster_detected() is not None
    if not multi and local_device_count is None:
        return  # a single process with the devices it has: nothing to set up
    if _backends_started():
        raise RuntimeError("clipup_jax.parallel.distributed.initialize() must run before anything touches a JAX "
                           "device (jax.devices(), creating an array, ...); the backend has already started")

    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)  # only the CPU backend reads it
    if multi:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process CPU collectives
        try:
            if explicit:
                if process_id != 0:
                    _wait_for_coordinator(coordinator, timeout_s)
                jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                           process_id=process_id, initialization_timeout=timeout_s,
                                           heartbeat_timeout_seconds=heartbeat_s)
            else:
                jax.distributed.initialize(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_s)
            _watch = _watch_peers(heartbeat_s, timeout_s)
        except TimeoutError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with who we were waiting for
            where = (f"coordinator {coordinator}, process {process_id} of {num_processes}" if explicit
                     else f"auto-detected cluster ({cluster_detected()})")
            raise RuntimeError(f"jax.distributed.initialize failed ({where}; timeout {timeout_s}s): "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    _done = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id,
             "local_device_count": local_device_count, "timeout_s": timeout_s}


def align(name: str) -> None:
    """Returns once every process has called `align(name)` (a barrier of the coordination service, waiting up to
    the start-up timeout); a no-op for one process. Gloo sets up its communicators at the first cross-process
    collective and gives the peers a fixed 30 s to arrive there: a process that starts slower on a loaded machine
    (imports, compiles, data set-up) failed that collective, so callers align just before it."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the coordination client: no public accessor

    timeout_s = (_done or {}).get("timeout_s") or DEFAULT_TIMEOUT_S
    _aligned[name] = _aligned.get(name, 0) + 1
    jax_distributed.global_state.client.wait_at_barrier(f"clipup:{name}:{_aligned[name]}", timeout_s * 1000)
