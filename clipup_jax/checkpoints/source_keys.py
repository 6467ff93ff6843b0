"""Key bookkeeping shared by the importers: every problem with a source file is reported at once."""

from __future__ import annotations

import numpy as np

from clipup_jax.checkpoints.errors import CheckpointError, key_list


class SourceKeys:
    """Pops source tensors by name, recording keys that are absent; `finish` also reports left-overs.

    `kind` says what the file was expected to be, for the error message.
    """

    def __init__(self, tensors: dict[str, np.ndarray], source: str, kind: str):
        self.tensors = dict(tensors)
        self.source = source
        self.kind = kind
        self.missing: list[str] = []

    def take(self, key: str) -> np.ndarray | None:
        if key not in self.tensors:
            self.missing.append(key)
            return None
        return self.tensors.pop(key)

    def pop_optional(self, key: str) -> np.ndarray | None:
        return self.tensors.pop(key, None)

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {message}")

    def finish(self) -> None:
        problems = []
        if self.missing:
            problems.append(f"missing {key_list(self.missing)}")
        if self.tensors:
            problems.append(f"unexpected {key_list(self.tensors)}")
        if problems:
            raise self.fail(f"not {self.kind}: " + "; ".join(problems))
