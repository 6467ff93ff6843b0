"""The on-disk checkpoint: an Orbax tree of params, `clipup.json`, and the tokenizer files.

    DIR/
      clipup.json        model config, kind, source, dtype, tokenizer location, optimizer state kind
      params/            Orbax PyTree, keyed like the model ('visual' / 'encoder' / 'layers' / ... nested dicts)
      opt_state/         optional Orbax PyTree of Adam moments: {count, mu, nu}, mu/nu keyed like params/
      tokenizer/         the tokenizer files, when the source had them

Format versions: 2 keeps repeated blocks stacked on a leading `layers` axis, as the model holds them
(models/encoder.py); 1, written before 2026-12-06, kept one subtree per block (`encoder/blocks/<i>`). Version 1
checkpoints, converted or `clipup-train` workdirs, still load: their blocks are stacked on reading.

A checkpoint describes itself: `load_checkpoint(DIR)` needs no other input. DIR may be local or on an object
store (gs://). Writes go to a sibling temporary directory made complete first, so a crash or an error never
leaves a half-written DIR: locally it is then renamed into place; a store has no directory rename, so it is copied
into place with `clipup.json` last, and a reader (which needs `clipup.json`) sees the whole checkpoint or none.

Leaves may be `LazyStack`s: arrays made one leading-axis slice at a time (an
upcycled expert stack). The writer streams them slice by slice into Orbax, so a
converter never holds its whole output in host memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import io
import itertools
import json
import pathlib
import shutil
import time
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.checkpoints.train_workdir import is_train_workdir, read_train_params
from clipup_jax.checkpoints.lazy import LazyStack
from clipup_jax.checkpoints.params import check_params, from_blocks
from clipup_jax.storage import Path, PathLike, absolute, as_path, copy_tree, is_remote, remove_tree
from clipup_jax.models.param_tree import abstract_block_params, abstract_params, flatten, nest
from clipup_jax.config import ConfigError, ModelConfig

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: per-block subtrees, stacked when read
METADATA_FILE = "clipup.json"
PARAMS_DIR = "params"
OPT_STATE_DIR = "opt_state"
TOKENIZER_DIR = "tokenizer"
STREAM_WINDOW = 4  # slices in flight while streaming: enough to keep tensorstore's writers busy


@dataclasses.dataclass(frozen=True)
class AdamMoments:
    """optax Adam's state: first and second moments keyed like the params, and the step count."""

    count: int
    mu: Mapping[str, np.ndarray | LazyStack]
    nu: Mapping[str, np.ndarray | LazyStack]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: ModelConfig
    params: dict[str, np.ndarray]
    metadata: dict[str, Any]
    opt_state: AdamMoments | None = None

    @property
    def tokenizer_path(self) -> Path | None:
        """The file or directory to hand to `Tokenizer.from_path`, or None."""
        return tokenizer_path(self.path, self.metadata)

    def tokenizer(self, given: PathLike | None = None, flag: str = "--tokenizer"):
        """`given` (a user's tokenizer file or directory) or else the checkpoint's own, checked against the text
        tower: fewer tokens than its embedding rows is fine (ids index into the table), more is refused."""
        from clipup_jax.data.tokenizer import Tokenizer  # data/ is heavy; only text paths need it

        path = given if given is not None else self.tokenizer_path
        if path is None:
            raise CheckpointError(f"{self.path}: has no tokenizer; pass {flag} FILE (a bpe .txt.gz, or a directory "
                                  "with vocab.json and merges.txt)")
        if not as_path(path).exists():
            raise CheckpointError(f"{flag} {path}: no such file or directory")
        tok = Tokenizer.from_path(path)
        check_tokenizer_fits(path, tok.vocab_size, self.config)
        return tok


def check_tokenizer_fits(path: pathlib.Path, vocab_size: int, config: ModelConfig) -> None:
    """A tokenizer with fewer tokens than the text tower's embedding rows is fine (its ids index into the table);
    more is refused."""
    if vocab_size > config.text.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {vocab_size} tokens, more than the {config.text.vocab_size} "
                              "rows of the text tower's token embedding")


