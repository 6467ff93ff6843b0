"""Mesh construction: axis order, multi-slice (DCN) device grids on fake slices, and the errors."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import ml_collections
import numpy as np
import pytest

from clipup_jax.parallel.mesh import device_grid, make_mesh, split_dcn
from clipup_jax.train.recipes import base_config
from clipup_jax.train.trainer import config_mesh


def _fake_devices(count: int, slices: int) -> list[SimpleNamespace]:
    """CPU-like devices with a `slice_index`, interleaved so that grouping by slice is visible."""
    return [SimpleNamespace(id=i, slice_index=i % slices, process_index=i // 4, platform="cpu", device_kind="fake")
            for i in range(count)]


def test_axes_are_laid_out_data_fsdp_expert_whatever_the_order_given():
    axes = ml_collections.ConfigDict({"data": 2, "fsdp": 1, "expert": 4})  # iterates data, expert, fsdp
    mesh = make_mesh(dict(axes))
    assert mesh.axis_names == ("data", "fsdp", "expert")
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert ids[0, 0].tolist() == [0, 1, 2, 3]  # the expert axis runs over neighbouring devices


def test_hybrid_grid_keeps_each_slice_together():
    devices = _fake_devices(16, slices=2)
    grid = device_grid({"data": 4, "fsdp": 1, "expert": 4}, {"data": 2}, devices)
    assert grid.shape == (4, 1, 4)
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    assert (slices[:2] == 0).all() and (slices[2:] == 1).all()  # data splits across slices (DCN) ...
    assert all(len(set(row)) == 1 for row in slices.reshape(-1, 4))  # ... the expert axis never leaves one
    assert sorted(d.id for d in grid.flat) == list(range(16))


def test_dcn_arithmetic():
    assert split_dcn({"data": 8, "fsdp": 2, "expert": 4}, {"data": 2, "fsdp": 2}) == (
        {"data": 4, "fsdp": 1, "expert": 4}, {"data": 2, "fsdp": 2, "expert": 1})
    assert split_dcn({"data": 8}, {"data": 1, "fsdp": 1, "expert": 1}) == ({"data": 8}, {"data": 1})
    with pytest.raises(ValueError, match="dcn_mesh.expert=3 does not divide mesh axis 'expert' of size 4"):
        split_dcn({"data": 2, "expert": 4}, {"expert": 3})
    with pytest.raises(ValueError, match="dcn_mesh.fsdp=2: 'fsdp' is not an axis"):
        split_dcn({"data": 8}, {"fsdp": 2})
    assert device_grid({"data": 8}, {"data": 1}, jax.devices()) is None  # one slice: jax.make_mesh orders it


@pytest.mark.parametrize("devices, dcn, message", [
    (None, {"data": 2}, "asks for 2 slices, but the devices are one slice"),
    (_fake_devices(16, 2), {}, "span 2 slices (multi-slice); set config.dcn_mesh"),
    (_fake_devices(16, 2), {"data": 4}, "multiplies to 4 slices, but the devices span 2"),
])
def test_slice_mismatches_are_errors(devices, dcn, message):
    devices = jax.devices() if devices is None else devices
    with pytest.raises(ValueError) as e:
        device_grid({"data": len(devices) // 4, "expert": 4}, dcn, devices)
    assert message in str(e.value)


def test_trainer_mesh_reads_dcn_mesh():
    config = base_config("tiny")
    config.batch_size = 16
    config.dcn_mesh.data = 2
    with pytest.raises(ValueError, match="asks for 2 slices"):
        config_mesh(config)
    config.dcn_mesh.data = 1
    assert config_mesh(config).shape == {"data": 8, "fsdp": 1, "expert": 1}
