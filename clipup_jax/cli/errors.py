"""One error-reporting policy for every CLI: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from clipup_jax import workarounds
from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.config import ConfigError
from clipup_jax.train.lease import WorkdirBusy

# Errors whose message already names the file, key, shape or field at fault.
USER_ERRORS = (CheckpointError, ConfigError, FileNotFoundError, ValueError, TimeoutError, WorkdirBusy)


def run_cli(prog: str, body: Callable[[], int | None], abandon: tuple[type[Exception], ...] = ()) -> NoReturn:
    """Every CLI's body runs here: with the work-arounds applied and routine library logging quieted, and
    its user errors turned into one line. After an error of an `abandon` type the process ends without joining
    the threads still blocked on a failed store (`workarounds.exit_abandoning_threads`)."""
    workarounds.apply()
    _quiet_libraries()
    try:
        code = body() or 0
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}".replace("\n", " "), file=sys.stderr)
        code = 2
        if isinstance(e, abandon):
            workarounds.exit_abandoning_threads(code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


class Parser(argparse.ArgumentParser):
    """argparse with the same one-line error format as `run_cli` (no usage dump), and descriptions and epilogs
    shown as written (their usage examples and lists keep their lines)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _quiet_libraries() -> None:
    """Orbax and grain log routine absl warnings (read-only managers, missing optional metadata) that would
    bury the progress lines; errors still show."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
