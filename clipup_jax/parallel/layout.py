"""The layout table: where every parameter and optimizer-state array of a train state lives on the mesh.

Rows are parameter groups: names with their stack indices collapsed (`visual/encoder/layers/*/*/mlp/fc1_kernel`)
and one row per distinct (shape, PartitionSpec, dtype), so a tower's dense and MoE blocks stay apart.
Optimizer leaves (Adam's mu and nu) are charged to the parameter they follow (their path ends with its name
and they have its shape); counters and the rest of the state are "other". Bytes are per device, computed from
the specs and the mesh's axis sizes alone, so a `Mesh` and an `AbstractMesh` (a pod you do not have) give the
same table. A dimension its mesh axes do not divide leaves devices holding different amounts: the table then
reports the smallest and largest device and names those arrays.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import PartitionSpec

from clipup_jax.models.param_tree import tree_path_name
from clipup_jax.storage import PathLike, as_path

FOLD_FRACTION = 0.01  # the compact table folds groups under 1 % of the parameter bytes into one row per module


@dataclasses.dataclass(frozen=True)
class LayoutRow:
    group: str  # flat parameter name, block indices as '*'
    count: int  # arrays in the group
    shape: tuple[int, ...]  # of one array
    spec: PartitionSpec
    dtype: str
    param_bytes: int  # per device, all `count` arrays (the largest shard where shards differ)
    opt_bytes: int  # per device, the optimizer leaves that follow these parameters


@dataclasses.dataclass(frozen=True)
class Layout:
    rows: list[LayoutRow]
    mesh_shape: dict[str, int]
    params_bytes: int  # per device (largest device)
    opt_bytes: int  # per device, optimizer state including counters
    other_bytes: int  # per device: step, RNG counters
    global_param_bytes: int  # unsharded
    min_device_bytes: int  # params + optimizer + other on the device holding the least
    uneven: list[str]  # arrays whose shards differ in size across devices

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh_shape.values())

    @property
    def state_bytes(self) -> int:
        return self.params_bytes + self.opt_bytes + self.other_bytes


def spec_axes(spec: PartitionSpec, ndim: int) -> list[tuple[str, ...]]:
    """The mesh axes of each array dimension (trailing dimensions absent from `spec` are replicated)."""
    entries = list(spec) + [None] * (ndim - len(spec))
    return [() if e is None else ((e,) if isinstance(e, str) else tuple(e)) for e in entries]


def shard_bytes(shape: tuple[int, ...], dtype: Any, spec: PartitionSpec, mesh_shape: Mapping[str, int]) -> tuple[int, int]:
    """(largest, smallest) bytes one device holds of an array: a dimension of size d split n ways is cut into
    chunks of ceil(d / n), so the last devices get less (or nothing) when n does not divide d."""
    hi, lo = 1, 1
    for dim, axes in zip(shape, spec_axes(spec, len(shape))):
        n = math.prod(mesh_shape[a] for a in axes)
        chunk = -(-dim // n)
        hi *= chunk
        lo *= max(0, dim - (n - 1) * chunk)
    itemsize = np.dtype(dtype).itemsize
    return hi * itemsize, lo * itemsize


def group_name(name: str) -> str:
    return re.sub(r"(?<=/)\d+(?=/|$)", "*", name)


def state_layout(state: Any, shardings: Any) -> Layout:
    """The layout of a train state (`params`, `opt_state` and other fields; arrays or ShapeDtypeStructs) under
    `shardings`, a matching tree of `NamedSharding`s over a `Mesh` or an `AbstractMesh`."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    if len(leaves) != len(specs):
        raise ValueError(f"state has {len(leaves)} arrays but shardings has {len(specs)}")
    mesh_shape = dict(specs[0].mesh.shape) if specs else {}
    params: dict[str, tuple[tuple[int, ...], tuple]] = {}  # name -> (shape, its row key)
    rows: dict[tuple, dict[str, Any]] = {}
    opt = other = min_total = global_params = 0
    uneven: list[str] = []
    pending_opt = []
    for (path, leaf), sharding in zip(leaves, specs):
        name = tree_path_name(path)
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        hi, lo = shard_bytes(shape, dtype, sharding.spec, mesh_shape)
        min_total += lo
        if hi != lo:
            uneven.append(name)
        kind, _, rest = name.partition("/")
        if kind == "params":
            key = (group_name(rest), shape, sharding.spec, dtype.name)
            row = rows.setdefault(key, {"count": 0, "param_bytes": 0, "opt_bytes": 0})
            row["count"] += 1
            row["param_bytes"] += hi
            params[rest] = (shape, key)
            global_params += math.prod(shape) * dtype.itemsize
        elif kind == "opt_state":
            opt += hi
            pending_opt.append((name.split("/"), shape, hi))
        else:
            other += hi
    for parts, shape, hi in pending_opt:  # charge Adam moments to their parameter's row
        for start in range(len(parts)):
            hit = params.get("/".join(parts[start:]))
            if hit is not None and hit[0] == shape:
                rows[hit[1]]["opt_bytes"] += hi
                break
    table = [LayoutRow(group=k[0], shape=k[1], spec=k[2], dtype=k[3], **v) for k, v in rows.items()]
    return Layout(table, mesh_shape, sum(r.param_bytes for r in table), opt, other, global_params, min_total, uneven)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _spec_text(spec: PartitionSpec, ndim: int) -> str:
    return "(" + ", ".join("+".join(a) if a else "-" for a in spec_axes(spec, ndim)) + ")"


