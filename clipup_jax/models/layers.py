"""Small building blocks whose numerics must match PyTorch CLIP exactly."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from clipup_jax.config import Activation


def activation_fn(name: Activation) -> Callable[[jax.Array], jax.Array]:
    """The MLP non-linearity. `gelu` is the exact erf form (torch's default), not jax's tanh default."""
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {name!r}")


def normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def mlp_init_stds(width: int, depth: int) -> tuple[float, float]:
    """Normal init stds of fc1 and fc2 (open_clip's scheme: the output projection shrinks with depth)."""
    return (2 * width) ** -0.5, width**-0.5 * (2 * depth) ** -0.5


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 whatever the compute dtype, as OpenAI's CLIP does."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(dtype)


class Mlp(nnx.Module):
    """fc1 -> activation -> fc2 (OpenAI's `c_fc`/`c_proj`)."""

    def __init__(self, width: int, mlp_dim: int, depth: int, activation: Activation, rngs: nnx.Rngs,
                 dtype: jnp.dtype = jnp.float32):
        self.activation = activation
        self.dtype = dtype
        fc1_std, fc2_std = mlp_init_stds(width, depth)
        self.fc1_kernel = nnx.Param(normal(rngs, (width, mlp_dim), fc1_std), logical_axes=("embed", "mlp"))
        self.fc1_bias = nnx.Param(jnp.zeros((mlp_dim,), jnp.float32), logical_axes=("mlp",))
        self.fc2_kernel = nnx.Param(normal(rngs, (mlp_dim, width), fc2_std), logical_axes=("mlp", "embed"))
        self.fc2_bias = nnx.Param(jnp.zeros((width,), jnp.float32), logical_axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.dtype
        h = x.astype(d) @ self.fc1_kernel[...].astype(d) + self.fc1_bias[...].astype(d)
        h = activation_fn(self.activation)(h)
        return h @ self.fc2_kernel[...].astype(d) + self.fc2_bias[...].astype(d)


class Projection(nnx.Module):
    """Tower output projection into the joint embedding space (bias only for big_vision heads)."""

    def __init__(self, width: int, embed_dim: int, use_bias: bool, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.dtype = dtype
        self.kernel = nnx.Param(normal(rngs, (width, embed_dim), width**-0.5), logical_axes=("embed", "joint"))
        self.bias = nnx.Param(jnp.zeros((embed_dim,), jnp.float32), logical_axes=("joint",)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


LN_100 = math.log(100.0)