def tokenizer_path(directory: Path, metadata: Mapping[str, Any]) -> Path | None:
    """Where the checkpoint at `directory` (with its `clipup.json` `metadata`) keeps its tokenizer, or None."""
    rel = metadata.get("tokenizer")
    return None if rel is None else _inside(directory, rel)


def check_output(out: PathLike, force: bool) -> None:
    """Refuses an output that exists (unless `force`) or lies below a file, before any expensive work (missing
    parent directories are made by `atomic_directory`; a store has none)."""
    out = as_path(out)
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists (pass --force to replace it)")
    if is_remote(out):
        return
    existing = next(p for p in pathlib.Path(out).absolute().parents if p.exists())
    if not existing.is_dir():
        raise CheckpointError(f"{existing}: is not a directory, so {out} cannot be made below it")


def atomic_directory(out: PathLike, force: bool, fill: Callable[[Path], None],
                     last: Sequence[str] = (METADATA_FILE,)) -> None:
    """Runs `fill(tmp)` and renames `tmp` to `out`, making `out`'s missing parent directories; on any error
    nothing is left behind (the parents it made included). On an object store see `_publish` (`last`: the files
    a reader looks for first, written after all others there)."""
    check_output(out, force)
    if is_remote(out):
        return _publish(as_path(out), fill, last)
    out = pathlib.Path(out)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    made = [p for p in reversed(out.absolute().parents) if not p.exists()]  # outermost first
    try:
        for parent in made:
            parent.mkdir()
        tmp.mkdir()
        fill(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        _remove(tmp)
        for parent in reversed(made):  # innermost first; only those this call made, and only if still empty
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
        raise


def _publish(out: Path, fill: Callable[[Path], None], last: Sequence[str]) -> None:
    """`atomic_directory` on an object store, which cannot rename a directory: `fill` writes a temporary sibling
    prefix, which is then copied to `out` with the `last` files (a checkpoint's `clipup.json`, an export's config)
    last (a replaced `out` loses them first). A reader needs them, so it never takes a partial `out` for a
    checkpoint; a failure removes the temporary prefix and any partial `out`."""
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        fill(tmp)
        if out.exists():
            for name in last:  # from here on `out` is no checkpoint until it is whole
                (out / name).unlink(missing_ok=True)
            remove_tree(out)
        try:
            copy_tree(tmp, out, last=last)
        except BaseException:
            remove_tree(out)
            raise
    finally:
        remove_tree(tmp)


def _remove(tmp: pathlib.Path, attempts: int = 50) -> None:
    """Deletes a failed write's directory; retries while a writer thread of the failed save still finishes."""
    for _ in range(attempts):
        if not tmp.exists():
            return
        try:
            shutil.rmtree(tmp)
        except OSError:
            time.sleep(0.1)
    shutil.rmtree(tmp, ignore_errors=True)


def atomic_file(out: PathLike, write: Callable[[Any], None]) -> None:
    """Writes a single file through a temporary sibling, so readers never see a partial file; missing parent
    directories are made, as for checkpoints. On an object store the file is written to memory and uploaded in
    one request: an object appears whole or not at all (a streamed upload would commit a failed write's part)."""
    if is_remote(out):
        buffer = io.BytesIO()
        write(buffer)
        as_path(out).write_bytes(buffer.getvalue())
        return
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(out: PathLike, config: ModelConfig, params: Mapping[str, np.ndarray | LazyStack], *,
                    source: Mapping[str, Any], tokenizer_files: Iterable[PathLike] | None = None,
                    tokenizer_entry: str | None = None, opt_state: AdamMoments | None = None,
                    force: bool = False) -> Path:
    """Writes a checkpoint atomically, streaming `LazyStack` leaves slice by slice.

    `tokenizer_files` are copied into `tokenizer/`; `tokenizer_entry` is the file
    among them (or None for the directory itself) that a Tokenizer loads from.
    """
    out = as_path(out)
    config.validate()
    where = str(source.get("path", out))
    check_params(params, config, where)
    if opt_state is not None:
        check_params(opt_state.mu, config, f"{where} (Adam mu)")
        check_params(opt_state.nu, config, f"{where} (Adam nu)")

    def fill(tmp: Path) -> None:
        _write_tree(absolute(tmp) / PARAMS_DIR, {k: _leaf(v) for k, v in params.items()})
        if opt_state is not None:
            _write_tree(absolute(tmp) / OPT_STATE_DIR, {"count": np.asarray(opt_state.count, np.int32),
                                                          **{f"mu/{k}": _leaf(v) for k, v in opt_state.mu.items()},
                                                          **{f"nu/{k}": _leaf(v) for k, v in opt_state.nu.items()}})
        tokenizer_rel = None
        if tokenizer_files:
            (tmp / TOKENIZER_DIR).mkdir(parents=True)
            for f in map(as_path, tokenizer_files):  # bytes, not a copy: the two may be on different stores
                (tmp / TOKENIZER_DIR / f.name).write_bytes(f.read_bytes())
            tokenizer_rel = TOKENIZER_DIR if tokenizer_entry is None else f"{TOKENIZER_DIR}/{tokenizer_entry}"
        metadata = metadata_dict(config, source, tokenizer_rel, None if opt_state is None else "adam")
        write_metadata(tmp, metadata)

    atomic_directory(out, force, fill)
    return out


def metadata_dict(config: ModelConfig, source: Mapping[str, Any], tokenizer: str | None,
                  optimizer_state: str | None) -> dict[str, Any]:
    """The `clipup.json` of a converted checkpoint or a training workdir: everything needed to load it."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": "sparse" if config.is_sparse else "dense",
        "model": config.to_dict(),
        "dtype": "float32",
        "source": dict(source),
        "tokenizer": tokenizer,
        "optimizer_state": optimizer_state,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_metadata(directory: Path, metadata: Mapping[str, Any]) -> None:
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def read_metadata(path: PathLike) -> tuple[dict[str, Any], ModelConfig]:
    path = as_path(path)
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a clipup checkpoint (no {METADATA_FILE})")
    try:
        metadata = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file}: invalid JSON ({e})") from e
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{meta_file}: format_version {metadata.get('format_version')!r}, expected one of "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    try:
        config = ModelConfig.from_dict(metadata["model"])
    except (KeyError, ConfigError, TypeError) as e:
        raise CheckpointError(f"{meta_file}: bad model config ({e})") from e
    return metadata, config


def load_checkpoint(path: PathLike, opt_state: bool = True) -> Checkpoint:
    """Params (and Adam moments, when stored and `opt_state`) come back as host numpy arrays; `path` local or
    on an object store."""
    path = as_path(path)
    metadata, config = read_metadata(path)
    if metadata.get("tokenizer") is not None:
        _inside(path, metadata["tokenizer"])  # validate before doing any work
    per_block = metadata["format_version"] == 1
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
              for k, v in (abstract_block_params(config) if per_block else abstract_params(config)).items()}

    def stacked(params: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
        if per_block:
            return from_blocks(params, config, what)  # checks the per-block names first
        check_params(params, config, what)
        return params

    if is_train_workdir(path):  # a clipup-train workdir: the latest complete step
        params, step = read_train_params(path, shapes)
        return Checkpoint(path, config, stacked(params, str(path)), {**metadata, "step": step})
    params = stacked(_read_tree(path / PARAMS_DIR, shapes, "params"), str(path))
    moments = None
    if opt_state and (path / OPT_STATE_DIR).exists():
        flat = _read_tree(path / OPT_STATE_DIR, {"count": jax.ShapeDtypeStruct((), np.int32),
                                                 **{f"mu/{k}": v for k, v in shapes.items()},
                                                 **{f"nu/{k}": v for k, v in shapes.items()}}, "Adam moments")
        moments = AdamMoments(int(flat.pop("count")),
                              stacked({k[3:]: v for k, v in flat.items() if k.startswith("mu/")}, f"{path} (Adam mu)"),
                              stacked({k[3:]: v for k, v in flat.items() if k.startswith("nu/")}, f"{path} (Adam nu)"))
    return Checkpoint(path, config, params, metadata, moments)


def _read_tree(directory: pathlib.Path, shapes: Mapping[str, jax.ShapeDtypeStruct], what: str) -> dict[str, np.ndarray]:
    try:
        ckptr = ocp.StandardCheckpointer()
        restored = ckptr.restore(absolute(directory), nest(shapes))
        ckptr.close()
    except Exception as e:
        raise CheckpointError(f"{directory}: cannot restore {what} ({type(e).__name__}: {e})") from e
    return {k: np.asarray(v) for k, v in flatten(restored).items()}


def _leaf(value: Any) -> np.ndarray | LazyStack:
    return value if isinstance(value, LazyStack) else np.asarray(value, np.float32)


def _write_tree(directory: pathlib.Path, leaves: Mapping[str, np.ndarray | LazyStack]) -> None:
    """One Orbax PyTree save; plain arrays are written without Orbax's defensive copy (nothing mutates them)."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (LazyStack, _LazyStackHandler()),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    ckptr.save(directory, args=ocp.args.PyTreeSave(nest(leaves)))
    ckptr.close()


class _LazyStackHandler(ocp.type_handlers.NumpyHandler):
    """Writes a `LazyStack` a chunk at a time, at most `STREAM_WINDOW` chunks alive at once.

    Stored exactly as Orbax stores a numpy array (type 'np.ndarray', chunked along
    axis 0), so `StandardCheckpointer.restore` reads it back like any other leaf.
    """

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def serialize(self, values: Any, infos: Any, args: Any = None) -> list[Any]:
        return [ocp.future.CommitFutureAwaitingContractedSignals(self._stream(values, infos), name="lazy_stack")]

    async def _stream(self, values: list[LazyStack], infos: list[Any]) -> None:
        pending: set[asyncio.Future] = set()
        try:
            await self._write_all(values, infos, pending)
        except BaseException:
            await asyncio.gather(*pending, return_exceptions=True)  # no write may outlive the failed save
            raise

    async def _write_all(self, values: list[LazyStack], infos: list[Any], pending: set[asyncio.Future]) -> None:
        for value, info in zip(values, infos):
            await info.await_path_creation()
            if jax.process_index() != 0:
                continue
            spec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=value.shape, local_shape=value.shape,
                dtype=value.dtype, process_index=jax.process_index() if info.is_ocdbt_checkpoint else None,
                arg=_chunking(value))
            store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
            chunk = store.chunk_layout.write_chunk.shape  # whole chunks per write: no read-modify-write
            for corner in itertools.product(*(range(0, n, c) for n, c in zip(value.shape, chunk))):
                while len(pending) >= STREAM_WINDOW:
                    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    pending.difference_update(done)
                    for d in done:
                        d.result()
                index = tuple(slice(start, start + c) for start, c in zip(corner, chunk))
                pending.add(asyncio.ensure_future(_awaited(
                    store[index].write(value[index], can_reference_source_data_indefinitely=True))))
        await asyncio.gather(*pending)


def _chunking(value: LazyStack) -> Any:
    """One chunk per innermost lazy slice (an expert, also in a stacked layer) when such a slice reaches Orbax's
    1 MiB chunk floor; else the whole (small) stack as one chunk."""
    part = int(np.prod(value.shape[value.lazy_axes:])) * value.dtype.itemsize
    if part >= 2**20:
        return ocp.type_handlers.SaveArgs(chunk_byte_size=part, shard_axes=tuple(range(value.lazy_axes)))
    return ocp.type_handlers.SaveArgs()


async def _awaited(future: Any) -> Any:
    return await future


def _inside(root: Path, rel: str) -> Path:
    """A metadata path, refused if it would leave the checkpoint directory."""
    target = absolute(root / rel)
    if pathlib.PurePath(rel).is_absolute() or ".." in pathlib.PurePath(rel).parts \
            or not target.is_relative_to(absolute(root)):
        raise CheckpointError(f"{root / METADATA_FILE}: path {rel!r} escapes the checkpoint directory")
    if not target.exists():
        raise CheckpointError(f"{root}: {rel} named in {METADATA_FILE} is missing")
    return target


