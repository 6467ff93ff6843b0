"""Multi-host for real: 2 local processes (4 CPU devices each, gloo collectives, explicit coordinator) train a
tiny sparse CLIP with expert parallelism (mesh data=2 x expert=4 over the 8 global devices) through
`clipup-train`, checkpoint, and resume in a second launch; the params and losses equal one process with 8
devices, with the workdir in a gs:// bucket (the loopback emulator, found by both processes through the standard
variables). One process `kill -9`ed: the other exits within a minute naming it, and a relaunch of both, from a
workdir on local disk, ends bitwise where an uninterrupted two-process run ends.

The reference is a plain `clipup-train` run of the same config in the test's own 8-device process, while the two
processes run: each process reads its rows of the one global stream (rows [8p, 8p+8) of every batch of 16, which
is also where the batch sharding puts them: checked), so the global batches are those of one process.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

from clipup_jax.checkpoints.format import load_checkpoint
from clipup_jax.parallel.distributed import LOST_PEER_EXIT
from clipup_jax.storage import as_path
from tests.cli_helpers import xla_flags
from tests.gcs_emulator import gcs_bucket  # noqa: F401 (the fixture)
from tests.numerics import U32, assert_close, reduction_bound
from tests.train.test_gcs_workdir import _complete_steps

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
REPO = WORKER.parents[2]
# Rounding bounds (tests/numerics.py): the tiny sparse CLIP's longest reduction is the patch embedding (8*8*3
# terms), chained about 12 times forward and 24 times forward and backward (test_sparse_clip_mesh's count).
FORWARD_BOUND, GRAD_BOUND = reduction_bound(8 * 8 * 3, chain=12), reduction_bound(8 * 8 * 3, chain=24)
# TRAJECTORY: the gradient is clipped to global norm 1, so every element is at most 1 and its error at most
# GRAD_BOUND; with Adam's eps = 1 (the worker's config), d/dg of m/(sqrt(v) + eps) is at most 2 there, so a step
# moves the params' error by at most 2 * lr * GRAD_BOUND, to first order (weight decay only shrinks it).
TIMEOUT_S = 900  # guards a hang only: a loaded 2-core machine can be several times slower than a quiet one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLIPUP_", "JAX_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_")) and k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = xla_flags(None)  # the device count: CLIPUP_LOCAL_DEVICE_COUNT
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # the session's cache (conftest): the resume reuses the compiles
        env["JAX_COMPILATION_CACHE_DIR"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
    return {**env, **extra}


def _start(jobs: list[tuple[list[str], dict[str, str], pathlib.Path]]) -> list[tuple[subprocess.Popen, pathlib.Path]]:
    return [(subprocess.Popen([sys.executable, str(WORKER), *args], env=env, cwd=log.parent, stdout=log.open("w"),
                              stderr=subprocess.STDOUT), log) for args, env, log in jobs]


def _wait(procs: list[tuple[subprocess.Popen, pathlib.Path]]) -> None:
    """All must exit 0 within TIMEOUT_S, else all are killed and the test fails."""
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p, _ in procs):
            if any(p.poll() not in (None, 0) for p, _ in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    failed = [(p.returncode, log) for p, log in procs if p.returncode != 0]
    assert not failed, "\n\n".join(f"{log.name} exited {rc}:\n" + log.read_text()[-3000:] for rc, log in failed)


def _multi(workdir, steps: int, tokenizer: pathlib.Path, tag: str, logs: pathlib.Path, overrides=(), **env: str):
    """The two processes' jobs: workdir local or gs://, logs (and each process's rows file) in local `logs`."""
    port = str(_free_port())
    return [([str(workdir), str(steps), str(tokenizer), *overrides],
             _env(CLIPUP_COORDINATOR=f"127.0.0.1:{port}", CLIPUP_NUM_PROCESSES="2", CLIPUP_PROCESS_ID=str(i),
                  CLIPUP_LOCAL_DEVICE_COUNT="4", CLIPUP_INIT_TIMEOUT="600", **env),
             logs / f"{tag}_{i}.log") for i in range(2)]


def _worker_module():
    sys.path.insert(0, str(WORKER.parent))
    try:
        import multiprocess_worker
    finally:
        sys.path.remove(str(WORKER.parent))
    return multiprocess_worker


def _tokenizer(directory: pathlib.Path) -> pathlib.Path:
    from clipup_jax.train.run import tokenizer_for, train_source

    config = _worker_module().get_config()
    return tokenizer_for(config, directory, train_source(config))  # shared, built once


EMULATOR_VARIABLES = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")


def test_two_processes_train_checkpoint_resume_like_one_process(tmp_path, gcs_bucket):  # noqa: F811
    import jax

    multiprocess_worker = _worker_module()
    tokenizer = _tokenizer(tmp_path)
    single = tmp_path / "single"
    multi = as_path(gcs_bucket) / "multi"
    assert all(_env().get(k) == os.environ[k] for k in EMULATOR_VARIABLES)  # both processes see the emulator

    first = _start(_multi(multi, 2, tokenizer, "first", tmp_path))
    try:  # the reference meanwhile, here: this process has the 8 CPU devices of one host (conftest)
        assert jax.process_count() == 1 and jax.device_count() == 8
        multiprocess_worker.train(single, 4, tokenizer)
    finally:
        _wait(first)
    first = json.loads((multi / "history.json").read_text())["train"]
    assert [h["step"] for h in first] == [1, 2]
    _wait(_start(_multi(multi, 4, tokenizer, "resume", tmp_path)))
    resumed = json.loads((multi / "history.json").read_text())["train"]
    assert [h["step"] for h in resumed] == [3, 4]
    assert "resumed from" in (tmp_path / "resume_0.log").read_text()

    for i in range(2):  # a real 2 x 4-device runtime, each process feeding its own rows
        rows = json.loads((tmp_path / f"rows_{i}.json").read_text())
        assert rows == {"process": i, "count": 2, "devices": 8, "local_devices": 4, "rows": [8 * i, 8 * i + 8],
                        "contiguous": True}
    assert load_checkpoint(multi).metadata["step"] == 4

    want = json.loads((single / "history.json").read_text())["train"]
    got, ref = load_checkpoint(multi).params, load_checkpoint(single).params
    assert got.keys() == ref.keys()
    n_params = sum(v.size for v in ref.values())
    moved = 0.0  # the params' error bound after the steps so far, absolute (see TRAJECTORY below)
    for step, ref_step in zip(first + resumed, want, strict=True):
        assert step["step"] == ref_step["step"]
        # The loss: its forward's rounding, plus the params' error times the gradient (Cauchy-Schwarz, l1 <= sqrt(N) l2).
        bound = FORWARD_BOUND + np.sqrt(n_params) * ref_step["grad_norm"] * moved / ref_step["loss"]
        for key in ("loss", "contrastive_loss", "aux_loss"):
            assert_close(step[key], ref_step[key], bound, f"step {step['step']} {key}", scale=ref_step["loss"])
        moved += 2 * GRAD_BOUND * ref_step["lr"]
    print(f"max |param diff| over {len(ref)} params: {max(np.abs(got[k] - ref[k]).max() for k in ref):.3g}, "
          f"bound {moved:.3g}")
    for name in ref:  # plus each parameter's own rounding, one ulp of its scale per step
        allowed = moved + 2 * len(want) * U32 * np.abs(ref[name]).max()
        assert_close(got[name], ref[name], allowed, name, scale=1.0)


def test_a_killed_process_stops_the_other_within_a_minute_and_a_relaunch_resumes_bitwise(tmp_path):
    """Two processes save every step; process 1 is `kill -9`ed once a step is complete and training is past step 3.
    Process 0, blocked on its lost peer, exits within 60 s (at once: the lost process's connection closes) with one
    line naming it; relaunched, both resume from the latest complete step and end bitwise where an uninterrupted two-process run
    (started alongside) ends."""
    tokenizer = _tokenizer(tmp_path)
    constant = ("--config.optim.schedule=constant", "--config.checkpoint_every=1")  # the kill's longer run: same LRs
    straight = _start(_multi(tmp_path / "straight", 5, tokenizer, "straight", tmp_path, constant))
    killed = tmp_path / "killed"
    procs = _start(_multi(killed, 1000, tokenizer, "killed", tmp_path, constant, CLIPUP_HEARTBEAT_TIMEOUT="10"))
    (survivor, log), (victim, _) = procs
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert survivor.poll() is None and victim.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            steps = [int(line[6:line.index("/")]) for line in log.read_text().splitlines() if line.startswith("[step ")]
            if steps and steps[-1] >= 3 and _complete_steps(str(killed)):
                break
            time.sleep(0.2)
        victim.kill()
        lost = time.monotonic()
        survivor.wait(timeout=300)
        took = time.monotonic() - lost
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    output = log.read_text()
    print(f"process 0 exited {took:.1f}s after process 1 was killed")  # pytest -rP shows it
    assert survivor.returncode == LOST_PEER_EXIT, output[-3000:]
    assert took < 60, took
    lines = [line for line in output.splitlines()
             if line.startswith("clipup: error: process 0 of 2 lost process 1 (")]
    assert len(lines) == 1, output[-3000:]
    latest = max(_complete_steps(str(killed)))
    _wait(_start(_multi(killed, 5, tokenizer, "relaunch", tmp_path, constant)))
    assert f"resumed from {killed / 'checkpoints'} at step {latest} (" in (tmp_path / "relaunch_0.log").read_text()
    _wait(straight)
    want, got = load_checkpoint(tmp_path / "straight"), load_checkpoint(killed)
    assert got.metadata["step"] == want.metadata["step"] == 5
    for name in want.params:
        np.testing.assert_array_equal(got.params[name], want.params[name], err_msg=name)


def test_initialize_is_a_no_op_for_one_process_and_checks_its_arguments(monkeypatch):
    import jax
    import pytest

    from clipup_jax.parallel import distributed

    for name in ("CLIPUP_COORDINATOR", "CLIPUP_NUM_PROCESSES", "CLIPUP_PROCESS_ID", "CLIPUP_LOCAL_DEVICE_COUNT",
                 "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES",
                 "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    distributed.initialize()
    distributed.initialize(num_processes=1)
    assert not jax.distributed.is_initialized()
    with pytest.raises(ValueError, match="missing: process_id"):
        distributed.initialize("127.0.0.1:1234", num_processes=2)
    with pytest.raises(ValueError, match="host:port"):
        distributed.initialize("127.0.0.1", num_processes=2, process_id=0)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=2)
    monkeypatch.setenv("CLIPUP_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="CLIPUP_NUM_PROCESSES='two' is not an integer"):
        distributed.initialize()


def test_a_coordinator_that_does_not_answer_fails_with_a_clear_message(tmp_path):
    log = tmp_path / "dead.log"
    jobs = [([str(tmp_path / "w"), "1", str(tmp_path / "tok")],
             _env(CLIPUP_COORDINATOR=f"127.0.0.1:{_free_port()}", CLIPUP_NUM_PROCESSES="2", CLIPUP_PROCESS_ID="1",
                  CLIPUP_INIT_TIMEOUT="2"), log)]
    try:
        _wait(_start(jobs))
    except AssertionError:
        pass
    else:
        raise AssertionError("a process whose coordinator never answers must fail")
    assert "did not answer within 2s" in log.read_text()
