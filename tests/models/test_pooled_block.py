"""A tower reads one row per sample after its blocks, so its last block computes only that row where this is exact
(nothing recorded, a row-local MLP); the features are those of computing every row, and the program is smaller."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipup_jax.config import ModelConfig, MoEPlan
from clipup_jax.models import CLIP
from clipup_jax.models.attention import SelfAttention
from clipup_jax.models.encoder import for_inference
from tests.models.test_scan import FAST_COMPILE, FWD_BOUND as BOUND, TEXT, VISION
from tests.numerics import assert_close

DROPLESS = MoEPlan(layers="every_2", num_experts=4, top_k=2, eval_capacity_factor=None)
CAPPED = dataclasses.replace(DROPLESS, eval_capacity_factor=1.0)


def _model(plan: MoEPlan | None, scan: bool = False) -> CLIP:
    cfg = ModelConfig(vision=dataclasses.replace(VISION, moe=plan), text=dataclasses.replace(TEXT, moe=plan),
                      embed_dim=16)
    return CLIP(cfg, nnx.Rngs(0, router=1), scan=scan)


def _inputs() -> tuple[jax.Array, jax.Array]:
    pixels = jnp.asarray(np.random.RandomState(0).randn(4, 16, 16, 3), jnp.float32)
    tokens = np.random.RandomState(1).randint(1, 60, (4, 8))
    for row, eot in enumerate((7, 3, 5, 0)):  # CLIP's EOT is the largest id; padding after it
        tokens[row, eot], tokens[row, eot + 1:] = 63, 0
    return pixels, jnp.asarray(tokens, jnp.int32)


def _encode(model: CLIP, tower: str, records: tuple[str, ...]) -> tuple[np.ndarray, float]:
    """Features, and the compiled program's FLOPs, with `records` asked of the encoders (any forces every row)."""
    model.set_attributes(records=records, raise_if_not_found=False)
    graphdef, state = nnx.split(model)
    arg = _inputs()[0 if tower == "image" else 1]
    fn = jax.jit(lambda s, x: getattr(nnx.merge(graphdef, s), f"encode_{tower}")(x))
    compiled = fn.lower(state, arg).compile(FAST_COMPILE)
    return np.asarray(compiled(state, arg)), compiled.cost_analysis()["flops"]


@pytest.mark.parametrize("causal", [False, True])
def test_attention_at_query_rows_is_those_rows_of_full_attention(causal):
    attn = SelfAttention(32, 2, 4, nnx.Rngs(0))
    x = jnp.asarray(np.random.RandomState(2).randn(3, 8, 32), jnp.float32)
    queries = jnp.asarray([7, 0, 4])
    every_row = attn(x, causal)
    assert_close(attn(x, causal, queries=queries)[:, 0], every_row[jnp.arange(3), queries], BOUND)


@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize("form", ["loop", "scan", "inference"])
def test_dense_tower_last_block_computes_only_the_pooled_rows(tower, form):
    model = _model(None, scan=form == "scan")
    model = for_inference(model) if form == "inference" else model
    pooled, pooled_flops = _encode(model, tower, ())
    every_row, all_flops = _encode(model, tower, ("mlp_input",))
    assert_close(pooled, every_row, BOUND)
    if form != "scan":  # XLA's cost analysis counts a loop's body once, whatever its trip count
        assert pooled_flops < 0.95 * all_flops, (pooled_flops, all_flops)  # the last of 4 blocks, bar its k/v


@pytest.mark.parametrize("tower", ["image", "text"])
def test_dropless_moe_last_block_computes_only_the_pooled_rows(tower):
    # The dense-reference dispatch has no loop, so the compiled FLOPs count what runs.
    model = _model(dataclasses.replace(DROPLESS, eval_dispatch="dense_reference"))
    assert model.visual.encoder.layers[-1][-1].row_local()
    pooled, pooled_flops = _encode(model, tower, ())
    every_row, all_flops = _encode(model, tower, ("moe",))
    assert_close(pooled, every_row, BOUND)
    assert pooled_flops < 0.95 * all_flops, (pooled_flops, all_flops)
    model.train()  # training's capacity makes rows compete for expert slots
    assert not model.visual.encoder.layers[-1][-1].row_local()


def test_capped_moe_last_block_computes_every_row():
    """With an eval capacity, whether the pooled token keeps its experts depends on the other tokens: the last
    block then routes every row, as the capacity's definition asks."""
    model = _model(dataclasses.replace(CAPPED, eval_dispatch="einsum"))
    assert not model.visual.encoder.layers[-1][-1].row_local()
    for tower in ("image", "text"):
        unasked, unasked_flops = _encode(model, tower, ())
        every_row, all_flops = _encode(model, tower, ("moe",))
        assert_close(unasked, every_row, BOUND)
        assert unasked_flops == pytest.approx(all_flops, rel=1e-3)
