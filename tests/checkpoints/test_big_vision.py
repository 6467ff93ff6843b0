"""big_vision `.npz` import, checked against a plain-numpy forward written from big_vision's semantics.

The reference below is deliberately independent of clipup_jax's towers: conv
as a loop over patches, pos-emb added before the cls token, pre-LN blocks with
tanh-GELU and eps 1e-6, bidirectional attention, encoder_norm before pooling.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from clipup_jax.checkpoints import big_vision
from clipup_jax.checkpoints.errors import CheckpointError
from clipup_jax.checkpoints.format import load_checkpoint
from clipup_jax.checkpoints.importing import ImportOptions, import_checkpoint
from clipup_jax.checkpoints.params import model_from_params

IMG = dict(width=48, heads=3, patch=8, image=32, depth=2, mlp=96)
TXT = dict(width=40, heads=2, vocab=100, length=12, depth=2, mlp=80)
OUT = 24
ATTN = "MultiHeadDotProductAttention_0"


# ---------------------------------------------------------------- building files


def _block(rng: np.random.Generator, prefix: str, d: int, h: int, mlp: int) -> dict[str, np.ndarray]:
    dh = d // h
    w = {}
    for ln in ("LayerNorm_0", "LayerNorm_1"):
        w[f"{prefix}/{ln}/scale"] = 1 + 0.1 * rng.standard_normal(d)
        w[f"{prefix}/{ln}/bias"] = 0.1 * rng.standard_normal(d)
    for name in ("query", "key", "value"):
        w[f"{prefix}/{ATTN}/{name}/kernel"] = rng.standard_normal((d, h, dh)) / np.sqrt(d)
        w[f"{prefix}/{ATTN}/{name}/bias"] = 0.1 * rng.standard_normal((h, dh))
    w[f"{prefix}/{ATTN}/out/kernel"] = rng.standard_normal((h, dh, d)) / np.sqrt(d)
    w[f"{prefix}/{ATTN}/out/bias"] = 0.1 * rng.standard_normal(d)
    w[f"{prefix}/MlpBlock_0/Dense_0/kernel"] = rng.standard_normal((d, mlp)) / np.sqrt(d)
    w[f"{prefix}/MlpBlock_0/Dense_0/bias"] = 0.1 * rng.standard_normal(mlp)
    w[f"{prefix}/MlpBlock_0/Dense_1/kernel"] = rng.standard_normal((mlp, d)) / np.sqrt(mlp)
    w[f"{prefix}/MlpBlock_0/Dense_1/bias"] = 0.1 * rng.standard_normal(d)
    return w


def make_weights(seed: int = 0, pool: str = "tok", logit_bias: bool = False) -> dict[str, np.ndarray]:
    """A random two-tower in big_vision's unrolled layout, without the `params/` prefix."""
    rng = np.random.default_rng(seed)
    d, p, grid = IMG["width"], IMG["patch"], IMG["image"] // IMG["patch"]
    w = {
        "img/embedding/kernel": rng.standard_normal((p, p, 3, d)) / np.sqrt(3 * p * p),
        "img/embedding/bias": 0.1 * rng.standard_normal(d),
        "img/pos_embedding": 0.5 * rng.standard_normal((1, grid * grid, d)),
        "img/Transformer/encoder_norm/scale": 1 + 0.1 * rng.standard_normal(d),
        "img/Transformer/encoder_norm/bias": 0.1 * rng.standard_normal(d),
        "img/head/kernel": rng.standard_normal((d, OUT)) / np.sqrt(d),
        "img/head/bias": 0.1 * rng.standard_normal(OUT),
    }
    if pool == "tok":
        w["img/cls"] = rng.standard_normal((1, 1, d))
    for i in range(IMG["depth"]):
        w.update(_block(rng, f"img/Transformer/encoderblock_{i}", d, IMG["heads"], IMG["mlp"]))
    t = TXT["width"]
    w.update({
        "txt/Embed_0/embedding": rng.standard_normal((TXT["vocab"], t)),
        "txt/pos_embedding": 0.5 * rng.standard_normal((1, TXT["length"], t)),
        "txt/Encoder_0/encoder_norm/scale": 1 + 0.1 * rng.standard_normal(t),
        "txt/Encoder_0/encoder_norm/bias": 0.1 * rng.standard_normal(t),
        "txt/head/kernel": rng.standard_normal((t, OUT)) / np.sqrt(t),
        "txt/head/bias": 0.1 * rng.standard_normal(OUT),
        "t": np.array([np.log(10.0)]),
    })
    for i in range(TXT["depth"]):
        w.update(_block(rng, f"txt/Encoder_0/encoderblock_{i}", t, TXT["heads"], TXT["mlp"]))
    if logit_bias:
        w["b"] = np.array([-10.0])
    return {k: v.astype(np.float32) for k, v in w.items()}


