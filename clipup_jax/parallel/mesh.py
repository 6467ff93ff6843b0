"""Building device meshes with a known axis type.

`jax.make_mesh` changed its default axis type over releases (JAX 0.10.2 makes Explicit axes, where
`jax.shard_map` asserts that its inputs already carry the `in_specs` shardings). Everything in
`clipup_jax` builds meshes through `make_mesh` here, which always passes `axis_types`:

* `"auto"` (default): GSPMD propagates shardings through the jitted model and `jax.shard_map`
  reshards its inputs to `in_specs` itself, so code written without sharding annotations (the
  Flax NNX forward) runs unchanged.
* `"explicit"`: sharding-in-types; the expert-parallel layer reshards at its boundary
  (`jax.reshard`) and hands back its output in the input's sharding.

Device order. `make_mesh` lays the axes out as `AXIS_ORDER` (`data`, `fsdp`, `expert`, least to most
communication-hungry; other names first), whatever order they come in (a ConfigDict lists its keys
alphabetically): `jax.make_mesh` maps the last axes onto the closest devices of the ICI torus or
NVLink domain, so expert all-to-alls stay on the fastest links. On a multi-slice TPU (devices carry a
`slice_index`), `config.dcn_mesh` gives each axis' cross-slice (DCN) factor, e.g.
`{"data": 2}` for two slices doing data parallelism over DCN, and the device grid comes from
`mesh_utils.create_hybrid_device_mesh`: each axis' global size is its ICI size times its DCN factor.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
AXIS_ORDER = ("data", "fsdp", "expert")  # outermost (slowest links) to innermost (fastest)


def ordered_axes(sizes: Mapping[str, int]) -> dict[str, int]:
    """`sizes` with unknown axes first (in their order), then `AXIS_ORDER`'s."""
    rank = {name: i for i, name in enumerate(AXIS_ORDER)}
    return dict(sorted(sizes.items(), key=lambda item: rank.get(item[0], -1)))


def resolve_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Axis sizes with at most one `-1` replaced by the devices left over; checks the product."""
    sizes = dict(shape)
    if not sizes:
        raise ValueError("mesh shape needs at least one axis")
    for name, size in sizes.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"mesh axis names must be non-empty strings, got {name!r}")
        if size != -1 and (not isinstance(size, int) or size < 1):
            raise ValueError(f"mesh axis {name!r} has size {size!r}; sizes are >= 1, or -1 for 'the rest'")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {rest} in {sizes}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if num_devices % known:
            raise ValueError(f"mesh {sizes}: {num_devices} devices are not divisible by the fixed axes' "
                             f"product {known}, so axis {rest[0]!r} (-1) cannot take the rest")
        sizes[rest[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are "
                         f"available; the axis sizes must multiply to the device count (use -1 for one axis)")
    return sizes


def split_dcn(sizes: Mapping[str, int], dcn: Mapping[str, int] | None) -> tuple[dict[str, int], dict[str, int]]:
    """(ICI sizes, DCN factors) of resolved global axis `sizes`, in their order: global = ICI x DCN per axis."""
    dcn = dict(dcn or {})
    for name, factor in dcn.items():
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f"dcn_mesh.{name}={factor!r}: DCN factors are integers >= 1")
        if name not in sizes and factor > 1:
            raise ValueError(f"dcn_mesh.{name}={factor}: {name!r} is not an axis of the mesh {dict(sizes)}")
    dcn = {name: factor for name, factor in dcn.items() if name in sizes}
    for name, factor in dcn.items():
        if sizes[name] % factor:
            raise ValueError(f"dcn_mesh.{name}={factor} does not divide mesh axis {name!r} of size {sizes[name]} "
                             f"(mesh {dict(sizes)}): an axis spans whole slices")
    factors = {name: dcn.get(name, 1) for name in sizes}
    return {name: size // factors[name] for name, size in sizes.items()}, factors


def num_slices(devices: Sequence[Any]) -> int:
    """Distinct `slice_index` values among `devices` (1 for devices without one: single slice, CPU, GPU)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(sizes: Mapping[str, int], dcn: Mapping[str, int] | None, devices: Sequence[Any]) -> np.ndarray | None:
    """The multi-slice device array for resolved `sizes` and DCN factors `dcn`, or None when there is one slice
    and no DCN factor (then `jax.make_mesh` orders the devices). Errors name the dcn_mesh field at fault."""
    ici, factors = split_dcn(sizes, dcn)
    want, have = math.prod(factors.values()), num_slices(devices)
    if want == 1 and have == 1:
        return None
    if want == 1:
        raise ValueError(f"the {len(devices)} devices span {have} slices (multi-slice); set config.dcn_mesh so its "
                         f"factors multiply to {have}, e.g. --config.dcn_mesh.data={have}")
    if have == 1:
        raise ValueError(f"config.dcn_mesh {factors} asks for {want} slices, but the devices are one slice (no "
                         f"multi-slice slice_index); set every dcn_mesh factor to 1")
    if want != have:
        raise ValueError(f"config.dcn_mesh {factors} multiplies to {want} slices, but the devices span {have}")
    return mesh_utils.create_hybrid_device_mesh(tuple(ici.values()), tuple(factors.values()), list(devices))


def make_mesh(shape: Mapping[str, int], *, axis_types: str | AxisType = "auto",
              devices: Sequence[jax.Device] | None = None, dcn: Mapping[str, int] | None = None) -> Mesh:
    """A `Mesh` with axes `shape` (name -> size, laid out in `AXIS_ORDER`; one size may be -1 for the rest of
    the devices), all of one axis type (`"auto"` or `"explicit"`), over `devices` (default: all).
    `dcn` (name -> cross-slice factor) lays the axes over the slices of a multi-slice TPU."""
    if isinstance(axis_types, str):
        if axis_types not in AXIS_TYPES:
            raise ValueError(f"axis_types must be one of {sorted(AXIS_TYPES)}, got {axis_types!r}")
        axis_types = AXIS_TYPES[axis_types]
    devices = list(jax.devices() if devices is None else devices)
    sizes = ordered_axes(resolve_shape(shape, len(devices)))
    types = (axis_types,) * len(sizes)
    grid = device_grid(sizes, dcn, devices)
    if grid is not None:
        return Mesh(grid, tuple(sizes), axis_types=types)
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=types, devices=devices)
