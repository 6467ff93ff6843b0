"""Bad input to clipup-convert: one line naming the problem, a non-zero exit, nothing written."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from safetensors.numpy import save_file

from clipup_jax.cli.convert import main as convert
from clipup_jax.data.bpe_trainer import write_hf_tokenizer
from tests import reference_models as ref
from tests.cli_helpers import invoke, leftovers

TINY_VISION = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                   image_size=16, patch_size=8)
TINY_TEXT = dict(vocab_size=40, hidden_size=24, intermediate_size=30, num_hidden_layers=1,
                 num_attention_heads=2, max_position_embeddings=7)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("sources")
    model = ref.hf_clip(TINY_VISION, TINY_TEXT, 8)
    hf_dir = ref.save_hf(model, root / "hf")
    state = {k: v.numpy() for k, v in ref.openai_state_dict(model).items()}
    save_file(state, str(root / "openai.safetensors"))
    truncated = (root / "openai.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(truncated[: len(truncated) // 2])
    np.savez(root / "not_clip.npz", weights=np.zeros((3, 3), np.float32))
    extra = dict(state, **{"visual.extra_head.weight": np.zeros(2, np.float32)})
    save_file(extra, str(root / "extra.safetensors"))
    missing = {k: v for k, v in state.items() if k != "visual.ln_post.bias"}
    save_file(missing, str(root / "missing.safetensors"))
    bad_shape = dict(state, **{"visual.proj": np.zeros((32, 9), np.float32)})
    save_file(bad_shape, str(root / "bad_shape.safetensors"))
    (root / "open_clip").mkdir()
    save_file(state, str(root / "open_clip" / "model.safetensors"))
    (root / "notes.txt").write_text("not weights")
    write_hf_tokenizer([("a", "b")], root / "tok")  # vocab 515 != the text tower's 40
    bad_config = root / "hf_bad_act"
    bad_config.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["text_config"]["hidden_act"] = "relu"
    (bad_config / "config.json").write_text(json.dumps(cfg))
    (bad_config / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    bad_eos = root / "hf_bad_eos"
    bad_eos.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["text_config"]["eos_token_id"] = 5
    (bad_eos / "config.json").write_text(json.dumps(cfg))
    (bad_eos / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("precious")
    return {p.name: p for p in root.iterdir()}


CASES = [
    # (id, argv with {name} placeholders, text the one-line error must contain)
    ("truncated", ["--from", "openai", "{truncated.safetensors}"], "truncated.safetensors"),
    ("not-clip", ["--from", "openai", "{not_clip.npz}"], "visual.conv1.weight"),
    ("control", ["--from", "openai", "{openai.safetensors}"], None),  # the same file, intact, imports
    ("extra-key", ["--from", "openai", "{extra.safetensors}"], "visual.extra_head.weight"),
    ("missing-key", ["--from", "openai", "{missing.safetensors}"], "visual.ln_post.bias"),
    ("bad-shape", ["--from", "openai", "{bad_shape.safetensors}"], "visual/proj/kernel"),
    ("preset-mismatch", ["--from", "openai", "{openai.safetensors}", "--model", "ViT-B-16"], "vision.width: file 32"),
    ("unknown-format", ["--from", "onnx", "{openai.safetensors}"], "onnx"),
    ("missing-src", ["--from", "openai", "{openai.safetensors}/nope.pt"], "nope.pt"),
    ("src-is-a-directory", ["--from", "openai", "{open_clip}"], "open_clip: is a directory; give the weights file"),
    ("wrong-suffix", ["--from", "openai", "{notes.txt}"], ".txt"),
    ("big-vision-given-another-layout", ["--from", "big_vision", "{openai.safetensors}"],
     "not a big_vision two-tower checkpoint (no img/ or txt/ parameters; its keys start"),
    ("open-clip-no-activation", ["--from", "open_clip", "{open_clip}/model.safetensors"], "--activation"),
    ("hf-not-a-dir", ["--from", "hf", "{openai.safetensors}"], "model directory"),
    ("hf-no-config", ["--from", "hf", "{open_clip}"], "config.json"),
    ("hf-bad-activation", ["--from", "hf", "{hf_bad_act}"], "hidden_act='relu'"),
    ("hf-bad-eos", ["--from", "hf", "{hf_bad_eos}"], "eos_token_id=5 pools at a token other than the largest id "
                                                       "(39), which this project's towers pool at (CLIP's EOT); "
                                                       "if the tokenizer's end-of-text token is 39, set eos_token_id"),
    ("tokenizer-vocab", ["--from", "hf", "{hf}", "--tokenizer", "{tok}"], "515 tokens"),
    ("bad-activation-flag", ["--from", "openai", "{openai.safetensors}", "--activation", "relu"], "relu"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_import_input(case, sources, tmp_path, capsys):
    _, argv, needle = case
    for name, path in sources.items():
        argv = [a.replace("{" + name + "}", str(path)) for a in argv]
    code, out, err = invoke(convert, ["import", *argv, "--out", tmp_path / "out"], capsys)
    if needle is None:
        assert code == 0, err
        return
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err, err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_is_untouched(sources, capsys):
    code, out, err = invoke(convert, ["import", "--from", "hf", sources["hf"], "--out", sources["existing"]], capsys)
    assert code != 0 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in sources["existing"].iterdir()] == ["keep.txt"]


def test_refused_pickle_never_runs(tmp_path, capsys):
    """A .pt whose pickle would run code is refused by weights_only, and the code does not run."""
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"visual.conv1.weight": Exploit()}))
    code, out, err = invoke(convert, ["import", "--from", "openai", tmp_path / "evil.pt", "--out", tmp_path / "o"],
                            capsys)
    assert code != 0 and "evil.pt" in err
    assert not marker.exists()


def test_inspect_not_a_checkpoint(tmp_path, capsys):
    code, out, err = invoke(convert, ["inspect", tmp_path], capsys)
    assert code != 0 and "clipup.json" in err and len(err.strip().splitlines()) == 1


def test_output_parents_are_made_and_removed_again_on_failure(sources, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "ckpt"
    code, _, err = invoke(convert, ["import", "--from", "openai", sources["openai.safetensors"], "--out", out], capsys)
    assert code == 0 and (out / "clipup.json").is_file(), err
    failed = tmp_path / "other" / "ckpt"
    code, _, err = invoke(convert, ["import", "--from", "openai", sources["missing.safetensors"], "--out", failed],
                          capsys)
    assert code != 0 and not (tmp_path / "other").exists(), err  # the parent it made is gone again
