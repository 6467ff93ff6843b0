"""Run a console-script `main` in-process and capture its exit status and output."""

from __future__ import annotations

import os
import pathlib
from typing import Callable

import pytest


def invoke(main: Callable[[list[str]], None], argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def leftovers(directory: pathlib.Path) -> list[str]:
    """Temporary or partial outputs a failed command must not leave behind."""
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def xla_flags(devices: int | None) -> str:
    """The session's XLA flags (conftest) for a subprocess with `devices` CPU devices (None: it sets its own)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(flags + ([f"--xla_force_host_platform_device_count={devices}"] if devices else []))
