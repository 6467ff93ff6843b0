"""Import through the CLI and compare features with Hugging Face transformers (PyTorch) CLIPs."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from clipup_jax.checkpoints.format import load_checkpoint
from clipup_jax.checkpoints.params import model_from_params
from clipup_jax.cli.convert import main as convert
from tests import reference_models as ref
from tests.cli_helpers import invoke
from tests.numerics import scaled_error

SHAPES = {
    # odd head counts, a patch grid that is not a power of two, exact GELU (LAION)
    "gelu-odd-heads": (dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
                            image_size=30, patch_size=6, hidden_act="gelu"),
                       dict(vocab_size=99, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                            num_attention_heads=5, max_position_embeddings=13, hidden_act="gelu"), 24),
    # OpenAI's QuickGELU, one head in the text tower, legacy eos_token_id=2 (argmax pooling)
    "quickgelu-eos2": (dict(hidden_size=36, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=7, hidden_act="quick_gelu"),
                       dict(vocab_size=70, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                            num_attention_heads=1, max_position_embeddings=9, hidden_act="quick_gelu",
                            eos_token_id=2), 16),
    # tanh GELU and a non-default LayerNorm epsilon, both read from config.json
    "gelu-tanh-eps": (dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                           image_size=16, patch_size=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
                      dict(vocab_size=50, hidden_size=24, intermediate_size=30, num_hidden_layers=2,
                           num_attention_heads=3, max_position_embeddings=7, hidden_act="gelu_pytorch_tanh",
                           layer_norm_eps=1e-6), 12),
}


def _features(out_dir: pathlib.Path, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ckpt = load_checkpoint(out_dir)
    model = model_from_params(ckpt.config, ckpt.params)
    return np.asarray(model.encode_image(jnp.asarray(pixels))), np.asarray(model.encode_text(jnp.asarray(tokens)))


def _assert_matches(model, out_dir: pathlib.Path) -> None:
    pixels, tokens = ref.inputs(model)
    want_image, want_text = ref.features(model, pixels, tokens)
    got_image, got_text = _features(out_dir, pixels, tokens)
    assert scaled_error(got_image, want_image) < 1e-4
    assert scaled_error(got_text, want_text) < 1e-4


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_hf_directory_matches_transformers(shape, tmp_path, capsys):
    model = ref.hf_clip(*SHAPES[shape])
    src = ref.save_hf(model, tmp_path / "hf")
    code, out, err = invoke(convert, ["import", "--from", "hf", src, "--out", tmp_path / "ckpt"], capsys)
    assert code == 0, err
    _assert_matches(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "clipup.json").read_text())
    hf_act = SHAPES[shape][0]["hidden_act"]
    assert meta["model"]["activation"] == {"gelu_pytorch_tanh": "gelu_tanh"}.get(hf_act, hf_act)
    assert meta["source"]["format"] == "hf"


def test_open_clip_safetensors_with_config(tmp_path, capsys):
    vision, text, embed = SHAPES["gelu-odd-heads"]
    model = ref.hf_clip(vision, text, embed, seed=1)
    src = tmp_path / "open_clip_model.safetensors"
    save_file(ref.openai_state_dict(model), str(src))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": embed, "quick_gelu": False,
        "vision_cfg": {"image_size": 30, "layers": 3, "width": 48, "head_width": 16, "patch_size": 6},
        "text_cfg": {"context_length": 13, "vocab_size": 99, "width": 40, "heads": 5, "layers": 2}}}))
    code, out, err = invoke(convert, ["import", "--from", "open_clip", src, "--out", tmp_path / "ckpt"], capsys)
    assert code == 0, err
    _assert_matches(model, tmp_path / "ckpt")


def test_openai_fp16_pt_wrapped_and_prefixed(tmp_path, capsys):
    """OpenAI heads follow width/64; fp16 weights are upcast; `module.` and {'state_dict'} are unwrapped."""
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, hidden_act="quick_gelu")
    text = dict(vocab_size=60, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                max_position_embeddings=10, hidden_act="quick_gelu")
    model = ref.hf_clip(vision, text, 32, seed=2)
    with torch.no_grad():  # the reference computes with the same fp16-rounded weights, in float32
        for p in model.parameters():
            p.copy_(p.half().float())
    state = {f"module.{k}": v.half() for k, v in ref.openai_state_dict(model).items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "epoch_3.pt")
    code, out, err = invoke(convert, ["import", "--from", "openai", tmp_path / "epoch_3.pt",
                                      "--out", tmp_path / "ckpt"], capsys)
    assert code == 0, err
    assert "width/64" in out  # the head-count rule is stated, not silently applied
    _assert_matches(model, tmp_path / "ckpt")


class _Node(torch.nn.Module):
    pass


def _scripted_openai_archive(state: dict[str, torch.Tensor], path: pathlib.Path) -> None:
    """A TorchScript archive holding OpenAI's keys plus its three non-weight buffers, as released .pt files do."""
    root = _Node()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, _Node())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(value.half(), requires_grad=False))
    for name, value in (("input_resolution", 32), ("context_length", 10), ("vocab_size", 60)):
        root.register_buffer(name, torch.tensor(value))
    torch.jit.save(torch.jit.script(root), str(path))


def test_openai_torchscript_archive(tmp_path, capsys):
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                  image_size=32, patch_size=8, hidden_act="quick_gelu")
    text = dict(vocab_size=60, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                max_position_embeddings=10, hidden_act="quick_gelu")
    model = ref.hf_clip(vision, text, 32, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    _scripted_openai_archive(ref.openai_state_dict(model), tmp_path / "ViT-tiny.pt")
    code, out, err = invoke(convert, ["import", "--from", "openai", tmp_path / "ViT-tiny.pt",
                                      "--out", tmp_path / "ckpt"], capsys)
    assert code == 0, err
    _assert_matches(model, tmp_path / "ckpt")


def test_inspect_reports_counts_and_flops(tmp_path, capsys):
    model = ref.hf_clip(*SHAPES["gelu-odd-heads"])
    invoke(convert, ["import", "--from", "hf", ref.save_hf(model, tmp_path / "hf"), "--out", tmp_path / "c"], capsys)
    code, out, err = invoke(convert, ["inspect", tmp_path / "c"], capsys)
    assert code == 0, err
    total = sum(p.numel() for n, p in model.named_parameters())
    assert f"total {total:,}" in out
    assert "heads 3" in out and "heads 5" in out and "activation gelu" in out


def test_hf_flax_msgpack_without_torch_weights(tmp_path, capsys):
    """transformers 4.x Flax checkpoints (`flax_model.msgpack`) import with no torch file present."""
    from flax import serialization

    model = ref.hf_clip(*SHAPES["gelu-odd-heads"], seed=4)
    src = ref.save_hf(model, tmp_path / "hf")
    (src / "model.safetensors").unlink()
    tree: dict = {}
    for key, value in model.state_dict().items():
        if key.endswith("position_ids"):
            continue
        *path, leaf = key.split(".")
        value = value.numpy()
        if leaf == "weight":
            if "embedding" in path[-1] and "patch" not in path[-1]:
                leaf = "embedding"
            elif "norm" in path[-1] or "layrnorm" in path[-1]:
                leaf = "scale"
            else:
                leaf, value = "kernel", (value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T)
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    (src / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    code, out, err = invoke(convert, ["import", "--from", "hf", src, "--out", tmp_path / "ckpt"], capsys)
    assert code == 0, err
    _assert_matches(model, tmp_path / "ckpt")
