"""Routers from clusters: each upcycled layer's router starts at the k-means centroids of the tokens that layer's
MLP sees on a calibration batch, so tokens that look alike share experts from the first step.

After Cluster-aware Upcycling (arXiv 2604.13508), which sets router rows from the centroids of the dense model's
MLP-input activations. A router scores token x with x @ w_e; with unit-norm columns w_e the top expert is the
centroid of largest cosine, so the clustering is spherical k-means (cosine similarity, k-means++ seeding), and the
columns are scaled to sqrt(width) * router_init_std, the norm of a column of the random init, so the gates start
as soft as a random router's. The experts are still copies of one MLP and the gates are renormalised over the
chosen k, so the upcycled model computes what the dense one does whichever router it starts with.
"""

from __future__ import annotations

import zlib
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.checkpoints.params import model_from_params
from clipup_jax.config import TOWERS, ModelConfig
from clipup_jax.models.towers import routed_tokens

KMEANS_ITERATIONS = 50  # Lloyd iterations at most; it stops when no assignment changes


class Calibration(NamedTuple):
    pixels: np.ndarray  # (B, H, W, 3), normalised as the model's eval pipeline does
    tokens: np.ndarray  # (B, L) token ids, one caption per image


def mlp_inputs(cfg: ModelConfig, params: Mapping[str, np.ndarray], calibration: Calibration
               ) -> dict[str, np.ndarray]:
    """'<tower>/encoder/blocks/<i>/mlp' -> every token its MLP sees on the calibration batch, (N, width): all
    image tokens, and the text tokens its router dispatches at inference (`routed_tokens`: up to each caption's
    pooled token in a causal tower), so padding does not pull the centroids."""
    model = model_from_params(cfg, params, source="calibration model")
    model.set_attributes(records=("mlp_input",), raise_if_not_found=False)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, pixels, tokens):
        return nnx.merge(graphdef, state)(pixels, tokens).records

    records = run(state, calibration.pixels, calibration.tokens)
    routed = routed_tokens(cfg.text, jnp.asarray(calibration.tokens))
    keep = np.ones(calibration.tokens.shape, bool) if routed is None else np.asarray(routed)
    out: dict[str, list[np.ndarray]] = {}
    for layer, record in records.items():
        h = np.asarray(record["mlp_input"])
        text = layer.startswith("text/") or layer.endswith("#1")  # '#1': a shared backbone's text call
        rows = h[keep] if text else h.reshape(-1, h.shape[-1])
        out.setdefault(layer.removesuffix("#1"), []).append(rows)  # a shared backbone's layer sees both modalities
    return {layer: np.concatenate(parts) for layer, parts in out.items()}


def spherical_kmeans(x: np.ndarray, k: int, rng: np.random.Generator,
                     iterations: int = KMEANS_ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (k, d) of unit norm, assignment (n,)) of the rows of `x` by cosine similarity. An emptied
    cluster restarts at the row its centroid serves worst, so all k stay in use."""
    n = len(x)
    if n < k:
        raise ValueError(f"k-means: {n} points for {k} clusters")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centroids = np.empty((k, x.shape[1]), x.dtype)
    centroids[0] = x[rng.integers(n)]
    distance = 1.0 - x @ centroids[0]
    for j in range(1, k):  # k-means++: the next seed drawn in proportion to its distance from the chosen ones
        weights = np.maximum(distance, 0.0)
        pick = rng.choice(n, p=weights / weights.sum()) if weights.sum() > 0 else rng.integers(n)
        centroids[j] = x[pick]
        distance = np.minimum(distance, 1.0 - x @ centroids[j])
    assignment = np.full(n, -1)
    for _ in range(iterations):
        scores = x @ centroids.T
        new = np.argmax(scores, axis=1)
        if np.array_equal(new, assignment):
            break
        assignment = new
        for j in range(k):
            members = x[assignment == j]
            if len(members):
                total = members.sum(axis=0)
                centroids[j] = total / max(np.linalg.norm(total), 1e-12)
            else:
                centroids[j] = x[np.argmin(scores.max(axis=1))]
    return centroids, np.argmax(x @ centroids.T, axis=1)


def cluster_routers(dense: ModelConfig, params: Mapping[str, np.ndarray], sparse: ModelConfig,
                    calibration: Calibration, seed: int) -> dict[str, np.ndarray]:
    """Router kernel (width, E) of every MoE layer of `sparse`, from the dense model's MLP inputs there."""
    examples = len(calibration.pixels)
    if len(calibration.tokens) != examples:
        raise CheckpointError(f"calibration batch: {examples} images but {len(calibration.tokens)} captions")
    plans = [(prefix, getattr(sparse, field)) for prefix, field in TOWERS.values()
             if getattr(sparse, field).moe is not None]
    for _, tower in plans:
        if examples < tower.moe.num_experts:
            raise CheckpointError(f"calibration batch of {examples} examples is smaller than the "
                                  f"{tower.moe.num_experts} experts: give at least one example per expert")
    inputs = mlp_inputs(dense, params, calibration)
    routers = {}
    for prefix, tower in plans:
        plan = tower.moe
        for i in plan.layer_indices(tower.depth):
            block = f"{prefix}/encoder/blocks/{i}/mlp"
            rng = np.random.default_rng([seed, zlib.crc32(block.encode())])
            centroids, _ = spherical_kmeans(inputs[block], plan.num_experts, rng)
            scale = plan.router_init_std * np.sqrt(tower.width)
            routers[f"{block}/router_kernel"] = (scale * centroids.T).astype(np.float32)
    return routers
