"""The on-disk checkpoint: an Orbax tree of params, `clipup.json`, and the tokenizer files.

    DIR/
      clipup.json        model config, kind, source, dtype, tokenizer location
      params/            Orbax (StandardCheckpointer) tree, keyed like the model
      tokenizer/         the tokenizer files, when the source had them

A checkpoint describes itself: `load_checkpoint(DIR)` needs no other input.
Writes go to a sibling temporary directory that is renamed into place only when
complete, so a crash or an error never leaves a half-written DIR.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import shutil
import uuid
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.checkpoints.params import abstract_params, check_params
from clipup_jax.config import ConfigError, ModelConfig

FORMAT_VERSION = 1
METADATA_FILE = "clipup.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: pathlib.Path
    config: ModelConfig
    params: dict[str, np.ndarray]
    metadata: dict[str, Any]

    @property
    def tokenizer_path(self) -> pathlib.Path | None:
        """The file or directory to hand to `Tokenizer.from_path`, or None."""
        rel = self.metadata.get("tokenizer")
        return None if rel is None else _inside(self.path, rel)


def atomic_directory(out: pathlib.Path, force: bool, fill: Callable[[pathlib.Path], None]) -> None:
    """Runs `fill(tmp)` and renames `tmp` to `out`; on any error nothing is left behind."""
    out = pathlib.Path(out)
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists (pass --force to replace it)")
    if not out.parent.is_dir():
        raise CheckpointError(f"{out.parent}: output parent directory does not exist")
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    try:
        tmp.mkdir()
        fill(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_file(out: pathlib.Path, write: Callable[[Any], None]) -> None:
    """Writes a single file through a temporary sibling, so readers never see a partial file."""
    out = pathlib.Path(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(out: str | pathlib.Path, config: ModelConfig, params: Mapping[str, np.ndarray], *,
                    source: Mapping[str, Any], tokenizer_files: list[pathlib.Path] | None = None,
                    tokenizer_entry: str | None = None, force: bool = False) -> pathlib.Path:
    """Writes a checkpoint atomically.

    `tokenizer_files` are copied into `tokenizer/`; `tokenizer_entry` is the file
    among them (or None for the directory itself) that a Tokenizer loads from.
    """
    out = pathlib.Path(out)
    config.validate()
    check_params(params, config, str(source.get("path", out)))

    def fill(tmp: pathlib.Path) -> None:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp.resolve() / PARAMS_DIR, _nest({k: np.asarray(v, np.float32) for k, v in params.items()}))
        ckptr.wait_until_finished()
        ckptr.close()
        tokenizer_rel = None
        if tokenizer_files:
            (tmp / TOKENIZER_DIR).mkdir()
            for f in tokenizer_files:
                shutil.copy2(f, tmp / TOKENIZER_DIR / pathlib.Path(f).name)
            tokenizer_rel = TOKENIZER_DIR if tokenizer_entry is None else f"{TOKENIZER_DIR}/{tokenizer_entry}"
        metadata = {
            "format_version": FORMAT_VERSION,
            "kind": "sparse" if config.is_sparse else "dense",
            "model": config.to_dict(),
            "dtype": "float32",
            "source": dict(source),
            "tokenizer": tokenizer_rel,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")

    atomic_directory(out, force, fill)
    return out


def read_metadata(path: str | pathlib.Path) -> tuple[dict[str, Any], ModelConfig]:
    path = pathlib.Path(path)
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a clipup checkpoint (no {METADATA_FILE})")
    try:
        metadata = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file}: invalid JSON ({e})") from e
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: format_version {metadata.get('format_version')!r}, expected {FORMAT_VERSION}")
    try:
        config = ModelConfig.from_dict(metadata["model"])
    except (KeyError, ConfigError, TypeError) as e:
        raise CheckpointError(f"{meta_file}: bad model config ({e})") from e
    return metadata, config


def load_checkpoint(path: str | pathlib.Path) -> Checkpoint:
    """Params come back as host numpy arrays; callers place them on devices."""
    path = pathlib.Path(path)
    metadata, config = read_metadata(path)
    if metadata.get("tokenizer") is not None:
        _inside(path, metadata["tokenizer"])  # validate before doing any work
    abstract = _nest({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in abstract_params(config).items()})
    try:
        ckptr = ocp.StandardCheckpointer()
        restored = ckptr.restore((path / PARAMS_DIR).resolve(), abstract)
        ckptr.close()
    except Exception as e:
        raise CheckpointError(f"{path / PARAMS_DIR}: cannot restore params ({type(e).__name__}: {e})") from e
    params = {k: np.asarray(v) for k, v in _flatten(restored).items()}
    check_params(params, config, str(path))
    return Checkpoint(path, config, params, metadata)


def _inside(root: pathlib.Path, rel: str) -> pathlib.Path:
    """A metadata path, refused if it would leave the checkpoint directory."""
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()) or pathlib.PurePath(rel).is_absolute():
        raise CheckpointError(f"{root / METADATA_FILE}: path {rel!r} escapes the checkpoint directory")
    if not target.exists():
        raise CheckpointError(f"{root}: {rel} named in {METADATA_FILE} is missing")
    return target


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out
