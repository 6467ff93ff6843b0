"""Read a flat {name: np.ndarray} from weight files, never unpickling arbitrary objects.

safetensors, npz and msgpack need no torch. Torch `.pt/.bin` files go through
`torch.load(weights_only=True)`; OpenAI's released `.pt` files are TorchScript
archives, which `weights_only` refuses, so those are read with `torch.jit.load`
(TorchScript deserialisation builds tensors and compiled TorchScript; it runs no
Python code from the file).
"""

from __future__ import annotations

import pathlib
import zipfile
from typing import Any, Mapping

import numpy as np

from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.models.param_tree import flatten

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def read_tensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of one file, floats upcast to float32, keyed by their flat name."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; give the weights file in it (.safetensors, .npz, .msgpack, "
                              f"or {'/'.join(TORCH_SUFFIXES)})")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                tensors = {k: npz[k] for k in npz.files}
        elif suffix == ".msgpack":
            from flax import serialization

            tensors = flatten(serialization.msgpack_restore(path.read_bytes()))
        elif suffix in TORCH_SUFFIXES:
            tensors = _read_torch(path)
        else:
            raise CheckpointError(
                f"{path}: unknown weights format {suffix!r}; expected .safetensors, .npz, .msgpack or {', '.join(TORCH_SUFFIXES)}"
            )
    except CheckpointError:
        raise
    except Exception as e:  # every reader has its own exception types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot read as {suffix} weights ({type(e).__name__}: {e})") from e
    return {name: _as_float32(name, value, path) for name, value in tensors.items()}


def _as_float32(name: str, value: Any, path: pathlib.Path) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == object:
        raise CheckpointError(f"{path}: entry {name!r} is not a tensor")
    if np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16":
        return array.astype(np.float32)
    return array


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: reading torch files needs torch (pip install 'clipup_jax[torch]'); "
            "safetensors/npz/msgpack need no torch"
        ) from None
    if _is_torchscript(path):
        obj: Any = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"{path}: refused by torch.load(weights_only=True): the file holds objects other than tensors ({e})"
            ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # open_clip training checkpoints: {epoch, name, state_dict, optimizer}
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    out = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        name = name.removeprefix("module.")  # DistributedDataParallel wrapper
        out[name] = value.detach().to(torch.float32 if value.is_floating_point() else value.dtype).cpu().numpy()
    return out


def _is_torchscript(path: pathlib.Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or n.endswith("/code/") or "/code/" in n for n in zf.namelist())


