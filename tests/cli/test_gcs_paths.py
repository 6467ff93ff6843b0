"""clipup-convert import | upcycle | inspect | export, clipup-embed and clipup-eval with every path on gs:// (the
emulator): sources, outputs, tokenizer, pixels, captions and image files all in the bucket; the checkpoints are
published whole (no temporary prefix left, `clipup.json` present), exports are byte for byte the local ones, and
both embed as their local counterparts do."""

from __future__ import annotations

import json

import numpy as np
import pytest
from etils import epath

from clipup_jax.checkpoints.format import METADATA_FILE, atomic_directory, load_checkpoint
from clipup_jax.cli.convert import main as convert
from clipup_jax.cli.embed import main as embed
from clipup_jax.cli.eval import main as evaluate
from clipup_jax.cli.sweep import main as sweep
from clipup_jax.storage import copy_tree, files_under
from tests.cli.test_sweep_report import CONFIG as TINY_SWEEP_CONFIG
from tests.cli.test_upcycle_cli import FLAGS, setup  # noqa: F401 (the fixture: an HF CLIP, tokenizer, inputs)
from tests.cli_helpers import invoke
from tests.data.test_sources import jpeg
from tests.gcs_emulator import gcs_bucket  # noqa: F401 (the fixture)
from tests.numerics import assert_close, reduction_bound
from tests.train.test_preemption import ROOT


def test_import_upcycle_inspect_embed_eval_with_every_path_on_gcs(setup, gcs_bucket, capsys):  # noqa: F811
    bucket = epath.Path(gcs_bucket)
    copy_tree(setup, bucket / "in")  # the HF model directory (weights, config, tokenizer), pixels, captions
    dense, sparse = bucket / "ckpt" / "dense", bucket / "ckpt" / "sparse"
    code, out, err = invoke(convert, ["import", "--from", "hf", bucket / "in" / "hf", "--out", dense], capsys)
    assert code == 0, err
    code, out, err = invoke(convert, ["import", "--from", "hf", bucket / "in" / "hf", "--out", dense], capsys)
    assert code == 2 and err == f"clipup-convert: error: {dense}: already exists (pass --force to replace it)\n"
    code, out, err = invoke(convert, ["import", "--from", "hf", bucket / "in" / "hf", "--out", dense, "--force"],
                            capsys)
    assert code == 0, err
    assert load_checkpoint(dense).metadata["source"]["path"] == f"{bucket}/in/hf"  # the user's path, not a download
    code, out, err = invoke(convert, ["upcycle", dense, "--out", sparse, *FLAGS], capsys)
    assert code == 0, err
    code, out, err = invoke(convert, ["inspect", sparse], capsys)
    assert code == 0 and "kind         sparse" in out, err
    features = {}
    for name, ckpt in (("dense", dense), ("sparse", sparse)):
        result = bucket / "out" / f"{name}.npz"
        code, out, err = invoke(embed, ["--checkpoint", ckpt, "--pixels", bucket / "in" / "pixels.npy", "--texts",
                                        bucket / "in" / "captions.txt", "--out", result], capsys)
        assert code == 0, err
        with result.open("rb") as f:
            features[name] = dict(np.load(f))
    for name in ("image_features", "text_features"):  # as in the local test: upcycled == dense, dropless
        assert_close(features["sparse"][name], features["dense"][name], reduction_bound(6 * 6 * 3, chain=12), name)
    code, out, err = invoke(evaluate, ["--checkpoint", sparse, "--config", ROOT / "experiments" / "demo.py",
                                       "--config.data.eval_size=8", "--out", bucket / "out" / "eval.json"], capsys)
    assert code == 0, err
    assert json.loads((bucket / "out" / "eval.json").read_text())["checkpoint"] == str(sparse)
    names = [str(p.relative_to(bucket)) for p in files_under(bucket)]
    assert not [n for n in names if ".tmp-" in n or ".old-" in n], names
    assert {"ckpt/dense/clipup.json", "ckpt/sparse/clipup.json", "ckpt/sparse/tokenizer/vocab.json"} <= set(names)


