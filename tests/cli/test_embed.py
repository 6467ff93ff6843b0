"""clipup-embed end to end: captions and image files in, features equal to transformers' out."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor, CLIPTokenizer

from clipup_jax.checkpoints.importing import ImportOptions, import_checkpoint
from clipup_jax.cli.embed import main as embed
from clipup_jax.data.bpe_trainer import train_bpe, write_hf_tokenizer
from clipup_jax.data.tokenizer import Tokenizer
from tests import reference_models as ref
from tests.cli_helpers import invoke, leftovers
from tests.numerics import scaled_error

CAPTIONS = ["a photo of a red circle", "Two small BLUE squares above a large green triangle!",
            "naïve café &amp; 123 dogs", "the the the the the the the the the the the the the the the the"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    corpus = [f"{n} {c} {s}" for n in ("a", "two", "many") for c in ("red", "blue", "green") for s in ("circle", "square")]
    tok_dir = write_hf_tokenizer(train_bpe(corpus * 3 + CAPTIONS, 40), root / "hf")
    vocab = Tokenizer.from_path(tok_dir).vocab_size
    model = ref.hf_clip(dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                             image_size=24, patch_size=6, hidden_act="gelu"),
                        dict(vocab_size=vocab, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=12, hidden_act="gelu"), 16)
    ref.save_hf(model, root / "hf")  # config + weights beside vocab.json/merges.txt, as on the Hub
    ckpt = root / "ckpt"
    import_checkpoint("hf", root / "hf", ckpt, ImportOptions())  # the CLI path is tested in test_import.py
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    images = root / "images"
    images.mkdir()
    rng = np.random.RandomState(0)
    for i, (w, h) in enumerate([(40, 30), (24, 24), (31, 64), (100, 50)]):
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
    Image.fromarray(rng.randint(0, 256, (30, 30), dtype=np.uint8), mode="L").save(images / "gray.png")
    return root, model, ckpt


def test_texts_match_transformers_with_its_own_tokenizer(setup, tmp_path, capsys):
    root, model, ckpt = setup
    code, out, err = invoke(embed, ["--checkpoint", ckpt, "--texts", root / "captions.txt",
                                    "--out", tmp_path / "t.npz", "--batch-size", 2], capsys)
    assert code == 0, err
    got = np.load(tmp_path / "t.npz")
    hf_tok = CLIPTokenizer.from_pretrained(root / "hf")
    # transformers' tokenizer does no HTML unescaping; hand it the unescaped caption.
    ids = hf_tok([c.replace("&amp;", "&") for c in CAPTIONS], padding="max_length", max_length=12,
                 truncation=True, return_tensors="np")["input_ids"]
    _, want = ref.features(model, np.zeros((1, 24, 24, 3), np.float32), ids.astype(np.int32))
    assert got["text_features"].shape == (len(CAPTIONS), 16)
    assert scaled_error(got["text_features"], want) < 1e-4
    assert got["logit_scale"] == pytest.approx(np.exp(3.3), rel=1e-6)


def test_images_match_transformers_preprocessing(setup, tmp_path, capsys):
    root, model, ckpt = setup
    code, out, err = invoke(embed, ["--checkpoint", ckpt, "--images", root / "images",
                                    "--out", tmp_path / "i.npz", "--batch-size", 3], capsys)
    assert code == 0, err
    got = np.load(tmp_path / "i.npz")
    paths = [pathlib.Path(p) for p in got["image_paths"]]
    assert [p.name for p in paths] == ["0.png", "1.png", "2.png", "3.png", "gray.png"]
    processor = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    pixels = processor([Image.open(p).convert("RGB") for p in paths], return_tensors="np")["pixel_values"]
    want, _ = ref.features(model, pixels.transpose(0, 2, 3, 1).astype(np.float32), np.zeros((1, 12), np.int32))
    assert scaled_error(got["image_features"], want) < 1e-3


def test_pixels_and_tokens_batch_size_invariant(setup, tmp_path, capsys):
    root, model, ckpt = setup
    pixels, tokens = ref.inputs(model, n=5)
    np.save(tmp_path / "p.npy", pixels)
    np.save(tmp_path / "t.npy", tokens)
    results = []
    for bs in (1, 4, 64):
        code, out, err = invoke(embed, ["--checkpoint", ckpt, "--pixels", tmp_path / "p.npy", "--tokens",
                                        tmp_path / "t.npy", "--out", tmp_path / f"o{bs}.npz", "--batch-size", bs],
                                capsys)
        assert code == 0, err
        results.append(np.load(tmp_path / f"o{bs}.npz"))
    want_image, want_text = ref.features(model, pixels, tokens)
    for r in results:
        assert scaled_error(r["image_features"], want_image) < 1e-4
        assert scaled_error(r["text_features"], want_text) < 1e-4


BAD = [
    ("pixels-shape", lambda d: np.save(d / "x.npy", np.zeros((2, 8, 8, 3), np.float32)), ["--pixels", "{x}"], "(N, 24, 24, 3)"),
    ("tokens-range", lambda d: np.save(d / "x.npy", np.full((2, 12), 10**6, np.int32)), ["--tokens", "{x}"], "token ids"),
    ("tokens-float", lambda d: np.save(d / "x.npy", np.zeros((2, 12), np.float32)), ["--tokens", "{x}"], "integer"),
    ("not-npy", lambda d: (d / "x.npy").write_text("hello"), ["--pixels", "{x}"], "x.npy"),
    ("corrupt-image", lambda d: (d / "bad.png").write_bytes(b"\x89PNG broken"), ["--images", "{bad}"], "bad.png"),
    ("nothing", lambda d: None, [], "nothing to embed"),
    ("pixels-uint8", lambda d: np.save(d / "x.npy", np.zeros((2, 24, 24, 3), np.uint8)), ["--pixels", "{x}"],
     "pixels must be float"),
    ("texts-blank-line", lambda d: (d / "caps.txt").write_text("a red circle\n\na blue square\n"),
     ["--texts", "{caps}"], "caps.txt: line 2 is empty"),
    ("texts-table", lambda d: (d / "caps.txt").write_text("0.jpg\ta red circle\n"), ["--texts", "{caps}"],
     "caps.txt: line 1 holds a tab"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_embed_input(case, setup, tmp_path, capsys):
    _, make, argv, needle = case
    root, model, ckpt = setup
    make(tmp_path)
    argv = [a.replace("{x}", str(tmp_path / "x.npy")).replace("{bad}", str(tmp_path / "bad.png"))
            .replace("{caps}", str(tmp_path / "caps.txt")) for a in argv]
    code, out, err = invoke(embed, ["--checkpoint", ckpt, *argv, "--out", tmp_path / "o.npz"], capsys)
    assert code != 0 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.npz").exists() and leftovers(tmp_path) == []


def test_texts_need_a_tokenizer(tmp_path, capsys):
    from flax import nnx

    from clipup_jax.checkpoints.format import save_checkpoint
    from clipup_jax.models.param_tree import params_of
    from clipup_jax.config import preset
    from clipup_jax.models import CLIP

    save_checkpoint(tmp_path / "c", preset("tiny"), params_of(CLIP(preset("tiny"), nnx.Rngs(0))), source={})
    (tmp_path / "caps.txt").write_text("a cat\n")
    code, out, err = invoke(embed, ["--checkpoint", tmp_path / "c", "--texts", tmp_path / "caps.txt",
                                    "--out", tmp_path / "o.npz"], capsys)
    assert code != 0 and "no tokenizer" in err


def test_a_tokenizer_given_for_a_checkpoint_without_one(setup, tmp_path, capsys):
    """--tokenizer stands in for a missing one; fewer tokens than the embedding rows is fine, more is refused."""
    import dataclasses

    from clipup_jax.checkpoints.format import load_checkpoint, save_checkpoint
    from clipup_jax.config import preset
    from clipup_jax.models import CLIP
    from clipup_jax.models.param_tree import params_of
    from flax import nnx

    root, _, ckpt = setup
    own = load_checkpoint(ckpt)
    save_checkpoint(tmp_path / "bare", own.config, own.params, source={})
    args = ["--texts", root / "captions.txt", "--batch-size", 3]
    code, _, err = invoke(embed, ["--checkpoint", ckpt, *args, "--out", tmp_path / "own.npz"], capsys)
    assert code == 0, err
    code, _, err = invoke(embed, ["--checkpoint", tmp_path / "bare", *args, "--tokenizer", root / "hf",
                                  "--out", tmp_path / "given.npz"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "given.npz")["text_features"],
                                  np.load(tmp_path / "own.npz")["text_features"])
    vocab = own.config.text.vocab_size
    for rows, ok in ((vocab + 100, True), (vocab - 1, False)):
        cfg = preset("tiny")
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=rows))
        save_checkpoint(tmp_path / f"v{rows}", cfg, params_of(CLIP(cfg, nnx.Rngs(0))), source={})
        code, _, err = invoke(embed, ["--checkpoint", tmp_path / f"v{rows}", *args, "--tokenizer", root / "hf",
                                      "--out", tmp_path / f"v{rows}.npz"], capsys)
        assert (code == 0) == ok, err
        assert ok or (f"tokenizer has {vocab} tokens, more than the {rows} rows" in err
                      and not (tmp_path / f"v{rows}.npz").exists())
