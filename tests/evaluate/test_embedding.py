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


def test_short_inputs_run_at_their_size_and_short_last_batches_reuse_the_full_program():
    cfg = preset("tiny")
    embedder = embedding.Embedder(CLIP(cfg, nnx.Rngs(0)), 4)
    shapes = []
    encode = embedder._image
    embedder._image = lambda state, batch: shapes.append(batch.shape[0]) or encode(state, batch)
    pixels = np.random.default_rng(0).standard_normal((7, cfg.vision.image_size, cfg.vision.image_size, 3))
    pixels = pixels.astype(np.float32)
    whole = embedder.images(embedding.chunks(pixels, 4))
    assert shapes == [4, 4]  # the last 3 rows padded to the compiled batch
    alone = embedder.images([pixels[:2]])
    assert shapes == [4, 4, 2]  # 2 images compute 2 rows, not 4
    assert whole.shape == (7, cfg.embed_dim) and alone.shape == (2, cfg.embed_dim)
    np.testing.assert_allclose(alone, whole[:2], rtol=1e-5, atol=1e-6)
