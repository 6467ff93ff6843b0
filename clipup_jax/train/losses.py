"""Contrastive losses over the global batch (every image against every caption).

Two implementations of the same numbers (`IMPLS`):

* `"global"`: the (B, B) float32 logits in one piece. Under a batch-sharded mesh GSPMD decides how
  to split them, and the softmax over both axes can leave a whole (B, B) buffer on every device.
* `"sharded"`: a `jax.shard_map` over the mesh's batch axes (`parallel.sharding.batch_spec`). Each
  device all-gathers the other tower's embeddings (B x E, small) and computes only its own rows of
  logits: local images x all texts (image->text) and local texts x all images (text->image), so no
  device holds more than B_local x B of logits. The per-device sums are `psum`med. The transpose of
  `all_gather` is a reduce-scatter, so autodiff gives the global gradients exactly (up to float
  summation order); the replicated `scale`/`bias` get their gradient `psum`med by shard_map.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from clipup_jax.parallel.sharding import batch_spec

LOSSES = ("clip", "siglip")
IMPLS = ("global", "sharded")

ContrastiveLoss = Callable[..., jax.Array]
"""(image (B, E), text (B, E), scale, bias=None) -> scalar float32 loss."""


def clip_softmax_loss(image: jax.Array, text: jax.Array, scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE (CLIP): mean of image->text and text->image cross-entropy, matched pairs on the diagonal.

    `image`, `text`: (B, E) L2-normalised; `scale`: exp(logit_scale).
    """
    logits = scale * image.astype(jnp.float32) @ text.astype(jnp.float32).T
    labels = jnp.arange(logits.shape[0])
    i2t = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1).mean()
    t2i = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], axis=0).mean()
    return 0.5 * (i2t + t2i)


def siglip_sigmoid_loss(image: jax.Array, text: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """SigLIP: independent binary decisions per pair, +1 on the diagonal, -1 elsewhere; summed per image."""
    logits = scale * image.astype(jnp.float32) @ text.astype(jnp.float32).T + bias
    signs = 2.0 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]


def _gather(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.all_gather(x, axes, axis=0, tiled=True)


def _cross_entropy_sum(logits: jax.Array, positive: jax.Array) -> jax.Array:
    """Sum over rows of -log softmax(row)[matched], given each row's matched logit."""
    return jnp.sum(jax.nn.logsumexp(logits, axis=1) - positive)


def _clip_local(image, text, scale, bias, *, axes: tuple[str, ...], batch: int):
    del bias
    image, text = image.astype(jnp.float32), text.astype(jnp.float32)
    positive = scale * jnp.sum(image * text, axis=1)  # the diagonal entries of this device's rows
    i2t = _cross_entropy_sum(scale * image @ _gather(text, axes).T, positive)  # (B_local, B) logits
    t2i = _cross_entropy_sum(scale * text @ _gather(image, axes).T, positive)  # columns of the global logits
    return jax.lax.psum(i2t + t2i, axes) / (2 * batch)


def _siglip_local(image, text, scale, bias, *, axes: tuple[str, ...], batch: int):
    image, text = image.astype(jnp.float32), text.astype(jnp.float32)
    rows = image.shape[0]
    logits = scale * image @ _gather(text, axes).T + bias  # (B_local, B): every pair exactly once over devices
    first = jax.lax.axis_index(axes) * rows  # this device's rows in the global batch (tiled gather order)
    matched = jnp.arange(logits.shape[1])[None, :] == (first + jnp.arange(rows))[:, None]
    signs = jnp.where(matched, 1.0, -1.0)
    return -jax.lax.psum(jnp.sum(jax.nn.log_sigmoid(signs * logits)), axes) / batch


def _global(loss: str) -> ContrastiveLoss:
    if loss == "clip":
        return lambda image, text, scale, bias=None: clip_softmax_loss(image, text, scale)
    return siglip_sigmoid_loss


def batch_axes(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> tuple[str, ...]:
    """The mesh axes (size > 1) the batch is split over, in `batch_spec` order; () for none."""
    axes = batch_spec(mesh, 1)[0]
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def _explicit(mesh, axes: tuple[str, ...]) -> bool:
    """True when every batch axis is Explicit, False when all are Auto; a mix is rejected."""
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    kinds = {types[a] for a in axes}
    if kinds - {AxisType.Explicit, AxisType.Auto}:
        raise ValueError(f"batch mesh axes {axes} are Manual: call the sharded contrastive loss outside shard_map")
    if len(kinds) > 1:
        raise ValueError(f"batch mesh axes {axes} mix Explicit and Auto axis types; build the mesh with one axis "
                         f"type (clipup_jax.parallel.mesh.make_mesh)")
    return kinds == {AxisType.Explicit}


def _sharded(loss: str) -> ContrastiveLoss:
    body = _clip_local if loss == "clip" else _siglip_local
    fallback = _global(loss)

    def sharded_loss(image: jax.Array, text: jax.Array, scale: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        mesh = jax.sharding.get_abstract_mesh()  # the one `jax.set_mesh` set (the trainer's)
        axes = batch_axes(mesh) if mesh.axis_names else ()
        if not axes:  # no mesh, or no batch axis larger than 1: one device's worth of math
            return fallback(image, text, scale, bias)
        if image.ndim != 2 or image.shape != text.shape:
            raise ValueError(f"image and text embeddings must both be (batch, dim), got {image.shape} and {text.shape}")
        batch, shards = image.shape[0], math.prod(mesh.shape[a] for a in axes)
        if batch % shards:
            raise ValueError(f"sharded contrastive loss: batch size {batch} is not divisible by the {shards} devices "
                             f"of the batch mesh axes {axes} (mesh {dict(mesh.shape)})")
        bias = jnp.zeros((), jnp.float32) if bias is None else bias
        scale, bias = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
        row, rep = P(axes, None), P()
        inputs = (image, text, scale, bias)
        if _explicit(mesh, axes):  # shard_map asserts Explicit inputs already carry in_specs
            named = functools.partial(NamedSharding, mesh)
            inputs = jax.reshard(inputs, (named(row), named(row), named(rep), named(rep)))
        run = functools.partial(body, axes=axes, batch=batch)
        return jax.shard_map(run, mesh=mesh, in_specs=(row, row, rep, rep), out_specs=rep)(*inputs)

    return sharded_loss


def make_contrastive_loss(loss: str, impl: str = "global") -> ContrastiveLoss:
    """The contrastive loss `loss` (`config.loss`) computed as `impl` (`config.loss_impl`, see the module
    docstring); the result is called as f(image, text, scale, bias=None). "sharded" takes its mesh from
    `jax.set_mesh` and falls back to the global math when there is none to split over."""
    if loss not in LOSSES:
        raise ValueError(f"config.loss must be one of {LOSSES}, got {loss!r}")
    if impl not in IMPLS:
        raise ValueError(f"config.loss_impl must be one of {IMPLS}, got {impl!r}")
    fn = _global(loss) if impl == "global" else _sharded(loss)
    if loss == "clip":
        return fn

    def siglip(image, text, scale, bias=None):
        if bias is None:
            raise ValueError("config.loss='siglip' needs a learned logit bias: set the model's logit_bias=True")
        return fn(image, text, scale, bias)

    return siglip
