"""Logical axis names -> mesh axes: the one table that decides where every parameter lives.

Parameters carry logical axes (`layers`, `embed`, `mlp`, `heads`, `kv`, `vocab`,
`expert`, `joint`); a rules table maps each to mesh axes. Dense weights are FSDP-sharded
over `fsdp` on their `embed` axis, experts over `expert`, activations' batch
over every data-like axis (`expert` acts as a data axis outside MoE layers).
A mesh axis is used at most once per array, and only where it divides the
dimension; otherwise that dimension stays replicated.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipup_jax.config import ModelConfig
from clipup_jax.models.param_tree import abstract_params, logical_axes, tree_path_name
from clipup_jax.parallel.mesh import AXIS_ORDER

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
    ("batch", AXIS_ORDER),  # every axis is data-like outside the MoE layers
    ("expert", "expert"),
    ("layers", None),  # a stack's repeats: each device holds every layer of its shards (the scan walks them)
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("vocab", None),
    ("joint", None),
)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> P:
    """The PartitionSpec for one array; mesh axes of size 1, absent, reused or not dividing are skipped."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        targets = table.get(name) if name is not None else None
        targets = (targets,) if isinstance(targets, str) else tuple(targets or ())
        chosen = []
        size = 1
        for axis in targets:
            n = mesh.shape.get(axis, 1)
            if n == 1 or axis in used or dim % (size * n):
                continue
            chosen.append(axis)
            used.add(axis)
            size *= n
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec)


def data_parallel_size(mesh_shape: Mapping[str, int], rules: Rules = DEFAULT_RULES) -> int:
    """Devices the batch is split over (the batch rule's axes present in the mesh)."""
    axes = dict(rules)["batch"]
    return int(np.prod([mesh_shape.get(a, 1) for a in ((axes,) if isinstance(axes, str) else axes)]))


def batch_spec(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> P:
    """Activations and inputs: leading batch axis over the data-like mesh axes."""
    axes = dict(rules)["batch"]
    present = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if mesh.shape.get(a, 1) > 1)
    return P(present if len(present) > 1 else (present[0] if present else None), *([None] * (ndim - 1)))


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict[str, NamedSharding]:
    shapes, axes = abstract_params(cfg), logical_axes(cfg)
    return {name: NamedSharding(mesh, logical_to_spec(axes[name], shapes[name].shape, mesh, rules))
            for name in shapes}


def shard_params(params: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
    """Places host arrays; each device receives only its own slices."""
    return {name: jax.make_array_from_callback(np.shape(value), shardings[name], lambda idx, v=value: v[idx])
            for name, value in params.items()}


def state_shardings(state: Any, mesh: Mesh, cfg: ModelConfig) -> Any:
    """Shardings of a train state (any pytree whose `params` field is the parameter tree, concrete or abstract):
    params by the logical-axis rules; every subtree shaped like the parameter tree (Adam's moments, gradient
    accumulators; `optax.masked` leaves a `MaskedNode` where a parameter group does not apply) like the params,
    position by position; everything else replicated."""
    by_name = param_shardings(cfg, mesh)
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    params_def = jax.tree.structure(state.params)
    shapes = [tuple(leaf.shape) for _, leaf in leaves]
    specs = [by_name[tree_path_name(path)] for path, _ in leaves]
    replicated = NamedSharding(mesh, P())

    def like_params(node: Any) -> bool:
        if isinstance(node, optax.MaskedNode):
            return False
        flat, treedef = jax.tree.flatten(node, is_leaf=_masked)
        return treedef == params_def and all(_masked(x) or tuple(np.shape(x)) == s for x, s in zip(flat, shapes))

    def place(node: Any) -> Any:
        if not like_params(node):
            return replicated
        flat, treedef = jax.tree.flatten(node, is_leaf=_masked)
        return jax.tree.unflatten(treedef, [x if _masked(x) else spec for x, spec in zip(flat, specs)])

    return jax.tree.map(place, state, is_leaf=like_params)


def _masked(node: Any) -> bool:
    return isinstance(node, optax.MaskedNode)
