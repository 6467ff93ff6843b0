"""Which package may import which: the layers below never reach up (sharding knows no training loop), so the
planner, the importers and the models can be used and tested without the trainer."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parents[1] / "clipup_jax"
# package -> the clipup_jax packages (and top-level modules) it may import, besides itself
# `storage` (the one path type, local or gs://) sits below every package, like `config`.
ALLOWED = {
    "data": {"storage"},
    "models": {"config", "parallel"},
    "parallel": {"config", "models", "storage", "workarounds"},
    "checkpoints": {"config", "data", "models", "storage"},
    "evaluate": {"config", "data", "models"},
    "train": {"config", "data", "models", "parallel", "checkpoints", "evaluate", "workarounds", "storage"},
}


def _imported(path: pathlib.Path) -> set[str]:
    """The clipup_jax subpackages or modules a file imports (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        out |= {n.split(".")[1] for n in names if n.startswith("clipup_jax.")}
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_lower_layers_do_not_import_higher_ones(package):
    bad = {str(f.relative_to(PACKAGE)): sorted(_imported(f) - ALLOWED[package] - {package})
           for f in sorted((PACKAGE / package).rglob("*.py"))}
    assert not {f: b for f, b in bad.items() if b}, f"{package}/ imports outside its layer"


def test_the_rule_sees_imports():  # a rule that finds nothing would pass for nothing
    assert _imported(PACKAGE / "train" / "trainer.py") >= {"parallel", "models", "workarounds"}
