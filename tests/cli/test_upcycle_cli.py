"""clipup-convert upcycle end to end: a Hugging Face CLIP imported, upcycled and embedded gives the dense
features; --config equals the flags; inspect reports active parameters; bad input is refused cleanly."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from clipup_jax.checkpoints.format import load_checkpoint
from clipup_jax.cli.convert import main as convert
from clipup_jax.cli.embed import main as embed
from clipup_jax.data.bpe_trainer import train_bpe, write_hf_tokenizer
from clipup_jax.data.tokenizer import Tokenizer
from tests import reference_models as ref
from tests.cli_helpers import invoke, leftovers
from tests.numerics import assert_close, reduction_bound

CAPTIONS = ["a red circle", "two blue squares", "many green circles and a red square"]
FLAGS = ["--num-experts", 4, "--top-k", 2, "--moe-layers", "every_2", "--eval-capacity-factor", "none",
         "--router-init-std", 1.0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """HF random CLIP with its tokenizer -> `clipup-convert import` -> `clipup-convert upcycle` (flags)."""
    root = tmp_path_factory.mktemp("upcycle")
    corpus = [f"{n} {c} {s}" for n in ("a", "two", "many") for c in ("red", "blue", "green")
              for s in ("circle", "square")]
    tok_dir = write_hf_tokenizer(train_bpe(corpus * 3 + CAPTIONS, 30), root / "hf")
    model = ref.hf_clip(dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                             image_size=24, patch_size=6),
                        dict(vocab_size=Tokenizer.from_path(tok_dir).vocab_size, hidden_size=32, intermediate_size=40,
                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=12), 16)
    ref.save_hf(model, root / "hf")
    pixels, _ = ref.inputs(model, n=4)
    np.save(root / "pixels.npy", pixels)
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    return root


def _embed(ckpt: pathlib.Path, out: pathlib.Path, root: pathlib.Path, capsys) -> dict[str, np.ndarray]:
    code, _, err = invoke(embed, ["--checkpoint", ckpt, "--pixels", root / "pixels.npy", "--texts",
                                  root / "captions.txt", "--out", out], capsys)
    assert code == 0, err
    return dict(np.load(out))


def test_import_upcycle_embed_gives_the_dense_features(setup, tmp_path, capsys):
    code, out, err = invoke(convert, ["import", "--from", "hf", setup / "hf", "--out", tmp_path / "dense"], capsys)
    assert code == 0, err
    code, out, err = invoke(convert, ["upcycle", tmp_path / "dense", "--out", tmp_path / "sparse", *FLAGS], capsys)
    assert code == 0, err
    assert "4 experts top-2 in vision and text" in out and "note:" not in out  # dropless eval: no capacity warning
    sparse = load_checkpoint(tmp_path / "sparse")
    assert sparse.metadata["kind"] == "sparse" and sparse.tokenizer_path is not None  # tokenizer carried over
    assert sparse.config.vision.moe.layer_indices(2) == (1,)
    dense = _embed(tmp_path / "dense", tmp_path / "d.npz", setup, capsys)
    upcycled = _embed(tmp_path / "sparse", tmp_path / "s.npz", setup, capsys)
    for name in ("image_features", "text_features"):
        # Forward through 2 blocks; longest reduction the patch embedding (6 * 6 * 3 = 108 terms), ~12 chained.
        assert_close(upcycled[name], dense[name], reduction_bound(6 * 6 * 3, chain=12), name)

    # Routers from clusters of a calibration batch's tokens (read with the checkpoint's tokenizer): still dense.
    code, out, err = invoke(convert, ["upcycle", tmp_path / "dense", "--out", tmp_path / "kmeans", *FLAGS,
                                      "--router-init", "kmeans", "--calibration-data", "synthetic:train",
                                      "--calibration-size", 8], capsys)
    assert code == 0, err
    clustered = load_checkpoint(tmp_path / "kmeans")
    assert clustered.metadata["source"]["upcycling"]["router_init"] == "kmeans"
    router = "text/encoder/layers/1/0/mlp/router_kernel"  # block 1 (every_2 of 2), stacked alone: (1, width, E)
    assert clustered.params[router].shape == sparse.params[router].shape == (1, 32, 4)
    assert not np.allclose(clustered.params[router], sparse.params[router])
    features = _embed(tmp_path / "kmeans", tmp_path / "k.npz", setup, capsys)
    for name in ("image_features", "text_features"):
        assert_close(features[name], dense[name], reduction_bound(6 * 6 * 3, chain=12), name)

    code, out, err = invoke(convert, ["inspect", tmp_path / "sparse"], capsys)
    assert code == 0, err
    assert "kind         sparse" in out and "4 experts, top-2, blocks 1" in out and "eval: dropless, dispatch auto" in out
    total = sum(p.size for p in sparse.params.values())
    # Per MoE block, 2 of the 4 experts' MLPs are idle for each token.
    idle = sum(p.size // 2 for k, p in sparse.params.items() if "/mlp/fc" in k and p.ndim >= 2 and
               f"{k.rsplit('/', 1)[0]}/router_kernel" in sparse.params)
    assert f"total {total:,}" in out and f"active per token {total - idle:,}" in out
    assert "active (dense-equivalent" in out


def test_config_file_equals_flags(setup, tmp_path, capsys):
    code, _, err = invoke(convert, ["import", "--from", "hf", setup / "hf", "--out", tmp_path / "dense"], capsys)
    assert code == 0, err
    (tmp_path / "up.py").write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict(dict(num_experts=4, top_k=1, moe_layers=[0], towers='vision',\n"
        "        eval_capacity_factor=None, expert_noise=0.01, drop_upcycling=0.25, seed=3, dispatch='ragged_dot'))\n")
    code, _, err = invoke(convert, ["upcycle", tmp_path / "dense", "--out", tmp_path / "a", "--config",
                                    tmp_path / "up.py"], capsys)
    assert code == 0, err
    code, _, err = invoke(convert, ["upcycle", tmp_path / "dense", "--out", tmp_path / "b", "--num-experts", 4,
                                    "--top-k", 1, "--moe-layers", "0", "--towers", "vision", "--eval-capacity-factor",
                                    "none", "--expert-noise", 0.01, "--drop-upcycling", 0.25, "--seed", 3], capsys)
    assert code == 0, err
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a.config.vision.moe.dispatch == "ragged_dot" and a.config.text.moe is None
    assert a.config.replace(vision=b.config.vision) == b.config
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, setup):
    from clipup_jax.checkpoints.importing import ImportOptions, import_checkpoint
    from clipup_jax.checkpoints.upcycle import UpcycleOptions, upcycle_checkpoint
    from clipup_jax.config import MoEPlan

    root = tmp_path_factory.mktemp("bad")
    import_checkpoint("hf", setup / "hf", root / "dense", ImportOptions())
    upcycle_checkpoint(root / "dense", root / "sparse", UpcycleOptions(plan=MoEPlan(num_experts=2, top_k=1)))
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("precious")
    (root / "no_get_config.py").write_text("x = 1\n")
    (root / "unknown_field.py").write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict(dict(num_experts=4, top_k=2, moe_layers='every_2', experts=3))\n")
    return root


BAD = [
    # (id, argv after `upcycle`, with {name} placeholders, text the one-line error must contain)
    ("sparse-as-dense", ["{sparse}", *FLAGS], "already sparse"),
    ("layer-beyond-depth", ["{dense}", "--num-experts", 4, "--top-k", 2, "--moe-layers", "0,5"],
     "[5] are outside 0..1"),
    ("last-n-beyond-depth", ["{dense}", "--num-experts", 4, "--top-k", 2, "--moe-layers", "last_3"], "last_3"),
    ("experts-below-top-k", ["{dense}", "--num-experts", 2, "--top-k", 3, "--moe-layers", "every_2"], "top_k=3"),
    ("unknown-tower", ["{dense}", *FLAGS, "--towers", "vision,audio"], "'audio'"),
    ("drop-above-one", ["{dense}", *FLAGS, "--drop-upcycling", 1.5], "drop-upcycling ratio 1.5"),
    ("drop-negative", ["{dense}", *FLAGS, "--drop-upcycling", -0.1], "drop-upcycling ratio -0.1"),
    ("negative-noise", ["{dense}", *FLAGS, "--expert-noise", -0.01], "noise std -0.01"),
    ("zero-router", ["{dense}", *FLAGS, "--router-init-std", 0], "tie"),
    ("bad-capacity", ["{dense}", *FLAGS, "--capacity-factor", "lots"], "--capacity-factor 'lots'"),
    ("bad-layers", ["{dense}", "--num-experts", 4, "--top-k", 2, "--moe-layers", "odd"], "moe_layers='odd'"),
    ("missing-flags", ["{dense}", "--num-experts", 4], "--top-k, --moe-layers required"),
    ("not-a-checkpoint", ["{existing}", *FLAGS], "clipup.json"),
    ("config-and-flags", ["{dense}", "--config", "{no_get_config.py}", "--top-k", 2], "drop --top-k"),
    ("config-no-get-config", ["{dense}", "--config", "{no_get_config.py}"], "get_config"),
    ("config-unknown-field", ["{dense}", "--config", "{unknown_field.py}"], "['experts']"),
    ("config-missing", ["{dense}", "--config", "{nope.py}"], "nope.py"),
    ("kmeans-without-data", ["{dense}", *FLAGS, "--router-init", "kmeans"], "needs --calibration-data"),
    ("calibration-below-experts", ["{dense}", *FLAGS, "--router-init", "kmeans", "--calibration-data",
                                   "synthetic:train", "--calibration-size", 3], "3 examples is smaller than the 4"),
    ("calibration-without-kmeans", ["{dense}", *FLAGS, "--calibration-data", "synthetic:train"],
     "only with --router-init kmeans"),
    ("multiplet-of-another-shape", ["{dense}", *FLAGS, "--multiplet", "{sparse}"], "multiplet checkpoint 1: "),
    ("shared-from-alone", ["{dense}", *FLAGS, "--shared-from", "average"], "--shared-from applies to --multiplet"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_upcycle_input(case, bad_inputs, tmp_path, capsys):
    _, argv, needle = case
    argv = [str(a) for a in argv]
    for name in ("sparse", "dense", "existing", "no_get_config.py", "unknown_field.py", "nope.py"):
        argv = [a.replace("{" + name + "}", str(bad_inputs / name)) for a in argv]
    code, out, err = invoke(convert, ["upcycle", *argv, "--out", tmp_path / "out"], capsys)
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err, err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_is_untouched(bad_inputs, capsys):
    code, out, err = invoke(convert, ["upcycle", bad_inputs / "dense", "--out", bad_inputs / "existing", *FLAGS],
                            capsys)
    assert code != 0 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in (bad_inputs / "existing").iterdir()] == ["keep.txt"]
    assert leftovers(bad_inputs) == []