def _fold(rows: list[LayoutRow], threshold: float) -> list[LayoutRow]:
    """Rows under `threshold` bytes merged into one `<module>/... (small)` row per top-level module."""
    kept, small = [], {}
    for r in rows:
        if r.param_bytes >= threshold:
            kept.append(r)
            continue
        module = r.group.split("/")[0] if "/" in r.group else "(top level)"
        acc = small.setdefault(module, [0, 0, 0])
        acc[0] += r.count
        acc[1] += r.param_bytes
        acc[2] += r.opt_bytes
    for module, (count, pbytes, obytes) in small.items():
        kept.append(LayoutRow(f"{module}/... (small arrays)", count, (), PartitionSpec(), "", pbytes, obytes))
    return kept


def format_layout(layout: Layout, compact: bool = True) -> str:
    """The table as text; `compact` folds the small groups (norms, biases) per module to keep it ~30 lines."""
    rows = sorted(layout.rows, key=lambda r: r.group)
    if compact:
        rows = sorted(_fold(rows, FOLD_FRACTION * layout.params_bytes), key=lambda r: r.group)
    mesh = " ".join(f"{k}={v}" for k, v in layout.mesh_shape.items())
    lines = [f"parameter layout on mesh {mesh} ({layout.num_devices} devices); bytes per device"]
    width = max([len(r.group) for r in rows] + [10])
    lines.append(f"  {'group':<{width}}  {'n':>3}  {'shape':<20} {'spec':<22} {'params':>10} {'optimizer':>10}")
    for r in rows:
        shape = "x".join(map(str, r.shape)) if r.dtype else ""
        spec = _spec_text(r.spec, len(r.shape)) if r.dtype else ""
        lines.append(f"  {r.group:<{width}}  {r.count:>3}  {shape:<20} {spec:<22} "
                     f"{human_bytes(r.param_bytes):>10} {human_bytes(r.opt_bytes):>10}")
    lines.append(f"  per device: params {human_bytes(layout.params_bytes)} (of {human_bytes(layout.global_param_bytes)}"
                 f" unsharded), optimizer state {human_bytes(layout.opt_bytes)}, other "
                 f"{human_bytes(layout.other_bytes)}; total {human_bytes(layout.state_bytes)}")
    if layout.uneven:
        names = ", ".join(layout.uneven[:3]) + (f" (+{len(layout.uneven) - 3} more)" if len(layout.uneven) > 3 else "")
        lines.append(f"  WARNING: devices differ: from {human_bytes(layout.min_device_bytes)} to "
                     f"{human_bytes(layout.state_bytes)} of state per device; unevenly split: {names}")
    return "\n".join(lines)


def report_layout(state: Any, shardings: Any, workdir: PathLike, notes: str = "") -> Layout:
    """Prints the compact table and writes the full one to `workdir/layout.txt` (the trainer, on process 0),
    each followed by `notes` (what else the run decided about placement, e.g. its MoE dispatch)."""
    layout = state_layout(state, shardings)
    tail = f"\n{notes}" if notes else ""
    print(format_layout(layout, compact=True) + tail, flush=True)
    (as_path(workdir) / "layout.txt").write_text(format_layout(layout, compact=False) + tail + "\n")
    return layout
