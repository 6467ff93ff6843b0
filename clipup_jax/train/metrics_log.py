"""Where training metrics go: the console (with rate and ETA), TensorBoard event files, a JSONL file.

Only process 0 writes. TensorBoard events are framed by tensorboard's own record writer (no TensorFlow needed)
into a `storage.PartLog`: its `EventFileWriter` appends through fsspec, which an object store cannot do.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
import time
from typing import Iterable, Mapping, TextIO

import numpy as np

from clipup_jax.storage import LineLog, PartLog, Path, PathLike, as_path
from clipup_jax.train.checkpointing import SaveFailed, error_reason

_LOGS = itertools.count()  # event file names unique within a process (two logs opened in one second)


class MetricsLog:
    def __init__(self, workdir: Path, total_steps: int, enabled: bool = True, stream: TextIO | None = None):
        self.total_steps = total_steps
        self.enabled = enabled
        self.stream = stream  # None: sys.stdout as it is when a line is printed (a redirect after import holds)
        self._start = time.perf_counter()
        self._last: tuple[float, int] | None = None
        self._tb = None
        self._jsonl = None
        if enabled:
            from tensorboard.compat.proto import event_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter

            (workdir / "tb").mkdir(parents=True, exist_ok=True)
            stem = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_LOGS):03d}"
            version = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()
            self._events = PartLog(workdir / "tb", lambda part: f"{stem}.{part:06d}")
            self._tb = RecordWriter(self._events)
            self._tb.write(version)  # the first record of the local file, and of the first part on a store
            self._jsonl = LineLog(workdir / "metrics.jsonl")  # earlier runs' records precede this run's

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        try:
            self._tb.write(event_pb2.Event(wall_time=time.time(), step=step,
                                           summary=summary_pb2.Summary(value=values)).SerializeToString())
            self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}))
        except OSError as e:  # a full local disk
            raise SaveFailed(f"{self._jsonl.path.parent}: writing the metrics logs failed ({error_reason(e)})") from e

    def progress(self, step: int, scalars: Mapping[str, float], examples_per_step: int) -> dict[str, float]:
        """Prints one progress line; returns the rate figures so they can be logged too."""
        now = time.perf_counter()
        rates: dict[str, float] = {}
        if self._last is not None and step > self._last[1]:
            dt = (now - self._last[0]) / (step - self._last[1])
            rates = {"step_time_s": dt, "examples_per_s": examples_per_step / dt}
            eta = dt * (self.total_steps - step)
            rates["eta_s"] = eta
        self._last = (now, step)
        if self.enabled:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in scalars.items())
            rate = (f" | {rates['examples_per_s']:.1f} ex/s, {rates['step_time_s'] * 1e3:.0f} ms/step, "
                    f"ETA {_duration(rates['eta_s'])}") if rates else ""
            print(f"[step {step}/{self.total_steps}] {shown}{rate}", file=self.stream or sys.stdout, flush=True)
        return rates

    def this_run(self) -> dict[str, list[dict[str, float]]]:
        """This run's records: {"train": [...], "eval": [...]}, eval keys unprefixed; empty on processes that do
        not write. Read back from a local file, so a long run's host memory does not grow with every log line."""
        return _history(self._jsonl.this_run()) if self.enabled else {"train": [], "eval": []}

    def flush(self) -> None:
        """Makes what is logged durable (on an object store, where lines are not appended one by one); raises
        SaveFailed, naming the file, when the store fails."""
        if self.enabled:
            try:
                self._tb.flush()
                self._jsonl.flush()
            except Exception as e:
                raise SaveFailed(f"{self._jsonl.path.parent}: writing the metrics logs failed "
                                 f"({error_reason(e)})") from e

    def close(self, flush: bool = True) -> None:
        """Flushes and closes; `flush=False` when the store already failed (what is unwritten stays so)."""
        if self._tb is not None:
            if flush:
                self.flush()
            self._events.close(flush=False)
            self._jsonl.close(flush=False)


def read_history(workdir: PathLike) -> dict[str, list[dict[str, float]]]:
    """Every run's records of a workdir (resumes included), as `MetricsLog.this_run` returns one run's; a step
    logged again after a relaunch keeps its last record."""
    history = _history(as_path(workdir).joinpath("metrics.jsonl").read_text().splitlines())
    return {kind: list({r["step"]: r for r in records}.values()) for kind, records in history.items()}


def _history(lines: Iterable[str]) -> dict[str, list[dict[str, float]]]:
    history: dict[str, list[dict[str, float]]] = {"train": [], "eval": []}
    for line in lines:
        record = json.loads(line)
        if any(k.startswith("eval/") for k in record):
            history["eval"].append({k.removeprefix("eval/"): v for k, v in record.items()})
        else:
            history["train"].append(record)
    return history


def _fmt(v: float) -> str:
    v = float(v)
    return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def scalar_metrics(metrics: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Scalars as they are; per-expert load vectors as one scalar per expert."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 0:
            out[key] = float(value)
        else:
            out.update({f"{key}/{i}": float(v) for i, v in enumerate(value.reshape(-1))})
    return out
