"""Canonical flat parameter names ('visual/encoder/blocks/0/attn/qkv_kernel') and the model they fill.

Importers produce this flat form; the checker compares it with the shapes the
config implies, so every missing, unexpected or mis-shaped key is reported at once.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipup_jax.checkpoints.errors import CheckpointError, key_list
from clipup_jax.config import ModelConfig
from clipup_jax.models import CLIP
from clipup_jax.models.param_tree import abstract_params, flat_name


def check_params(params: Mapping[str, np.ndarray], cfg: ModelConfig, source: str) -> None:
    expected = abstract_params(cfg)
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
