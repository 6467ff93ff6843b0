"""A work-around for a reference leak in TensorStore's Python `Spec.to_json()` (tensorstore 0.1.78-0.1.86 at least).

Each `to_json()` call leaves one reference too many on every key and value of the dict it returns, so none of
them is ever freed: about 60 bytes per JSON scalar. Orbax calls it once or twice per array per save
(`KvStore.Spec(...).to_json()` when building each array's OCDBT spec, `Spec.to_json()` for its Zarr metadata), so a
long run's host memory grows with every checkpoint: ~72 KiB per save for a 121-array tree, measured by
`benchmarks/soak.py`. `repr()` of the same spec renders the same JSON as a Python literal and does not leak, so
`to_json()` with no arguments is answered from it. The plug is installed only where a probe finds the leak, so a
fixed TensorStore keeps its own method.
"""

from __future__ import annotations

import ast
import sys
from typing import Any, Callable

import tensorstore as ts

_PLUGGED: dict[type, Any] = {}  # class -> its own `to_json` attribute (pybind11's method descriptor, restorable)


def leaks(calls: int = 200) -> bool:
    """Whether TensorStore's own `KvStore.Spec.to_json()` leaves memory behind: a leak-free call nets zero Python
    allocations, a leaking one 4 for this 2-key spec (half that is the threshold: no false alarm from noise)."""
    spec = ts.KvStore.Spec({"driver": "file", "path": "/clipup-leak-probe/"})
    to_json = _PLUGGED[ts.KvStore.Spec].__get__(spec) if _PLUGGED else spec.to_json
    to_json()
    before = sys.getallocatedblocks()
    for _ in range(calls):
        to_json()
    return sys.getallocatedblocks() - before >= 2 * calls


def _from_repr(original: Any, prefix: str) -> Callable:
    def to_json(self: Any, *args: Any, **kwargs: Any) -> Any:
        text = repr(self)
        if args or kwargs or not (text.startswith(prefix) and text.endswith(")")):
            return original.__get__(self)(*args, **kwargs)
        try:
            return ast.literal_eval(text[len(prefix):-1])
        except (ValueError, SyntaxError):  # something repr does not render as a literal: be correct, not lean
            return original.__get__(self)()

    to_json.__doc__ = original.__doc__
    return to_json


def plug() -> bool:
    """Installs the repr-based `to_json` on `ts.Spec` and `ts.KvStore.Spec` when TensorStore leaks; idempotent.

    Returns whether the plug is (now) installed."""
    if not _PLUGGED and leaks():
        for cls, prefix in ((ts.Spec, "Spec("), (ts.KvStore.Spec, "KvStore.Spec(")):
            _PLUGGED[cls] = cls.__dict__["to_json"]
            cls.to_json = _from_repr(_PLUGGED[cls], prefix)
    return bool(_PLUGGED)


def unplug() -> None:
    """Restores TensorStore's own methods (for tests)."""
    for cls, original in _PLUGGED.items():
        cls.to_json = original
    _PLUGGED.clear()