def to_layout(w: dict[str, np.ndarray], scanned: bool, prefix: bool) -> dict[str, np.ndarray]:
    """Re-lays unrolled weights as big_vision's `scan=True` (a leading layer axis) and/or under `params/`."""
    out = dict(w)
    if scanned:
        for enc, depth in (("img/Transformer", IMG["depth"]), ("txt/Encoder_0", TXT["depth"])):
            names = [k.removeprefix(f"{enc}/encoderblock_0/") for k in w if k.startswith(f"{enc}/encoderblock_0/")]
            for name in names:
                out[f"{enc}/encoderblock/{name}"] = np.stack([out.pop(f"{enc}/encoderblock_{i}/{name}")
                                                             for i in range(depth)])
    return {("params/" if prefix else "") + k: v for k, v in out.items()}


def save(path: pathlib.Path, w: dict[str, np.ndarray]) -> pathlib.Path:
    np.savez(path, **w)
    return path


# ---------------------------------------------------------------- the reference forward


def _ln(x, w, prefix):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * w[f"{prefix}/scale"] + w[f"{prefix}/bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _attention(x, w, prefix):
    q, k, v = (np.einsum("btd,dhk->bhtk", x, w[f"{prefix}/{n}/kernel"]) + w[f"{prefix}/{n}/bias"][:, None, :]
               for n in ("query", "key", "value"))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])  # no mask: bidirectional in both towers
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhtk,hkd->btd", probs @ v, w[f"{prefix}/out/kernel"]) + w[f"{prefix}/out/bias"]


def _encoder(x, w, enc, depth):
    for i in range(depth):
        b = f"{enc}/encoderblock_{i}"
        x = x + _attention(_ln(x, w, f"{b}/LayerNorm_0"), w, f"{b}/{ATTN}")
        h = _ln(x, w, f"{b}/LayerNorm_1") @ w[f"{b}/MlpBlock_0/Dense_0/kernel"] + w[f"{b}/MlpBlock_0/Dense_0/bias"]
        x = x + _gelu_tanh(h) @ w[f"{b}/MlpBlock_0/Dense_1/kernel"] + w[f"{b}/MlpBlock_0/Dense_1/bias"]
    return _ln(x, w, f"{enc}/encoder_norm")


def ref_image(w, pixels, old_posemb=False):
    w = {k: v.astype(np.float64) for k, v in w.items()}
    kernel, p = w["img/embedding/kernel"], w["img/embedding/kernel"].shape[0]
    g = pixels.shape[1] // p
    x = np.stack([np.einsum("bpqc,pqcd->bd", pixels[:, i * p:(i + 1) * p, j * p:(j + 1) * p], kernel)
                  for i in range(g) for j in range(g)], axis=1) + w["img/embedding/bias"]
    if not old_posemb:
        x = x + w["img/pos_embedding"]  # big_vision adds the pos-emb before the cls token
    if "img/cls" in w:
        x = np.concatenate([np.tile(w["img/cls"], (x.shape[0], 1, 1)), x], axis=1)
    if old_posemb:
        x = x + w["img/pos_embedding"]  # pre-2022 vit.py: cls first, then a grid**2 + 1 pos-emb
    x = _encoder(x, w, "img/Transformer", IMG["depth"])
    pooled = x[:, 0] if "img/cls" in w else x.mean(axis=1)  # encoder_norm comes before the pooling
    return pooled @ w["img/head/kernel"] + w["img/head/bias"]


def ref_text(w, tokens):
    w = {k: v.astype(np.float64) for k, v in w.items()}
    x = w["txt/Embed_0/embedding"][tokens] + w["txt/pos_embedding"]
    if "txt/Encoder_0/pos_embedding" in w:
        x = x + w["txt/Encoder_0/pos_embedding"]
    x = _encoder(x, w, "txt/Encoder_0", TXT["depth"])
    return x[:, -1] @ w["txt/head/kernel"] + w["txt/head/bias"]


def inputs(seed: int = 1):
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((2, IMG["image"], IMG["image"], 3)).astype(np.float32)
    tokens = rng.integers(0, TXT["vocab"], (3, TXT["length"])).astype(np.int32)
    return pixels, tokens


