"""tpu/pod.sh (by its --dry-run, which prints every command and runs nothing) and the SLURM template."""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
POD = ROOT / "tpu" / "pod.sh"
SBATCH = ROOT / "tpu" / "slurm_gpu.sbatch"

BASE = ["--name", "clipup-test", "--zone", "us-central2-b", "--project", "my-proj"]
CONFIG = "experiments/clipup_b16.py"
WORKDIR = "gs://my-bucket/runs/clipup_b16"


def pod(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLIPUP_")}
    # No gcloud, sbatch or srun reachable: a dry run must not need them, and nothing may run for real.
    clean["PATH"] = "/usr/bin:/bin"
    clean.update(env or {})
    return subprocess.run(["bash", str(POD), *args], capture_output=True, text=True, env=clean, timeout=30, cwd=ROOT)


def commands(result: subprocess.CompletedProcess) -> list[list[str]]:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), result.stdout
    return [shlex.split(line[2:]) for line in lines]  # the printed lines are valid shell


def flag(cmd: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
    assert len(values) == 1, (name, cmd)
    return values[0]


def test_create():
    [cmd] = commands(pod("create", "--dry-run", *BASE, "--accelerator", "v5p-64"))
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "clipup-test"]
    assert flag(cmd, "--zone") == "us-central2-b"
    assert flag(cmd, "--project") == "my-proj"
    assert flag(cmd, "--accelerator-type") == "v5p-64"
    assert flag(cmd, "--version") == "v2-alpha-tpuv5"  # default runtime of the generation
    [cmd] = commands(pod("create", "--dry-run", *BASE, "--accelerator=v4-64", "--version=tpu-vm-v4-base", "--spot"))
    assert flag(cmd, "--accelerator-type") == "v4-64" and flag(cmd, "--version") == "tpu-vm-v4-base"
    assert "--spot" in cmd


def test_create_needs_accelerator():
    result = pod("create", "--dry-run", *BASE)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "--accelerator" in result.stderr


def test_install_copies_working_tree_to_all_workers():
    tar, scp, ssh = commands(pod("install", "--dry-run", *BASE))
    assert tar[0] == "tar" and str(ROOT) in tar and "--exclude=./.venv" in tar
    tarball = tar[tar.index("-czf") + 1]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5] == tarball and scp[6].startswith("clipup-test:")
    assert "--worker=all" in scp and flag(scp, "--zone") == "us-central2-b"
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "clipup-test"]
    assert "--worker=all" in ssh
    remote = flag(ssh, "--command")
    for step in ("tar -xzf", "python3 -m venv .venv", "pip install -q -e .", "'jax[tpu]'"):
        assert step in remote, step
    assert not pathlib.Path(tarball).exists()  # a dry run writes nothing


def test_install_from_git():
    [ssh] = commands(pod("install", "--dry-run", *BASE, "--repo", "https://example.com/clipup_jax.git"))
    assert "--worker=all" in ssh
    assert "git clone https://example.com/clipup_jax.git clipup_jax" in flag(ssh, "--command")


def test_launch():
    extra = "--config.init.checkpoint=gs://my-bucket/ckpt/b16 --config.batch_size=16384"
    [cmd] = commands(pod("launch", "--dry-run", *BASE, "--config", CONFIG, "--workdir", WORKDIR, "--extra", extra))
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "clipup-test"]
    assert "--worker=all" in cmd and flag(cmd, "--project") == "my-proj"
    remote = flag(cmd, "--command")
    assert "nohup" in remote and "JAX_PLATFORMS=tpu" in remote
    assert f"clipup-train --config {CONFIG} --workdir {WORKDIR} {extra}" in remote
    assert "> $HOME/clipup_train.log 2>&1 < /dev/null &" in remote


def test_options_from_environment():
    env = {"CLIPUP_TPU_NAME": "from-env", "CLIPUP_TPU_ZONE": "us-east5-a", "CLIPUP_CONFIG": CONFIG,
           "CLIPUP_WORKDIR": "/mnt/runs/b16", "CLIPUP_EXTRA": "--config.total_steps=10"}
    [cmd] = commands(pod("launch", "--dry-run", env=env))
    assert cmd[5] == "from-env" and flag(cmd, "--zone") == "us-east5-a"
    assert not any(a.startswith("--project") for a in cmd)
    assert "--workdir /mnt/runs/b16 --config.total_steps=10" in flag(cmd, "--command")
    [cmd] = commands(pod("launch", "--dry-run", "--name", "from-flag", env=env))  # flags win
    assert cmd[5] == "from-flag"


def test_launch_needs_config_and_shared_workdir():
    for args, word in [(["--workdir", WORKDIR], "--config"), (["--config", CONFIG], "--workdir"),
                       (["--config", CONFIG, "--workdir", "runs/local"], "gs://")]:
        result = pod("launch", "--dry-run", *BASE, *args)
        assert result.returncode == 2 and result.stdout == "", args
        assert result.stderr.count("\n") == 1 and word in result.stderr, result.stderr


def test_logs():
    [cmd] = commands(pod("logs", "--dry-run", *BASE))
    assert cmd[4:6] == ["ssh", "clipup-test"] and "--worker=0" in cmd
    assert flag(cmd, "--command") == "tail -n 200 -F $HOME/clipup_train.log"
    [cmd] = commands(pod("logs", "--dry-run", *BASE, "--worker", "all", "--log", "/mnt/logs/run.log"))
    assert "--worker=all" in cmd and flag(cmd, "--command").endswith("-F /mnt/logs/run.log")


def test_delete():
    [cmd] = commands(pod("delete", "--dry-run", *BASE))
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "clipup-test"]
    assert "--quiet" not in cmd  # gcloud asks unless --yes
    [cmd] = commands(pod("delete", "--dry-run", *BASE, "--yes"))
    assert "--quiet" in cmd


@pytest.mark.parametrize("sub", ["create", "install", "launch", "logs", "delete"])
def test_missing_name(sub):
    result = pod(sub, "--dry-run", "--zone", "us-central2-b", "--accelerator", "v4-64",
                 "--config", CONFIG, "--workdir", WORKDIR)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--name is required" in result.stderr


@pytest.mark.parametrize("args", [["frobnicate", "--dry-run"], [], ["launch", "--dry-run", "--bogus"],
                                  ["logs", "--dry-run", "--name"]])
def test_bad_usage_exits_2(args):
    result = pod(*args[:1], *(["--zone", "z"] if args else []), *args[1:])
    assert result.returncode == 2 and "pod.sh: error:" in result.stderr


def test_help():
    result = pod("--help")
    assert result.returncode == 0 and "--dry-run" in result.stdout


def test_shell_syntax():
    for script in (POD, SBATCH):
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


def test_sbatch_template():
    text = SBATCH.read_text()
    for needle in ("#SBATCH --nodes=", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1", "srun",
                   "clipup-train", "XLA_PYTHON_CLIENT_MEM_FRACTION", "--xla_gpu_enable_latency_hiding_scheduler=true",
                   "CONFIG=", "WORKDIR=", "EXTRA="):
        assert needle in text, needle
