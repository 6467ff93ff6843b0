"""Sources: each returns the same records from files the tests write (tars, ArrayRecord, TSV/CSV, a fake TFDS dir)."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipup_jax.data.pipeline import decode_image, usable_captions
from clipup_jax.data.sources import (ArrayRecordSource, CaptionsTableSource, TfdsSource, WebDatasetSource,
                                     expand_braces, make_source, resolve_files)
from clipup_jax.data.sources.arrayrecord import decode_record, encode_record, write_shards

NON_UTF8 = b"caf\xe9 au lait"  # latin-1, not UTF-8


def jpeg(value: int, size: tuple[int, int] = (32, 32)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(out, "JPEG")
    return out.getvalue()


# ----- paths ---------------------------------------------------------------------------------------------------------
def test_brace_expansion_keeps_zero_padding_and_lists():
    assert expand_braces("/d/{00008..00011}.tar") == [f"/d/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_resolve_files_names_the_missing_file(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    assert resolve_files(str(tmp_path / "*.tar"), "shards") == [str(tmp_path / "00000.tar")]
    with pytest.raises(FileNotFoundError, match="00001.tar does not exist"):
        resolve_files(str(tmp_path / "{00000..00001}.tar"), "shards")
    with pytest.raises(FileNotFoundError, match=r"no files match .*\*\.zip"):
        resolve_files(str(tmp_path / "*.zip"), "shards")


# ----- webdataset ----------------------------------------------------------------------------------------------------
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two img2dataset-style shards: jpg+txt(+json) pairs, a png sample, one sample missing its caption."""
    root = tmp_path_factory.mktemp("wds")
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i in range(3):
            _add(tar, f"{i:09d}.jpg", jpeg(10 * i))
            _add(tar, f"{i:09d}.txt", f"caption {i}".encode())
            _add(tar, f"{i:09d}.json", b'{"url": "x"}')
    with tarfile.open(root / "00001.tar", "w") as tar:
        _add(tar, "sub/000000010.txt", NON_UTF8)  # caption before image: order inside a sample does not matter
        _add(tar, "sub/000000010.png", jpeg(99))
        _add(tar, "000000011.jpg", jpeg(120))  # no .txt
    return root


def test_webdataset_random_access_matches_tar_contents(shards):
    source = make_source(f"wds:{shards}/{{00000..00001}}.tar")
    assert isinstance(source, WebDatasetSource) and len(source) == 5
    last = source[2]
    assert last["image_bytes"] == jpeg(20) and last["caption"] == "caption 2" and last["key"] == "00000.tar/000000002"
    assert source[3]["caption"] == NON_UTF8 and source[3]["key"] == "00001.tar/sub/000000010"
    assert source[4]["caption"] == "" and decode_image(source[4]).size == (32, 32)
    assert usable_captions(source[3]) == [] and usable_captions(source[4]) == []  # both skipped by the pipeline
    clone = pickle.loads(pickle.dumps(source))  # as grain workers receive it
    assert clone[0] == source[0] and clone[4] == source[4]
    with pytest.raises(IndexError):
        source[5]


def test_webdataset_rejects_compressed_shards(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w:gz") as tar:
        _add(tar, "a.jpg", jpeg(1))
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        make_source(f"wds:{tmp_path}/00000.tar")


# ----- ArrayRecord ---------------------------------------------------------------------------------------------------
def test_arrayrecord_round_trip_across_shards(tmp_path):
    records = [(f"img{i}.jpg", jpeg(i), (f"a {i}", f"b {i}")) for i in range(5)] + [("bad.jpg", b"", (NON_UTF8,))]
    paths = write_shards(iter(records), tmp_path, len(records), shard_size=4)
    assert [p.name for p in paths] == ["data-00000-of-00002.array_record", "data-00001-of-00002.array_record"]
    for spec in (f"arrayrecord:{tmp_path}", f"arrayrecord:{tmp_path}/*.array_record"):
        source = make_source(spec)
        assert isinstance(source, ArrayRecordSource) and len(source) == 6
    source = pickle.loads(pickle.dumps(source))
    assert source[4] == {"image_bytes": jpeg(4), "caption": "a 4", "captions": ("a 4", "b 4"), "key": "img4.jpg"}
    assert source[5]["captions"] == (NON_UTF8,)  # kept as bytes for the pipeline to count, not mangled
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="announced"):
        write_shards(iter(records), tmp_path / "x", len(records) + 1, 4)


def test_arrayrecord_refuses_other_versions():
    raw = encode_record(b"x", ["c"], "k")
    assert decode_record(raw)["key"] == "k"
    with pytest.raises(ValueError, match="version 2"):
        decode_record(raw.replace(b"\xa1v\x01", b"\xa1v\x02"))


