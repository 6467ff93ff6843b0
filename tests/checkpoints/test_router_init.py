"""The two upcycling initialisations beyond tiling: routers from k-means clusters of each layer's inputs on a
calibration batch (still function-preserving), and experts from several dense checkpoints (multiplet)."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
from flax import nnx

from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.checkpoints.format import load_checkpoint, save_checkpoint
from clipup_jax.checkpoints.params import model_from_params, to_blocks
from clipup_jax.checkpoints.router_init import Calibration, mlp_inputs, spherical_kmeans
from clipup_jax.checkpoints.upcycle import TILED, UpcycleOptions, upcycle, upcycle_checkpoint
from clipup_jax.config import ConfigError, MoEPlan, preset
from clipup_jax.models import CLIP
from clipup_jax.models.param_tree import params_of
from tests.numerics import assert_close, reduction_bound

E = 4
FEATURES_BOUND = reduction_bound(8 * 8 * 3, chain=12)  # as test_upcycle: the tiny preset's forward


def _dense(seed: int = 0, **changes):
    cfg = preset("tiny").replace(activation="gelu", **changes)
    return cfg, params_of(CLIP(cfg, nnx.Rngs(seed)))


def _calibration(n: int, seed: int = 0) -> Calibration:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 400, (n, 16)).astype(np.int32)
    for i, end in enumerate(rng.integers(3, 16, n)):
        tokens[i, end] = 499  # the end-of-text id is the largest: pooled there, padding after it
        tokens[i, end + 1:] = 0
    return Calibration(rng.standard_normal((n, 32, 32, 3)).astype(np.float32), tokens)


def _plan(**changes) -> MoEPlan:
    return MoEPlan(**{"num_experts": E, "top_k": 2, "layers": "every_2", "eval_capacity_factor": None, **changes})


def test_spherical_kmeans_recovers_planted_directions():
    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.standard_normal((16, 4)))[0].T  # 4 orthonormal directions
    labels = np.repeat(np.arange(4), 60)
    x = directions[labels] * rng.uniform(0.5, 3.0, (240, 1)) + 0.05 * rng.standard_normal((240, 16))
    centroids, assignment = spherical_kmeans(x, 4, np.random.default_rng(1))
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-6)
    match = np.argmax(centroids @ directions.T, axis=1)  # which planted direction each centroid found
    assert sorted(match) == [0, 1, 2, 3]
    assert np.array_equal(match[assignment], labels)  # every point in its planted cluster
    assert (centroids @ directions[match].T).diagonal().min() > 0.99
    with pytest.raises(ValueError, match="3 points for 4 clusters"):
        spherical_kmeans(x[:3], 4, np.random.default_rng(0))


def test_text_padding_is_not_clustered():
    cfg, params = _dense()
    calibration = _calibration(6)
    inputs = mlp_inputs(cfg, params, calibration)
    ends = np.argmax(calibration.tokens, axis=1)
    assert inputs["text/encoder/blocks/0/mlp"].shape == (int((ends + 1).sum()), cfg.text.width)
    assert inputs["visual/encoder/blocks/1/mlp"].shape == (6 * cfg.vision.num_positions, cfg.vision.width)


def test_kmeans_routers_send_each_cluster_to_its_expert_and_preserve_the_function():
    cfg, params = _dense()
    calibration = _calibration(8)
    opts = UpcycleOptions(plan=_plan(), router_init="kmeans", seed=3)
    up = upcycle(cfg, params, opts, calibration=calibration)
    inputs = mlp_inputs(cfg, params, calibration)
    routers = to_blocks(up.params, up.config)  # the per-block view: '<tower>/encoder/blocks/<i>/mlp/router_kernel'
    moe_blocks = [block for block in inputs if f"{block}/router_kernel" in routers]
    assert sorted(moe_blocks) == ["text/encoder/blocks/1/mlp", "visual/encoder/blocks/1/mlp"]  # every_2 of 2 blocks
    for block in moe_blocks:
        tokens, router = inputs[block], routers[f"{block}/router_kernel"]
        tower = cfg.vision if block.startswith("visual") else cfg.text
        # Columns of the random init's norm, pointing at the layer's own cluster centroids.
        np.testing.assert_allclose(np.linalg.norm(router, axis=0), 0.02 * np.sqrt(tower.width), rtol=1e-5)
        centroids, assignment = spherical_kmeans(tokens, E, np.random.default_rng([3, zlib.crc32(block.encode())]))
        np.testing.assert_allclose(router, 0.02 * np.sqrt(tower.width) * centroids.T, rtol=1e-6)
        top = np.argmax(tokens @ router, axis=1)
        assert np.array_equal(top, assignment)  # the top-1 expert of a token is its cluster
        assert len(set(top)) == E  # every expert has tokens from the first step
    pixels, tokens = calibration
    dense_model, sparse_model = model_from_params(cfg, params), model_from_params(up.config, up.host_params())
    assert_close(np.asarray(sparse_model.encode_image(pixels)), np.asarray(dense_model.encode_image(pixels)),
                 FEATURES_BOUND, "image features")
    assert_close(np.asarray(sparse_model.encode_text(tokens)), np.asarray(dense_model.encode_text(tokens)),
                 FEATURES_BOUND, "text features")
    normal = upcycle(cfg, params, UpcycleOptions(plan=_plan(), seed=3))
    assert not np.allclose(normal.params["text/encoder/layers/1/0/mlp/router_kernel"],
                           up.params["text/encoder/layers/1/0/mlp/router_kernel"])


@pytest.mark.parametrize("bad, needle", [
    (dict(calibration=_calibration(3)), "calibration batch of 3 examples is smaller than the 4 experts"),
    (dict(calibration=None), "needs a calibration batch"),
    (dict(calibration=Calibration(_calibration(5).pixels, _calibration(4).tokens)), "5 images but 4 captions"),
])
def test_bad_calibration_is_refused(bad, needle):
    cfg, params = _dense()
    with pytest.raises(CheckpointError, match=needle):
        upcycle(cfg, params, UpcycleOptions(plan=_plan(), router_init="kmeans"), **bad)


@pytest.mark.parametrize("bad, needle", [
    (dict(router_init="clusters"), "router init 'clusters'"),
    (dict(shared_from="median"), "shared-from 'median'"),
    (dict(router_init="kmeans", plan=_plan(router_init_std=0.0, router_noise_std=1.0)), "router_init_std"),
])
def test_bad_options_are_refused(bad, needle):
    cfg, params = _dense()
    with pytest.raises(ConfigError, match=needle):
        upcycle(cfg, params, UpcycleOptions(**{"plan": _plan(), **bad}), calibration=_calibration(8))


@pytest.mark.parametrize("shared_from", ["first", "average"])
def test_multiplet_experts_come_from_their_checkpoints(shared_from):
    checkpoints = [_dense(seed)[1] for seed in (0, 1, 2)]
    cfg = _dense()[0]
    up = upcycle(cfg, checkpoints[0], UpcycleOptions(plan=_plan(), shared_from=shared_from),
                 multiplet=checkpoints[1:])
    assert up.opt_state is None  # one checkpoint's moments fit none of the others' experts
    params = to_blocks(up.host_params(), up.config)
    checkpoints = [to_blocks(c, cfg) for c in checkpoints]
    for key, value in params.items():
        *block, leaf = key.split("/")
        if leaf in TILED and f"{'/'.join(block)}/router_kernel" in params:
            for e in range(E):  # expert e from checkpoint e mod 3
                np.testing.assert_array_equal(value[e], checkpoints[e % 3][key])
        elif not key.endswith("router_kernel"):
            want = checkpoints[0][key] if shared_from == "first" else np.mean([c[key] for c in checkpoints], axis=0)
            np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7)
    # Different experts: no longer the dense function (said so in the docs), but a working model.
    features = model_from_params(up.config, up.host_params()).encode_image(_calibration(2).pixels)
    assert np.isfinite(np.asarray(features)).all()


def test_multiplet_of_another_architecture_names_the_first_key_and_writes_nothing(tmp_path):
    cfg, params = _dense()
    wide_cfg, wide = _dense(vision=dataclasses.replace(cfg.vision, mlp_dim=128))
    gelu_cfg = cfg.replace(activation="quick_gelu")
    for name, (c, p) in {"dense": (cfg, params), "wide": (wide_cfg, wide), "quick": (gelu_cfg, params)}.items():
        save_checkpoint(tmp_path / name, c, p, source={"format": "test"})
    opts = UpcycleOptions(plan=_plan())
    with pytest.raises(CheckpointError, match=r"multiplet checkpoint 1: visual/encoder/blocks/0/mlp/fc1_bias has "
                                              r"shape \(128,\), the first checkpoint's \(96,\)"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "out", opts, multiplet=[tmp_path / "wide"])
    with pytest.raises(CheckpointError, match=r"multiplet checkpoint 2: .*differs .* at activation \('gelu' vs "
                                              r"'quick_gelu'\)"):
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "out", opts,
                           multiplet=[tmp_path / "dense", tmp_path / "quick"])
    assert not (tmp_path / "out").exists()
    upcycle_checkpoint(tmp_path / "dense", tmp_path / "out", opts, multiplet=[tmp_path / "dense"])
    written = load_checkpoint(tmp_path / "out")
    assert written.metadata["source"]["upcycling"]["multiplet"] == [str((tmp_path / "dense").resolve())]
