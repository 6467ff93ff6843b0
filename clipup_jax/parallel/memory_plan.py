"""Per-device memory of a training config on a mesh, from shapes alone: size a pod before paying for it.

Two parts of different certainty:

* State and inputs (params, Adam moments and counters, step, RNG counters, the batch): the trainer's own
  abstract train state (`jax.eval_shape`) laid out by the trainer's own sharding rules over an `AbstractMesh`
  of the requested size, so no device is needed. These are what a compiled step reports as its argument
  bytes, to the byte (tests/parallel/test_memory_plan.py).
* Step temporaries (an estimate): gradients (float32, sharded like the params), the update's param-sized
  buffers, and the activations the backward pass needs, counted per block from the model's shapes. The
  estimate follows the Megatron-style accounting (Korthikanti et al. 2022) for our blocks: what each matmul,
  norm, attention softmax and MoE capacity buffer saves for the backward pass, in the compute dtype (norms
  and softmax in float32), per example on this device, plus FSDP-gathered weights. `remat="full"` keeps only
  each block's input plus one block recomputed at a time; `"dots"` keeps the matmul outputs. XLA's buffer
  assignment reuses and fuses buffers, so this is a plan to within a small factor (it comes to 0.8-0.9x of
  what compiled CPU steps assign: tests/parallel/test_memory_plan.py, benchmarks/RESULTS.md), not a
  promise. XLA:CPU schedules remat's recomputation early, so there remat saves nothing: `platform="cpu"`
  plans for that.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from clipup_jax.config import ModelConfig, MoEPlan, model_config
from clipup_jax.models.dispatcher import Dispatcher, model_dispatchers
from clipup_jax.models.flops import image_tokens
from clipup_jax.parallel.layout import Layout, human_bytes, spec_axes, state_layout
from clipup_jax.parallel.mesh import ordered_axes, resolve_shape, split_dcn
from clipup_jax.parallel.sharding import data_parallel_size, state_shardings

# Param-sized float32 buffers the update holds besides the gradients: the new params (checked for non-finite
# values before they replace the old ones) and the clipped, scaled update.
UPDATE_BUFFERS = 2


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    layout: Layout  # params and optimizer state per device, by parameter group
    batch_size: int  # global
    local_batch: int  # examples per device
    batch_bytes: int  # this device's inputs
    gradient_bytes: int
    update_bytes: int
    activation_bytes: int
    activation_parts: list[tuple[str, int]]  # (what, bytes) summing to activation_bytes
    device_memory: int | None  # bytes per device, when known
    platform: str  # "accelerator" or "cpu" (see `effective_remat`)
    remat: str  # as the platform honours it

    @property
    def argument_bytes(self) -> int:
        """Train state + batch: what the compiled step's `memory_analysis().argument_size_in_bytes` reports."""
        return self.layout.state_bytes + self.batch_bytes

    @property
    def temp_bytes(self) -> int:
        """Estimated `temp_size_in_bytes`: gradients, update buffers, activations."""
        return self.gradient_bytes + self.update_bytes + self.activation_bytes

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes


def mesh_shape_for(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """`config.mesh` resolved for `num_devices` (one -1 axis takes the rest) and checked against
    `config.dcn_mesh`, the batch and the MoE plans: one-line errors naming the field, before anything compiles."""
    sizes = ordered_axes(resolve_shape(dict(config.mesh), num_devices))
    split_dcn(sizes, dict(config.get("dcn_mesh") or {}))
    model_dispatchers(model_config(config), sizes)  # the trainer's check: experts vs mesh, dispatch vs mode
    dp = data_parallel_size(sizes)
    if config.batch_size % dp:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the data-parallel devices "
                         f"({dp}: mesh {sizes})")
    return sizes


def abstract_mesh(mesh_shape: dict[str, int]) -> AbstractMesh:
    return AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape), axis_types=(AxisType.Auto,) * len(mesh_shape))


def abstract_state_shardings(config: ml_collections.ConfigDict, state: Any, mesh_shape: dict[str, int]) -> Any:
    """The trainer's shardings of `state` over an abstract mesh of `mesh_shape`."""
    return state_shardings(state, abstract_mesh(mesh_shape), model_config(config))


