"""Building device meshes with a known axis type.

`jax.make_mesh` changed its default axis type over releases (JAX 0.10.2 makes Explicit axes, where
`jax.shard_map` asserts that its inputs already carry the `in_specs` shardings). Everything in
`clipup_jax` builds meshes through `make_mesh` here, which always passes `axis_types`:

* `"auto"` (default): GSPMD propagates shardings through the jitted model and `jax.shard_map`
  reshards its inputs to `in_specs` itself, so code written without sharding annotations (the
  Flax NNX forward) runs unchanged.
* `"explicit"`: sharding-in-types; the expert-parallel layer reshards at its boundary
  (`jax.reshard`) and hands back its output in the input's sharding.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


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


def make_mesh(shape: Mapping[str, int], *, axis_types: str | AxisType = "auto",
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes `shape` (name -> size, in order; one size may be -1 for the rest of the
    devices), all of one axis type (`"auto"` or `"explicit"`), over `devices` (default: all)."""
    if isinstance(axis_types, str):
        if axis_types not in AXIS_TYPES:
            raise ValueError(f"axis_types must be one of {sorted(AXIS_TYPES)}, got {axis_types!r}")
        axis_types = AXIS_TYPES[axis_types]
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_shape(shape, len(devices))
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=(axis_types,) * len(sizes),
                         devices=devices)
