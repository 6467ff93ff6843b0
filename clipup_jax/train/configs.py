"""Experiment configs: a Python file exposing `get_config()` (or a run's saved `config.json`), plus
`--config.a.b=value` overrides.

Only the file the user names is executed. Overrides must name an existing field
(a typo is an error, never a silent new key) and keep its type.

A checkpoint is enough: with `config.init.checkpoint` set, the model's architecture comes from the checkpoint's
own `clipup.json`, not from the experiment file (whose recipe model may be another size); the file's MoE plans
still apply to a dense checkpoint, which is then upcycled on the fly. A `--config.model.*` override the checkpoint
contradicts is an error naming every such field with both values.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import pathlib
import types
from typing import Any, Sequence

import ml_collections

from clipup_jax.config import TOWERS, ModelConfig, model_config
from clipup_jax.storage import as_path

PREFIX = "--config."


class ConfigFileError(ValueError):
    """A config file or override that cannot be used; the message names the file or field."""


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(`--config.a.b=v` overrides, the other arguments) of a command line."""
    return [a for a in argv if a.startswith(PREFIX)], [a for a in argv if not a.startswith(PREFIX)]


def run_entry(path: str | pathlib.Path, what: str, entry: str) -> tuple[types.ModuleType, Any]:
    """Executes exactly the file the user named (an experiment, sweep or upcycling file) and calls its `entry`
    function; (the module, what `entry()` returned). Any error in the user's code is one line naming the file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigFileError(f"{path}: {what} file not found")
    spec = importlib.util.spec_from_file_location(f"clipup_{what}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not callable(getattr(module, entry, None)):
            raise ConfigFileError(f"{path}: defines no {entry}()")
        return module, getattr(module, entry)()
    except ConfigFileError:
        raise
    except Exception as e:
        raise ConfigFileError(f"{path}: failed to load ({type(e).__name__}: {e})") from e


def load_config(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """An experiment file's `get_config()`, or a `.json` config as a training run saves it (local or gs://, as
    a workdir is), with `overrides`."""
    path = as_path(path)
    if path.suffix == ".json":
        try:
            config = ml_collections.ConfigDict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigFileError(f"{path}: config file not found") from None
        except (OSError, ValueError) as e:
            raise ConfigFileError(f"{path}: not a JSON config ({e})") from e
    else:
        _, config = run_entry(path, "config", "get_config")
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigFileError(f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict")
    for override in overrides:
        apply_override(config, override)
    if path.suffix != ".json" and config.get("init") and config.init.get("checkpoint"):
        config.model = model_from_init(config, overrides).to_dict()  # a saved config.json holds it already
    return config


def model_from_init(config: ml_collections.ConfigDict, overrides: Sequence[str] = ()) -> ModelConfig:
    """The model of a run initialised from `config.init.checkpoint`: the checkpoint's, with `config.model`'s MoE
    plans on the towers of a dense checkpoint (the upcycle on the fly). `overrides` are the command line's: one
    of `config.model` the result contradicts is an error listing them all (override -> checkpoint)."""
    from clipup_jax.checkpoints.format import read_metadata  # imports Orbax: loaded only when a run needs it

    init = read_metadata(config.init.checkpoint)[1]
    wanted = model_config(config)
    model = init
    if not init.is_sparse:
        model = init.replace(**{field: dataclasses.replace(getattr(init, field), moe=getattr(wanted, field).moe)
                                for _, field in TOWERS.values()})
    resolved = ml_collections.ConfigDict(model.to_dict())
    contradicted = []
    for override in overrides:
        dotted = override.removeprefix(PREFIX).split("=", 1)[0]
        if not dotted.startswith("model."):
            continue
        asked, got = config, resolved
        for part in dotted.split("."):
            asked = asked[part]
        for part in dotted.split(".")[1:]:
            got = got.get(part) if isinstance(got, ml_collections.ConfigDict) else None
        if asked != got:
            contradicted.append(f"{dotted}: {asked!r} -> {got!r}")
    if contradicted:
        raise ConfigFileError(f"config.init.checkpoint={config.init.checkpoint} gives the model; these overrides "
                              f"contradict it (override -> checkpoint): {'; '.join(contradicted)}")
    return model


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """`--config.optim.lr=3e-4` (or `optim.lr=3e-4`): the field must exist; the value keeps its type."""
    text = override.removeprefix(PREFIX)
    if "=" not in text:
        raise ConfigFileError(f"override {override!r}: expected --config.field=value")
    dotted, raw = text.split("=", 1)
    *parents, leaf = dotted.split(".")
    node = config
    for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigFileError(f"override {override!r}: config has no field {'.'.join(parents[:i + 1])!r}")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigFileError(f"override {override!r}: config has no field {dotted!r} (known here: {known})")
    current = node[leaf]
    value = raw if isinstance(current, str) else _parse(raw)  # a string field takes the text as written ("none")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if current is not None and value is not None and not isinstance(current, ml_collections.ConfigDict) \
            and type(value) is not type(current) and not (isinstance(current, (list, tuple)) and isinstance(value, (list, tuple))):
        raise ConfigFileError(f"override {override!r}: {dotted} is {type(current).__name__}, got {type(value).__name__}")
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigFileError(f"override {override!r}: {e}") from e


def _parse(raw: str):
    if raw.lower() in ("none", "null"):
        return None
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare string
