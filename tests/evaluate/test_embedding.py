"""Embedding during training: a new `Embedder` per evaluation must reuse the compiled towers."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from clipup_jax.config import preset
from clipup_jax.evaluate import embedding
from clipup_jax.models import CLIP


def test_a_new_embedder_for_the_same_model_structure_does_not_recompile():
    cfg = preset("tiny")
    model = CLIP(cfg, nnx.Rngs(0))
    pixels = np.random.default_rng(0).standard_normal((3, cfg.vision.image_size, cfg.vision.image_size, 3))
    first = embedding.Embedder(model, 4).images([pixels.astype(np.float32)])
    before = embedding._encode_image._cache_size()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda x: x * 2.0, params)  # new weights, same structure: what the next periodic eval sees
    second = embedding.Embedder(nnx.merge(graphdef, params, rest), 4).images([pixels.astype(np.float32)])
    assert embedding._encode_image._cache_size() == before
    assert first.shape == second.shape == (3, cfg.embed_dim)
    assert not np.allclose(first, second)  # the new weights were used, not a stale closure