def test_a_failed_write_to_gcs_leaves_neither_output_nor_temporary_prefix(gcs_bucket):  # noqa: F811
    """`atomic_directory` on a store: a fill that fails half way leaves nothing; a replaced checkpoint is never
    visible half-written (its `clipup.json` goes first, comes back last)."""
    bucket = epath.Path(gcs_bucket)

    def fill(tmp, fail: bool) -> None:
        (tmp / "params").mkdir(parents=True)
        (tmp / "params" / "a").write_text("new")
        if fail:
            raise OSError("disk gone")
        (tmp / METADATA_FILE).write_text("{}")

    with pytest.raises(OSError, match="disk gone"):
        atomic_directory(bucket / "out", False, lambda tmp: fill(tmp, True))
    assert not list(bucket.iterdir())
    atomic_directory(bucket / "out", False, lambda tmp: fill(tmp, False))
    assert sorted(str(p.relative_to(bucket)) for p in files_under(bucket)) == ["out/clipup.json", "out/params/a"]
    with pytest.raises(OSError, match="disk gone"):  # the old checkpoint is kept when the new one fails
        atomic_directory(bucket / "out", True, lambda tmp: fill(tmp, True))
    assert (bucket / "out" / METADATA_FILE).exists()


def test_export_and_embed_images_on_gcs_equal_their_local_runs(setup, gcs_bucket, tmp_path, capsys):  # noqa: F811
    bucket = epath.Path(gcs_bucket)
    code, out, err = invoke(convert, ["import", "--from", "hf", setup / "hf", "--out", tmp_path / "dense"], capsys)
    assert code == 0, err
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(jpeg(60 * i + 20))
    copy_tree(tmp_path / "dense", bucket / "dense")
    copy_tree(tmp_path / "images", bucket / "images")
    for to in ("hf", "open_clip"):
        for ckpt, result in ((tmp_path / "dense", tmp_path / to), (bucket / "dense", bucket / "export" / to)):
            code, out, err = invoke(convert, ["export", ckpt, "--to", to, "--out", result], capsys)
            assert code == 0, err
        want = {f.name: f.read_bytes() for f in files_under(tmp_path / to)}
        assert {f.name: f.read_bytes() for f in files_under(bucket / "export" / to)} == want, to
    features = []
    for ckpt, images, result in ((tmp_path / "dense", tmp_path / "images", tmp_path / "images.npz"),
                                 (bucket / "dense", bucket / "images", bucket / "images.npz")):
        code, out, err = invoke(embed, ["--checkpoint", ckpt, "--images", images, "--out", result], capsys)
        assert code == 0, err
        with result.open("rb") as f:
            features.append(dict(np.load(f)))
    np.testing.assert_array_equal(features[1]["image_features"], features[0]["image_features"])
    assert list(features[1]["image_paths"]) == [f"{bucket}/images/{i}.jpg" for i in range(3)]
    assert not [p for p in files_under(bucket) if ".tmp-" in str(p)]


def test_a_sweep_on_a_bucket_runs_resumes_and_reports_there(tmp_path, gcs_bucket, capsys, monkeypatch):  # noqa: F811
    """clipup-sweep --workdir gs://...: a parent and two arms from it train in the bucket, the report is written
    there, and a rerun finds every run finished."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.py").write_text(TINY_SWEEP_CONFIG)
    sweep_file = tmp_path / "sweep.py"
    sweep_file.write_text("BASE = 'tiny.py'\nBASELINE = 'b'\n\ndef get_sweep():\n    return "
                          "[{'name': 'p', 'overrides': []}, {'name': 'b', 'overrides': [], 'from': 'p'}, "
                          "{'name': 'c', 'overrides': ['--config.optim.lr=3e-3'], 'from': 'p'}]\n")
    workdir = f"{gcs_bucket}/sweep"
    code, out, err = invoke(sweep, [sweep_file, "--workdir", workdir, "--report"], capsys)
    assert code == 0, err
    report = json.loads(epath.Path(f"{workdir}/report.json").read_text())
    assert [r["state"] for r in report["runs"]] == ["finished"] * 3 and list(report["differences"]) == ["c - b"]
    assert epath.Path(f"{workdir}/report.png").stat().length > 10_000
    assert not list(tmp_path.glob("gs:*"))  # nothing written to a local ./gs: directory
    code, out, err = invoke(sweep, [sweep_file, "--workdir", workdir, "--report"], capsys)
    assert code == 0 and out.count("finished earlier") == 3, err
