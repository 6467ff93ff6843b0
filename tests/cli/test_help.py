"""Every CLI's --help: exits 0 and shows its description as written (usage examples on their own lines)."""

from __future__ import annotations

import importlib

import pytest

from tests.cli_helpers import invoke

CLIS = ["convert", "data write", "demo", "embed", "eval", "plan", "sweep", "train"]  # clipup-data: its command's


@pytest.mark.parametrize("command", CLIS)
def test_help_keeps_the_description_as_written(command, capsys):
    name, *sub = command.split()
    module = importlib.import_module(f"clipup_jax.cli.{name}")
    code, out, err = invoke(module.main, [*sub, "--help"], capsys)
    assert code == 0, err
    lines = [line.rstrip() for line in module.__doc__.strip().splitlines()]
    assert all(line in out.splitlines() for line in lines if line.strip()), out