def _batch_bytes(cfg: ModelConfig, local_batch: int) -> int:
    v = cfg.vision
    return local_batch * (v.image_size * v.image_size * 3 * 4 + cfg.text.context_length * 4)  # f32 pixels, i32 ids


def _mlp_saved(tokens: int, width: int, mlp_dim: int, s: int, moe: MoEPlan | None,
               dispatcher: Dispatcher | None) -> int:
    """Bytes per example an MLP (or MoE) sub-block saves for its backward pass, LayerNorm included: ln_2's input
    and output, its float32 centred and normalised input; fc1's output, the activation's gate and output."""
    norm = tokens * (2 * s * width + 2 * 4 * width)
    if moe is None:
        return norm + tokens * s * 3 * mlp_dim
    e, k = moe.num_experts, moe.top_k
    rows = dispatcher.rows_per_group(tokens, e, k)  # expert-MLP rows of one routing group (one example)
    router = tokens * (4 * 3 * e + 4 * 4 * k)  # float32 logits, probs, gates; int routing arrays
    buffers = rows * s * (width + 3 * mlp_dim)  # expert inputs, fc1 outputs, gates, activations
    return norm + router + buffers + tokens * k * s * width  # + the gathered expert outputs per choice


def _attention_saved(tokens: int, width: int, heads: int, s: int) -> int:
    """ln_1 (as ln_2), q/k/v, the float32 softmax and its compute-dtype copy, the attention output."""
    probs = 4 + (s if s != 4 else 0)
    return tokens * (s * 6 * width + 2 * 4 * width) + heads * tokens * tokens * probs


def _tower_activations(name: str, tokens: int, width: int, heads: int, mlp_dim: int, depth: int,
                       moe: MoEPlan | None, dispatcher: Dispatcher | None, remat: str, s: int,
                       local_batch: int) -> tuple[str, int]:
    sparse = set(moe.layer_indices(depth)) if moe is not None else set()
    blocks = [_attention_saved(tokens, width, heads, s)
              + _mlp_saved(tokens, width, mlp_dim, s, moe if i in sparse else None, dispatcher)
              for i in range(depth)]
    if remat == "none":
        per_example = sum(blocks)
    elif remat == "full":  # each block's input, plus the one block being recomputed and differentiated
        per_example = depth * tokens * s * width + max(blocks)
    else:  # "dots": matmul outputs without batch dimensions (qkv, out-proj, fc1, fc2; not the attention einsums)
        dots = tokens * s * (width + 3 * width + width + mlp_dim + width)
        per_example = depth * dots + max(blocks)
    what = f"{name}: {depth} blocks x {tokens} tokens, remat {remat}" + (f", {len(sparse)} MoE" if sparse else "")
    return what, per_example * local_batch


def effective_remat(config: ml_collections.ConfigDict, platform: str) -> str:
    """`config.remat` as the compiled program honours it: XLA:CPU schedules the recomputation early, so its
    buffers coexist with the forward's and remat saves nothing there (measured: same temp bytes)."""
    remat = {False: "none", True: "full"}.get(config.remat, config.remat)
    return "none" if platform == "cpu" else remat


def activation_estimate(cfg: ModelConfig, config: ml_collections.ConfigDict, local_batch: int,
                        mesh_shape: dict[str, int], platform: str = "accelerator") -> list[tuple[str, int]]:
    """(what, bytes per device) of the activations a train step keeps for its backward pass."""
    s = np.dtype(jnp.dtype(config.compute_dtype)).itemsize
    remat = effective_remat(config, platform)
    v, t = cfg.vision, cfg.text
    vt = image_tokens(cfg)
    # The training dispatchers the trainer will run ("accelerator": GPU and TPU choices differ only in einsum
    # vs padded buffers, which hold the same rows).
    train = {tower: d[0] for tower, d in model_dispatchers(cfg, mesh_shape, "cpu" if platform == "cpu" else "gpu").items()}
    parts = [
        _tower_activations("vision", vt, v.width, v.heads, v.mlp_dim, v.depth, v.moe, train.get("vision"), remat, s,
                           local_batch),
        _tower_activations("text", t.context_length, t.width, t.heads, t.mlp_dim, t.depth, t.moe, train.get("text"),
                           remat, s, local_batch),
    ]
    patches = v.grid**2 * v.patch_size**2 * 3
    embed = local_batch * (s * (patches + 3 * vt * v.width) + 4 * vt * v.width + s * 2 * t.context_length * t.width)
    parts.append(("embeddings: patches, positions, ln_pre, token lookup", embed))
    # (B_local x B) float32 logits and the two softmaxes of the contrastive loss.
    parts.append((f"contrastive logits: {local_batch} x {config.batch_size}", 3 * 4 * local_batch * config.batch_size))
    return parts


