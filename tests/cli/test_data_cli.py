"""clipup-data write: folder + captions file -> ArrayRecord shards that the arrayrecord source reads back."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from clipup_jax.cli.data import main as data_cli
from clipup_jax.data.sources import make_source
from tests.cli_helpers import invoke, leftovers


def jpeg(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(out, "JPEG")
    return out.getvalue()


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(jpeg(40 * i))
    (folder / "sub" / "x.png").write_bytes(jpeg(200))
    (folder / "zero.jpg").write_bytes(b"")  # stored as is; the pipeline skips it at read time
    return folder


def write(tmp_path, images, captions, *extra, capsys):
    return invoke(data_cli, ["write", "--images", images, "--captions", captions, "--out", tmp_path / "out", *extra],
                  capsys)


def test_tsv_round_trip_groups_captions_into_shards(tmp_path, images, capsys):
    table = tmp_path / "captions.tsv"
    table.write_text("path\tcaption\n0.jpg\ta dog\nsub/x.png\ta sub cat\n0.jpg\tthe dog\n1.jpg\tone\n2.jpg\ttwo\n"
                     "zero.jpg\tnothing\n")
    code, out, err = write(tmp_path, images, table, "--shard-size", "2", capsys=capsys)
    assert code == 0, err
    assert "5 images, 6 captions in 3 shard(s)" in out
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["num_records"] == 5 and len(meta["shards"]) == 3
    source = make_source(f"arrayrecord:{tmp_path / 'out'}")
    records = {source[i]["key"]: source[i] for i in range(len(source))}
    assert list(records) == ["0.jpg", "sub/x.png", "1.jpg", "2.jpg", "zero.jpg"]
    assert records["0.jpg"]["captions"] == ("a dog", "the dog")
    assert records["sub/x.png"]["image_bytes"] == (images / "sub" / "x.png").read_bytes()
    assert records["zero.jpg"]["image_bytes"] == b""
    assert leftovers(tmp_path) == []


def test_txt_captions_follow_sorted_file_names(tmp_path, images, capsys):
    (tmp_path / "c.txt").write_bytes(b"zero\nfirst\nsecond\n\xff bad\n")  # 0, 1, 2, zero (sub/ is not listed)
    code, out, err = write(tmp_path, images, tmp_path / "c.txt", capsys=capsys)
    assert code == 0, err
    source = make_source(f"arrayrecord:{tmp_path}/out/*.array_record")
    assert [(source[i]["key"], source[i]["caption"]) for i in range(4)] == [
        ("0.jpg", "zero"), ("1.jpg", "first"), ("2.jpg", "second"), ("zero.jpg", b"\xff bad")]


def test_existing_output_needs_force(tmp_path, images, capsys):
    table = tmp_path / "c.csv"
    table.write_text("0.jpg,a dog\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    code, _, err = write(tmp_path, images, table, capsys=capsys)
    assert code == 2 and "already exists (pass --force" in err and err.count("\n") == 1
    assert (tmp_path / "out" / "keep").read_text() == "mine"
    code, _, err = write(tmp_path, images, table, "--force", capsys=capsys)
    assert code == 0, err
    assert not (tmp_path / "out" / "keep").exists() and len(make_source(f"arrayrecord:{tmp_path}/out")) == 1
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("setup, message", [
    (lambda t, i: ("nowhere", "c.tsv"), "--images .*nowhere: no such directory"),
    (lambda t, i: (i, "missing.tsv"), "--captions .*missing.tsv: no such file"),
    (lambda t, i: (i, ("c.tsv", "0.jpg\ta\n1.jpg\n")), r"c.tsv: line 2: expected 2 tab-separated columns"),
    (lambda t, i: (i, ("c.csv", '0.jpg,"unterminated\n')), r"c.csv: line \d+: "),
    (lambda t, i: (i, ("c.tsv", "0.jpg\ta\nnope.jpg\tb\n")), r"c.tsv: line 2: image nope.jpg does not exist"),
    (lambda t, i: (i, ("c.txt", "only one\n")), r"c.txt: 1 caption lines for 4 images"),
    (lambda t, i: (i, ("c.json", "{}")), r"must be .tsv, .csv or .txt"),
])
def test_bad_inputs_fail_in_one_line_and_write_nothing(tmp_path, images, capsys, setup, message):
    folder, captions = setup(tmp_path, images)
    if isinstance(captions, tuple):
        (tmp_path / captions[0]).write_text(captions[1])
        captions = captions[0]
    code, out, err = write(tmp_path, tmp_path / folder, tmp_path / captions, capsys=capsys)
    assert code == 2 and err.startswith("clipup-data: error:") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_argument_errors_are_one_line(tmp_path, images, capsys):
    code, _, err = invoke(data_cli, [], capsys)
    assert code == 2 and err.count("\n") == 1
    (tmp_path / "c.tsv").write_text("0.jpg\ta\n")
    code, _, err = write(tmp_path, images, tmp_path / "c.tsv", "--shard-size", "0", capsys=capsys)
    assert code == 2 and "--shard-size must be >= 1" in err and not (tmp_path / "out").exists()
