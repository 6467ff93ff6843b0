"""One trainer per workdir, on local disk and on gs:// (the emulator): a live holder refuses a second run at once,
naming itself; a killed holder's lease is taken over at once on its own host, another host's only after the
timeout; a holder whose lease was taken over stops; and a second `clipup-train` leaves the first undisturbed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

from clipup_jax.checkpoints.format import load_checkpoint
from clipup_jax.cli.train import main as train_main
from clipup_jax.storage import ConditionalObject, is_remote
from clipup_jax.train import lease
from tests.cli_helpers import invoke, xla_flags
from tests.gcs_emulator import gcs_bucket  # noqa: F401 (the fixture)
from tests.train.test_preemption import ROOT, SMALL

# Another process: takes the lease, then holds it, exits cleanly, or is `kill -9`ed.
OTHER = """import os, signal, sys, time
from clipup_jax.train import lease
with lease.hold(sys.argv[1]):
    print("held", flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
"""


def _other(workdir, then: str = "exit") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", OTHER, str(workdir), then], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(params=["local", "gs"])
def workdir(request, tmp_path) -> epath.Path:
    path = epath.Path(tmp_path if request.param == "local" else request.getfixturevalue("gcs_bucket")) / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_a_live_holder_refuses_a_second_run_at_once_naming_itself(workdir):
    with lease.hold(workdir):
        started = time.monotonic()
        refused = _other(workdir)
        assert refused.returncode == 1 and "held" not in refused.stdout
        error = refused.stderr.strip().splitlines()[-1]
        assert error.startswith(f"clipup_jax.train.lease.WorkdirBusy: workdir {workdir} is held by a live run "
                                f"(host {socket.gethostname()}, pid {os.getpid()}, since 20"), error
        assert time.monotonic() - started < 30  # at once: no waiting for a timeout
    assert _other(workdir).stdout == "held\n"  # released at the end of the block


def test_a_killed_holders_lease_is_taken_over_at_once(workdir, capsys):
    killed = _other(workdir, "kill")
    assert killed.returncode == -signal.SIGKILL and killed.stdout == "held\n"
    started = time.monotonic()
    with lease.hold(workdir):
        assert time.monotonic() - started < 30  # at once, not after the timeout
    out = capsys.readouterr().out
    if is_remote(workdir):  # on a store the dead run's lease object was still there; locally the kernel dropped it
        assert f"took over the lease of host {socket.gethostname()}, pid " in out and "its process is gone" in out


def _forge(workdir, host: str, renewed_ago: float) -> None:
    """A lease held by `host` (a pod's other VM), last renewed `renewed_ago` seconds ago."""
    target = ConditionalObject(workdir / lease.LEASE_FILE)
    found = target.read()
    now = time.time()
    holder = {"host": host, "pid": 1, "since": now - 3600, "renewed": now - renewed_ago}
    assert target.write(json.dumps(holder).encode(), found[1] if found else 0) is not None


def test_another_hosts_lease_is_taken_over_only_after_the_timeout(gcs_bucket, capsys):  # noqa: F811
    workdir = epath.Path(gcs_bucket) / "run"
    _forge(workdir, "pod-host-7", renewed_ago=lease.TIMEOUT_S - 20)  # pid 1 lives here too: the host decides
    with pytest.raises(lease.WorkdirBusy, match=r"held by a live run \(host pod-host-7, pid 1, since .* renewed "
                                                 r"4\ds ago"):
        with lease.hold(workdir):
            pass
    _forge(workdir, "pod-host-7", renewed_ago=lease.TIMEOUT_S + 1)
    with lease.hold(workdir):
        assert f"{workdir}: took over the lease of host pod-host-7, pid 1" in capsys.readouterr().out
    assert not (workdir / lease.LEASE_FILE).exists()  # released


def test_a_holder_whose_lease_was_taken_over_stops(gcs_bucket, monkeypatch):  # noqa: F811
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    workdir = epath.Path(gcs_bucket) / "run"
    with lease.hold(workdir) as held:
        _forge(workdir, "pod-host-7", renewed_ago=0)  # as a taker does when this run stalled past the timeout
        deadline = time.monotonic() + 30
        with pytest.raises(lease.WorkdirBusy, match="lost its lease .*: another run took it over "
                                                     r"\(host pod-host-7, pid 1"):
            while time.monotonic() < deadline:
                held.check()
                time.sleep(0.05)
    assert json.loads((workdir / lease.LEASE_FILE).read_text())["host"] == "pod-host-7"  # not deleted: not ours


def test_a_second_clipup_train_is_refused_and_the_first_finishes(workdir, capsys):
    """The first run is stopped (SIGSTOP) after its first step, so it holds the workdir for certain while the
    second starts; resumed, it ends at its last step as if nothing happened."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "PYTHONUNBUFFERED": "1"}
    args = ["--config", ROOT / "experiments" / "demo.py", *SMALL, "--config.total_steps=4", "--workdir", workdir]
    first = subprocess.Popen([sys.executable, "-m", "clipup_jax.cli.train", *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    try:
        for line in first.stdout:
            seen.append(line)
            if line.startswith("[step 1/"):
                first.send_signal(signal.SIGSTOP)
                break
        started = time.monotonic()
        code, out, err = invoke(train_main, args, capsys)
        assert time.monotonic() - started < 60
        first.send_signal(signal.SIGCONT)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"clipup-train: error: workdir {workdir} is held by a live run "
                              f"(host {socket.gethostname()}, pid {first.pid}, since "), err
        seen += first.communicate(timeout=300)[0]
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert first.returncode == 0, "".join(seen)
    assert load_checkpoint(workdir).metadata["step"] == 4