def gathered_weights(layout: Layout, config: ml_collections.ConfigDict, platform: str = "accelerator") -> int:
    """Bytes of FSDP-sharded weights all-gathered for the forward and kept for the backward (the full weights
    less this device's shard, in the compute dtype); with remat, one block's at a time."""
    s = np.dtype(jnp.dtype(config.compute_dtype)).itemsize
    fsdp = layout.mesh_shape.get("fsdp", 1)
    full = sum(r.param_bytes * (fsdp - 1) * s // np.dtype(r.dtype).itemsize
               for r in layout.rows if any("fsdp" in axes for axes in spec_axes(r.spec, len(r.shape))))
    if effective_remat(config, platform) == "none":
        return full
    cfg = model_config(config)
    return full // max(cfg.vision.depth, cfg.text.depth)


PLATFORMS = ("accelerator", "cpu")


def plan_memory(config: ml_collections.ConfigDict, state: Any, num_devices: int, device_memory: int | None = None,
                platform: str = "accelerator") -> MemoryPlan:
    """The memory plan of `config` on `num_devices` devices (no device needed: abstract shapes and specs), for
    `state`, the trainer's abstract train state of `config` (`train.trainer.abstract_train_state`).
    `platform="cpu"` plans for XLA:CPU, where remat saves no memory (`effective_remat`)."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r}: expected one of {', '.join(PLATFORMS)}")
    mesh_shape = mesh_shape_for(config, num_devices)
    cfg = model_config(config)
    layout = state_layout(state, abstract_state_shardings(config, state, mesh_shape))
    local = config.batch_size // data_parallel_size(mesh_shape)
    parts = activation_estimate(cfg, config, local, mesh_shape, platform)
    gathered = gathered_weights(layout, config, platform)
    if gathered:
        parts.append((f"fsdp-gathered weights ({config.compute_dtype})", gathered))
    return MemoryPlan(layout=layout, batch_size=config.batch_size, local_batch=local,
                      batch_bytes=_batch_bytes(cfg, local), gradient_bytes=layout.params_bytes,
                      update_bytes=UPDATE_BUFFERS * layout.params_bytes,
                      activation_bytes=sum(b for _, b in parts), activation_parts=parts, device_memory=device_memory,
                      platform=platform, remat=effective_remat(config, platform))


def format_plan(plan: MemoryPlan) -> str:
    """The per-device memory table."""
    layout = plan.layout
    mesh = " ".join(f"{k}={v}" for k, v in layout.mesh_shape.items())
    rows = [
        ("params (float32)", layout.params_bytes),
        ("optimizer state (Adam mu + nu, counters)", layout.opt_bytes),
        ("other state (step, RNG counters)", layout.other_bytes),
        (f"batch inputs ({plan.local_batch} examples)", plan.batch_bytes),
        ("= arguments of the train step", plan.argument_bytes),
        ("gradients (float32, sharded like params)", plan.gradient_bytes),
        (f"update buffers ({UPDATE_BUFFERS} x params)", plan.update_bytes),
        ("activations for the backward pass (estimate)", plan.activation_bytes),
        *((f"  {what}", b) for what, b in plan.activation_parts),
        ("= step temporaries (estimate)", plan.temp_bytes),
        ("total per device", plan.total_bytes),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"memory plan per device: mesh {mesh} ({layout.num_devices} devices), global batch {plan.batch_size} "
             f"({plan.local_batch} per device), {plan.platform}, remat {plan.remat}"]
    lines += [f"  {what:<{width}}  {human_bytes(b):>10}" for what, b in rows]
    if plan.device_memory:
        share = plan.total_bytes / plan.device_memory
        verdict = "fits" if share <= 1 else "DOES NOT FIT"
        lines.append(f"  {'device memory':<{width}}  {human_bytes(plan.device_memory):>10}  ({100 * share:.0f} % "
                     f"used: {verdict})")
    return "\n".join(lines)
