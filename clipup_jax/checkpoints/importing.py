"""Turn a dense CLIP from another ecosystem into a clipup checkpoint directory."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable

import numpy as np

from clipup_jax.checkpoints import big_vision, hf, openai
from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.checkpoints.format import check_tokenizer_fits, save_checkpoint
from clipup_jax.checkpoints.tensor_files import read_tensors
from clipup_jax.config import ConfigError, ModelConfig
from clipup_jax.data import tokenizer as tokenizer_lib
from clipup_jax.storage import Path, PathLike, absolute, as_path, local_copy

SOURCES = ("openai", "open_clip", "hf", "big_vision")


@dataclasses.dataclass(frozen=True)
class ImportOptions:
    model: str | None = None  # a preset name: supplies head counts and checks every size
    tokenizer: pathlib.Path | None = None
    activation: str | None = None
    ln_eps: float | None = None


@dataclasses.dataclass(frozen=True)
class Imported:
    config: ModelConfig
    params: dict[str, np.ndarray]
    tokenizer: pathlib.Path | None  # a bpe .txt.gz file or an HF tokenizer directory
    notes: tuple[str, ...] = ()


def _from_openai(src: pathlib.Path, opts: ImportOptions) -> Imported:
    # OpenAI's released models are all QuickGELU with LayerNorm eps 1e-5.
    return _openai_layout(src, opts, opts.activation or "quick_gelu", opts.ln_eps or 1e-5, None)


def _from_open_clip(src: pathlib.Path, opts: ImportOptions) -> Imported:
    config_file = src.parent / openai.OPEN_CLIP_CONFIG
    arch = openai.read_open_clip_config(config_file) if config_file.is_file() else None
    activation = opts.activation or (arch.activation if arch else None)
    if activation is None:
        raise CheckpointError(
            f"{src}: no {openai.OPEN_CLIP_CONFIG} beside it says which activation the weights need; "
            "pass --activation (quick_gelu for OpenAI/-quickgelu weights, gelu for LAION)"
        )
    return _openai_layout(src, opts, activation, opts.ln_eps or (arch.ln_eps if arch else 1e-5), arch)


def _openai_layout(src: pathlib.Path, opts: ImportOptions, activation: str, ln_eps: float,
                   arch: openai.OpenClipArch | None) -> Imported:
    tensors = read_tensors(src)
    vision, text = (arch.vision, arch.text) if arch else (None, None)
    cfg = openai.infer_config(tensors, str(src), activation, ln_eps, vision, text)
    notes = []
    if opts.model is not None:
        cfg = openai.check_against_preset(cfg, opts.model, str(src))
    elif arch is None:
        notes.append(f"head counts from OpenAI's width/64 rule: vision {cfg.vision.heads}, text {cfg.text.heads} "
                     "(pass --model PRESET if the file differs)")
    if arch is not None and arch.hf_tokenizer:
        notes.append(f"the text tower reads ids of the Hugging Face tokenizer {arch.hf_tokenizer!r}, which this "
                     "project's CLIP BPE tokenizer does not produce: give it ids from that tokenizer")
    return Imported(cfg, openai.convert_state_dict(tensors, cfg, str(src)), opts.tokenizer, tuple(notes))


def _from_hf(src: pathlib.Path, opts: ImportOptions) -> Imported:
    if not src.is_dir():
        raise CheckpointError(f"{src}: --from hf expects a model directory (config.json + weights)")
    cfg = hf.read_hf_config(src)
    overrides = {k: v for k, v in (("activation", opts.activation), ("ln_eps", opts.ln_eps)) if v is not None}
    if overrides:
        cfg = cfg.replace(**overrides).validate()
    tensors = hf.to_openai_layout(hf.read_hf_weights(src), str(src))
    if opts.model is not None:
        openai.check_against_preset(cfg, opts.model, str(src))
    tokenizer = opts.tokenizer
    if tokenizer is None and all((src / f).is_file() for f in hf.TOKENIZER_FILES):
        tokenizer = src
    return Imported(cfg, openai.convert_state_dict(tensors, cfg, str(src)), tokenizer)


def _from_big_vision(src: pathlib.Path, opts: ImportOptions) -> Imported:
    cfg, params = big_vision.convert(src, activation=opts.activation, ln_eps=opts.ln_eps)
    if opts.model is not None:
        raise CheckpointError("--model does not apply to big_vision files: their architecture comes from the file")
    return Imported(cfg, params, opts.tokenizer)


IMPORTERS: dict[str, Callable[[pathlib.Path, ImportOptions], Imported]] = {
    "openai": _from_openai,
    "open_clip": _from_open_clip,
    "hf": _from_hf,
    "big_vision": _from_big_vision,
}


def import_checkpoint(source: str, src: PathLike, out: PathLike, opts: ImportOptions,
                      force: bool = False) -> Imported:
    """Reads `src` in the `source` layout and writes a self-describing checkpoint at `out` (either may be on
    gs://: the readers of weight files need local files, so a source in a store is downloaded first)."""
    if source not in IMPORTERS:
        raise CheckpointError(f"unknown source format {source!r}; expected one of {', '.join(SOURCES)}")
    src, out = as_path(src), as_path(out)
    if out.exists() and not force:  # fail before reading a multi-GB file
        raise CheckpointError(f"{out}: already exists (pass --force to replace it)")
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    with local_copy(src, siblings=(openai.OPEN_CLIP_CONFIG,)) as local:
        try:
            return _import(source, src, pathlib.Path(local), out, opts, force)
        except CheckpointError as e:  # name the user's path, not the download's
            if local == src:
                raise
            raise CheckpointError(str(e).replace(str(local), str(src))) from e


def _import(source: str, src: Path, local: pathlib.Path, out: Path, opts: ImportOptions, force: bool) -> Imported:
    try:
        imported = IMPORTERS[source](local, opts)
    except ConfigError as e:
        raise CheckpointError(f"{src}: {e}") from e
    tokenizer_files, entry = None, None
    if imported.tokenizer is not None:
        tok = tokenizer_lib.Tokenizer.from_path(imported.tokenizer)
        check_tokenizer_fits(imported.tokenizer, tok.vocab_size, imported.config)
        tokenizer_files = tokenizer_lib.source_files(imported.tokenizer)
        entry = None if imported.tokenizer.is_dir() else imported.tokenizer.name
    save_checkpoint(out, imported.config, imported.params, force=force, tokenizer_files=tokenizer_files,
                    tokenizer_entry=entry, source={"format": source, "path": str(absolute(src))})
    return imported
