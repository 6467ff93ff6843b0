"""Flat parameter dicts (models/param_tree.py's two views) and the model they fill.

Checkpoints, the train state and the model hold the stacked layout; importers, exporters and upcycling work on
the per-block view and cross over with `from_blocks` / `to_blocks`. The checker compares either view with the
shapes the config implies, so every missing, unexpected or mis-shaped key is reported at once, by the names the
caller used.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipup_jax.checkpoints.errors import CheckpointError, key_list
from clipup_jax.checkpoints.lazy import LazyStack
from clipup_jax.config import ModelConfig
from clipup_jax.models import CLIP
from clipup_jax.models.param_tree import abstract_block_params, abstract_params, block_names, flat_name

Leaf = TypeVar("Leaf", np.ndarray, LazyStack)


def check_params(params: Mapping[str, np.ndarray], cfg: ModelConfig, source: str, *, blocks: bool = False) -> None:
    """`params` against the config's stacked layout (or, `blocks`, its per-block view)."""
    expected = abstract_block_params(cfg) if blocks else abstract_params(cfg)
    missing = set(expected) - set(params)
    unexpected = set(params) - set(expected)
    misshaped = [
        f"{k} {tuple(params[k].shape)} != {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(params))
        if tuple(params[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {key_list(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {key_list(misshaped)}")
    if problems:
        raise CheckpointError(f"{source}: parameters do not match the model config: " + "; ".join(problems))


def from_blocks(params: Mapping[str, Leaf], cfg: ModelConfig, source: str = "params") -> dict[str, Leaf]:
    """The stacked layout of per-block `params` (checked first). A stack holding a `LazyStack` stays lazy; the
    others are stacked on the host."""
    check_params(params, cfg, source, blocks=True)
    stacked = block_names(cfg)
    per_block = {block for blocks in stacked.values() for block, _ in blocks}
    out = {name: value for name, value in params.items() if name not in per_block}
    for name, blocks in stacked.items():
        parts = [params[block] for block, _ in blocks]
        lazy = [p for p in parts if isinstance(p, LazyStack)]
        if lazy:
            out[name] = LazyStack((len(parts), *parts[0].shape), parts.__getitem__, 1 + lazy[0].lazy_axes)
        else:
            out[name] = np.stack([np.asarray(p) for p in parts])
    return out


def to_blocks(params: Mapping[str, Leaf], cfg: ModelConfig, source: str = "params") -> dict[str, Leaf]:
    """The per-block view of stacked `params` (checked first): views of the host arrays, lazy parts of a
    `LazyStack`."""
    check_params(params, cfg, source)
    stacked = block_names(cfg)
    out = {}
    for name, value in params.items():
        if name not in stacked:
            out[name] = value
            continue
        for block, r in stacked[name]:
            out[block] = (LazyStack(value.shape[1:], lambda i, v=value, r=r: v[r, i], max(1, value.lazy_axes - 1))
                          if isinstance(value, LazyStack) else value[r])
    return out


def model_from_params(cfg: ModelConfig, params: Mapping[str, np.ndarray], dtype: jnp.dtype = jnp.float32,
                      source: str = "params") -> CLIP:
    """A CLIP holding `params` (checked first), built without a throwaway random init."""
    check_params(params, cfg, source)
    graphdef, state, rest = nnx.split(nnx.eval_shape(lambda: CLIP(cfg, nnx.Rngs(0), dtype)), nnx.Param, ...)
    # Non-parameter state (router-noise RNG streams) is small: materialise it from the abstract init.
    rest = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a, rest)
    return nnx.merge(graphdef, _filled(state, params), rest)


def assign_params(model: CLIP, params: Mapping[str, np.ndarray], cfg: ModelConfig, source: str = "params") -> None:
    """Writes `params` (checked first) into an existing model, keeping its other state (e.g. RNG streams)."""
    check_params(params, cfg, source)
    nnx.update(model, _filled(nnx.state(model, nnx.Param), params))


def _filled(state: nnx.State, params: Mapping[str, np.ndarray]) -> nnx.State:
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(jnp.asarray(params[flat_name(path)], jnp.float32))
    return nnx.from_flat_state(flat)
