"""The flat views of a CLIP's parameters, name -> array.

The model's own layout stacks each run of repeated blocks on a leading `layers` axis
('visual/encoder/layers/0/1/mlp/fc1_kernel', models/encoder.py); the per-block view
('visual/encoder/blocks/3/mlp/fc1_kernel') is what importers, exporters and upcycling
speak. `block_names` is the one map between the two. Shapes and logical axes come from
an abstract init (`nnx.eval_shape`), so nothing is allocated to ask what a config's
parameters look like.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping

import jax
import numpy as np
from flax import nnx

from clipup_jax.config import TOWERS, ModelConfig
from clipup_jax.models.clip import CLIP
from clipup_jax.models.encoder import encoder_segments

_STACKED = re.compile(r"^(?P<tower>\w+)/encoder/layers/(?P<segment>\d+)/(?P<position>\d+)/(?P<leaf>.+)$")


def flat_name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def tree_path_name(path: tuple) -> str:
    """The flat name of a leaf reached by a `jax.tree_util` key path through an `nnx.State` (optimizer states
    included): the same string `flat_name` gives, with the Variable's own `value` key dropped."""
    parts = [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path]
    return "/".join(p for p in parts if p not in ("value", "raw_value"))


def path_shapes(tree: object) -> dict[str, tuple[int, ...]]:
    """Flat name (`tree_path_name`) -> shape of every leaf of a jax pytree (a train state, its abstract form, or
    Orbax's metadata of one)."""
    return {tree_path_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@functools.lru_cache(maxsize=16)
def _abstract_params(cfg: ModelConfig) -> tuple[tuple[tuple, nnx.Variable], ...]:
    """Traced once per config (a start-up asks several times); callers only read it."""
    model = nnx.eval_shape(lambda: CLIP(cfg, nnx.Rngs(0)))
    return tuple(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def abstract_params(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of every parameter, without allocating any."""
    return {flat_name(path): var.get_value() for path, var in _abstract_params(cfg)}


def logical_axes(cfg: ModelConfig) -> dict[str, tuple[str | None, ...]]:
    """Logical axis names of every parameter (mapped to mesh axes by the sharding rules)."""
    return {flat_name(path): var.logical_axes for path, var in _abstract_params(cfg)}


@functools.lru_cache(maxsize=16)
def block_names(cfg: ModelConfig) -> dict[str, tuple[tuple[str, int], ...]]:
    """Stacked parameter name -> (per-block name, repeat) of each block it holds, in repeat order."""
    towers = {prefix: getattr(cfg, field) for prefix, field in TOWERS.values()}
    out = {}
    for name in abstract_params(cfg):
        m = _STACKED.match(name)
        if m is None:
            continue
        tower = towers[m["tower"]]
        seg = encoder_segments(tower.depth, tower.moe)[int(m["segment"])]
        j = int(m["position"])
        out[name] = tuple((f"{m['tower']}/encoder/blocks/{seg.block(j, r)}/{m['leaf']}", r)
                          for r in range(seg.repeats))
    return out


def abstract_block_params(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """`abstract_params` in the per-block view."""
    stacked = block_names(cfg)
    out = {}
    for name, shape in abstract_params(cfg).items():
        if name not in stacked:
            out[name] = shape
        for block, _ in stacked.get(name, ()):
            out[block] = jax.ShapeDtypeStruct(shape.shape[1:], shape.dtype)
    return out


def params_of(model: CLIP) -> dict[str, np.ndarray]:
    return {flat_name(path): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def count_params(params: Mapping[str, object]) -> int:
    return int(sum(np.prod(p.shape) for p in params.values()))


def flatten(tree: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """{'a': {'b': {'c': x}}} -> {'a/b/c': x}, the inverse of `nest`, for plain nested mappings (a checkpoint file's
    tree: every key kept, a `value` key too; `tree_path_name` is for jax key paths through an `nnx.State`)."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def nest(flat: Mapping[str, object]) -> dict[str, object]:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}: the tree layout Orbax stores flat names in."""
    tree: dict[str, object] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