def rel_err(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def assert_matches(cfg, params, w, old_posemb=False):
    model = model_from_params(cfg, params)
    pixels, tokens = inputs()
    assert rel_err(model.encode_image(pixels), ref_image(w, pixels, old_posemb)) < 1e-4
    assert rel_err(model.encode_text(tokens), ref_text(w, tokens)) < 1e-4


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize("scanned,prefix", [(False, False), (True, True), (True, False), (False, True)])
def test_tok_pool_matches_reference(tmp_path, scanned, prefix):
    w = make_weights(logit_bias=prefix)
    cfg, params = big_vision.convert(save(tmp_path / "bv.npz", to_layout(w, scanned, prefix)))
    v, t = cfg.vision, cfg.text
    assert (v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_dim) == (32, 8, 48, 2, 3, 96)
    assert (v.pool, v.class_token, v.pos_embed_covers_cls, v.ln_pre, v.patch_bias, v.proj_bias) == (
        "tok", True, False, False, True, True)
    assert (t.vocab_size, t.context_length, t.width, t.depth, t.heads, t.mlp_dim) == (100, 12, 40, 2, 2, 80)
    assert (t.causal, t.pool, t.proj_bias) == (False, "last", True)
    assert (cfg.embed_dim, cfg.activation, cfg.ln_eps, cfg.logit_bias) == (OUT, "gelu_tanh", 1e-6, prefix)
    np.testing.assert_allclose(params["logit_scale"], np.log(10.0), rtol=1e-6)
    if prefix:
        assert float(params["logit_bias"]) == -10.0
    assert_matches(cfg, params, w)


def test_gap_pool_config(tmp_path):
    cfg, params = big_vision.convert(save(tmp_path / "bv.npz", to_layout(make_weights(pool="gap"), True, False)))
    assert (cfg.vision.pool, cfg.vision.class_token, cfg.vision.num_positions) == ("gap", False, 16)
    assert "visual/class_embedding" not in params


def test_gap_pool_matches_reference(tmp_path):
    w = make_weights(pool="gap")
    cfg, params = big_vision.convert(save(tmp_path / "bv.npz", to_layout(w, False, True)))
    model = model_from_params(cfg, params)
    pixels, _ = inputs()
    assert rel_err(model.encode_image(pixels), ref_image(w, pixels)) < 1e-4


def test_old_layouts_match_reference(tmp_path):
    """A grid**2 + 1-row pos-emb (cls included) under `Transformer/`, and the text pos-emb stored twice."""
    w = make_weights()
    rng = np.random.default_rng(5)
    w["img/pos_embedding"] = rng.standard_normal((1, 17, IMG["width"])).astype(np.float32)
    w["txt/Encoder_0/pos_embedding"] = rng.standard_normal((1, TXT["length"], TXT["width"])).astype(np.float32)
    old = {("img/Transformer/pos_embedding" if k == "img/pos_embedding" else k): v for k, v in w.items()}
    cfg, params = big_vision.convert(save(tmp_path / "bv.npz", old))
    assert cfg.vision.pos_embed_covers_cls and cfg.vision.image_size == 32
    assert_matches(cfg, params, w, old_posemb=True)


def test_activation_and_eps_overrides(tmp_path):
    cfg, _ = big_vision.convert(save(tmp_path / "bv.npz", make_weights()), activation="gelu", ln_eps=1e-5)
    assert (cfg.activation, cfg.ln_eps) == ("gelu", 1e-5)


def test_import_entry_point_round_trip(tmp_path):
    w = make_weights(logit_bias=True)
    src = save(tmp_path / "bv.npz", to_layout(w, True, True))
    import_checkpoint("big_vision", src, tmp_path / "ckpt", ImportOptions())
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.metadata["source"]["format"] == "big_vision"
    assert_matches(ckpt.config, ckpt.params, w)


# ---------------------------------------------------------------- refusals


def _import_fails(tmp_path, src, match):
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    with pytest.raises(CheckpointError, match=match):
        import_checkpoint("big_vision", src, out, ImportOptions())
    assert set(tmp_path.iterdir()) == before  # no checkpoint, no temporary directory


def test_map_head_refused(tmp_path):
    w = make_weights(pool="gap")
    w["img/MAPHead_0/probe"] = np.zeros((1, 1, IMG["width"]), np.float32)
    w["img/MAPHead_0/LayerNorm_0/scale"] = np.ones(IMG["width"], np.float32)
    _import_fails(tmp_path, save(tmp_path / "siglip.npz", to_layout(w, False, True)), "MAPHead")


def test_unknown_key_named(tmp_path):
    w = make_weights()
    w["img/Transformer/encoderblock_0/LayerScale_0/scale"] = np.ones(IMG["width"], np.float32)
    _import_fails(tmp_path, save(tmp_path / "extra.npz", w), "LayerScale_0")


def test_truncated_file_named(tmp_path):
    src = save(tmp_path / "cut.npz", make_weights())
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    _import_fails(tmp_path, src, "cut.npz")


@pytest.mark.parametrize("change,match", [
    (lambda w: [w.pop(k) for k in ("img/head/kernel", "img/head/bias")], "img/head is missing"),
    (lambda w: [w.pop(k) for k in ("txt/head/kernel", "txt/head/bias")], "txt/head is missing"),
    (lambda w: w.update({"txt/head/kernel": w["txt/head/kernel"][:, :16], "txt/head/bias": w["txt/head/bias"][:16]}),
     "outputs 24 .* outputs 16"),
    (lambda w: w.pop("txt/Encoder_0/encoderblock_1/LayerNorm_1/bias"), "txt/Encoder_0/encoderblock_1/LayerNorm_1/bias"),
    (lambda w: w.pop("img/pos_embedding"), "sincos2d"),
    (lambda w: w.update({"txt/MAPHead_0/probe": np.zeros((1, 1, TXT["width"]), np.float32)}), "MAPHead"),
])
def test_refusals_name_the_key(tmp_path, change, match):
    w = make_weights()
    change(w)
    with pytest.raises(CheckpointError, match=match):
        big_vision.convert(save(tmp_path / "bv.npz", w))


# ---------------------------------------------------------------- Hugging Face SigLIP text tower


def test_text_tower_matches_hf_siglip(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    w = make_weights()
    cfg, params = big_vision.convert(save(tmp_path / "bv.npz", w))
    d = TXT["width"]
    hf_cfg = transformers.SiglipTextConfig(
        vocab_size=TXT["vocab"], hidden_size=d, intermediate_size=TXT["mlp"], num_hidden_layers=TXT["depth"],
        num_attention_heads=TXT["heads"], max_position_embeddings=TXT["length"], projection_size=OUT,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, pad_token_id=1, bos_token_id=None, eos_token_id=None,
    )
    sd = {
        "embeddings.token_embedding.weight": w["txt/Embed_0/embedding"],
        "embeddings.position_embedding.weight": w["txt/pos_embedding"][0],
        "final_layer_norm.weight": w["txt/Encoder_0/encoder_norm/scale"],
        "final_layer_norm.bias": w["txt/Encoder_0/encoder_norm/bias"],
        "head.weight": w["txt/head/kernel"].T,
        "head.bias": w["txt/head/bias"],
    }
    for i in range(TXT["depth"]):
        b, h = f"txt/Encoder_0/encoderblock_{i}", f"encoder.layers.{i}"
        for n, hn in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            sd[f"{h}.self_attn.{hn}.weight"] = w[f"{b}/{ATTN}/{n}/kernel"].reshape(d, d).T
            sd[f"{h}.self_attn.{hn}.bias"] = w[f"{b}/{ATTN}/{n}/bias"].reshape(d)
        sd[f"{h}.self_attn.out_proj.weight"] = w[f"{b}/{ATTN}/out/kernel"].reshape(d, d).T
        sd[f"{h}.self_attn.out_proj.bias"] = w[f"{b}/{ATTN}/out/bias"]
        for ln, hn in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
            sd[f"{h}.{hn}.weight"], sd[f"{h}.{hn}.bias"] = w[f"{b}/{ln}/scale"], w[f"{b}/{ln}/bias"]
        for dense, hn in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            sd[f"{h}.mlp.{hn}.weight"] = w[f"{b}/MlpBlock_0/{dense}/kernel"].T
            sd[f"{h}.mlp.{hn}.bias"] = w[f"{b}/MlpBlock_0/{dense}/bias"]
    hf = transformers.SiglipTextModel(hf_cfg).eval()
    hf.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
    _, tokens = inputs()
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(tokens.astype(np.int64))).pooler_output.double().numpy()
    got = model_from_params(cfg, params).encode_text(tokens)
    assert rel_err(got, want) < 1e-4