# ----- TSV / CSV -----------------------------------------------------------------------------------------------------
@pytest.fixture()
def table_dir(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(jpeg(i))
    return tmp_path


def test_tsv_with_header_groups_captions_and_resolves_relative_paths(table_dir):
    text = "filepath\ttitle\nimages/0.jpg\ta dog\nimages/1.jpg\t\"quoted\" cat, sitting\nimages/0.jpg\tthe dog\n\n"
    (table_dir / "captions.tsv").write_text(text)
    source = make_source(f"csv:{table_dir}/captions.tsv")
    assert isinstance(source, CaptionsTableSource) and len(source) == 2
    assert source[0]["captions"] == ("a dog", "the dog") and source[0]["image_bytes"] == jpeg(0)
    assert source[1]["caption"] == '"quoted" cat, sitting' and source[1]["key"] == "images/1.jpg"


def test_csv_without_header_quotes_and_non_utf8(table_dir):
    data = b'images/0.jpg,"a dog, running"\nimages/1.jpg,' + NON_UTF8 + b"\nimages/2.jpg,\n"
    (table_dir / "c.csv").write_bytes(data)
    source = CaptionsTableSource(table_dir / "c.csv")
    assert [source[i]["caption"] for i in range(3)] == ["a dog, running", NON_UTF8, ""]


@pytest.mark.parametrize("name, text, message", [
    ("bad.tsv", "images/0.jpg\tok\nimages/1.jpg\n", r"bad.tsv: line 2: expected 2 tab-separated columns .* got 1"),
    ("bad.csv", "path,caption\nimages/0.jpg,a,b\n", r"bad.csv: line 2: expected 2 comma-separated columns"),
    ("bad.tsv", "\timages\n", r"bad.tsv: line 1: empty image path"),
    ("gone.tsv", "images/9.jpg\tx\n", r"gone.tsv: line 1: image images/9.jpg does not exist"),
    ("x.json", "{}", r"must be .tsv or .csv"),
])
def test_malformed_tables_name_file_and_line(table_dir, name, text, message):
    (table_dir / name).write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        CaptionsTableSource(table_dir / name)


def test_missing_table_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv does not exist"):
        make_source(f"csv:{tmp_path}/nope.tsv")


# ----- TFDS coco_captions (fake data dir) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A prepared ``coco_captions/2014:1.1.0`` in ArrayRecord format, written by a stand-in builder with COCO's
    exact feature spec (TFDS's own builder needs TensorFlow and the 38 GB download to run)."""
    import tensorflow_datasets as tfds

    class CocoCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "coco_captions"
        VERSION = tfds.core.Version("1.1.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]
        code_path = None  # no checksums file to look for beside this module (a namespace package trips TFDS there)

        def _info(self):
            objects = tfds.features.Sequence({"id": np.int64, "area": np.int64, "bbox": tfds.features.BBoxFeature(),
                                              "label": tfds.features.ClassLabel(num_classes=80),
                                              "is_crowd": np.bool_})
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"), "image/filename": tfds.features.Text(),
                "image/id": np.int64, "objects": objects,
                "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64})}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 3), "restval": self._generate_examples(3, 2),
                    "test": self._generate_examples(5, 2)}

        def _generate_examples(self, start, n):
            for image_id in range(start, start + n):
                yield str(image_id), {
                    "image": jpeg(20 * image_id, (40, 30)), "image/filename": f"COCO_{image_id:012d}.jpg",
                    "image/id": image_id, "objects": [],
                    "captions": [{"text": f"photo {image_id} caption {j}", "id": 10 * image_id + j}
                                 for j in range(5 + image_id % 2)]}

    root = tmp_path_factory.mktemp("tfds")
    CocoCaptions(data_dir=str(root), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return root


def test_tfds_coco_captions_records(tfds_dir):
    source = make_source("tfds:coco_captions/test", tfds_data_dir=tfds_dir)
    assert isinstance(source, TfdsSource) and len(source) == 2
    ids = sorted(int(source[i]["key"]) for i in range(2))
    assert ids == [5, 6]
    record = next(source[i] for i in range(2) if source[i]["key"] == "5")
    assert record["captions"] == tuple(f"photo 5 caption {j}" for j in range(6))  # all captions, Karpathy 'raw'
    assert record["caption"] == "photo 5 caption 0"
    assert decode_image(record).size == (40, 30)  # still-encoded JPEG, decoded by the pipeline
    assert pickle.loads(pickle.dumps(source))[1]["key"] == source[1]["key"]


def test_tfds_karpathy_train_and_pinned_version(tfds_dir):
    source = make_source("tfds:coco_captions/2014:1.1.0/train+restval", tfds_data_dir=tfds_dir)
    assert sorted(int(source[i]["key"]) for i in range(len(source))) == [0, 1, 2, 3, 4]


def test_tfds_errors_name_the_problem(tfds_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"'coco_captions' is not prepared in {tmp_path}"):
        TfdsSource("coco_captions", "test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split 'validation'.*restval"):
        TfdsSource("coco_captions", "validation", data_dir=tfds_dir)
    with pytest.raises(ValueError, match="NAME"):
        make_source("tfds:coco_captions")


# ----- make_source ---------------------------------------------------------------------------------------------------
def test_make_source_dict_spec_and_kind_prefixed_defaults(table_dir):
    (table_dir / "c.tsv").write_text("images/0.jpg\tx\n")
    source = make_source({"kind": "csv", "path": str(table_dir / "c.tsv")}, synthetic_size=3, tfds_data_dir="/x")
    assert len(source) == 1
    synthetic = make_source("synthetic:train", synthetic_size=3, synthetic_image_size=16)
    assert len(synthetic) == 3 and decode_image(synthetic[0]).size == (16, 16)


@pytest.mark.parametrize("spec, message", [
    ("nokind", "must be KIND:ARGUMENT"),
    ("parquet:/x", "unknown data source kind 'parquet'"),
    ({"path": "/x"}, "lacks 'kind'"),
    ({"kind": "csv", "path": "/x.tsv", "bogus": 1}, "do not take these options"),
    ("synthetic:train", "missing a required argument: 'size'"),
])
def test_make_source_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        make_source(spec)
