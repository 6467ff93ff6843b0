"""Data on gs:// (the loopback emulator): webdataset tar shards (brace patterns and globs), ArrayRecord shards
(staged to the local cache, once) and a CSV table with its images read exactly as their local copies, and short
training runs stream tar shards and read ArrayRecord shards from the bucket."""

from __future__ import annotations

import pickle
import tarfile

import pytest
from etils import epath

from clipup_jax.data.sources import make_source
from clipup_jax.data.sources.arrayrecord import write_shards
from clipup_jax.storage import copy_tree
from clipup_jax.train.run import run_experiment
from tests.data.test_sources import _add, jpeg
from tests.gcs_emulator import gcs_bucket  # noqa: F401 (the fixture)
from tests.train.test_gcs_workdir import _config


@pytest.fixture
def data(tmp_path, gcs_bucket, monkeypatch):  # noqa: F811
    """64 image-caption samples in two tar shards, two ArrayRecord shards and a CSV table, locally and copied to
    the bucket (the staging cache in tmp_path)."""
    monkeypatch.setenv("CLIPUP_CACHE_DIR", str(tmp_path / "cache"))
    local = tmp_path / "data"
    (local / "images").mkdir(parents=True)
    rows = ["filepath,caption"]
    for shard in range(2):
        with tarfile.open(local / f"{shard:05d}.tar", "w") as tar:
            for i in range(32 * shard, 32 * shard + 32):
                _add(tar, f"{i:09d}.jpg", jpeg(3 * i))
                _add(tar, f"{i:09d}.txt", f"a picture number {i}".encode())
                (local / "images" / f"{i}.jpg").write_bytes(jpeg(3 * i))
                rows.append(f"images/{i}.jpg,a picture number {i}")
    (local / "table.csv").write_text("\n".join(rows) + "\n")
    (local / "ar").mkdir()
    write_shards(((f"{i:09d}", jpeg(3 * i), [f"a picture number {i}"]) for i in range(64)), local / "ar", 64, 32)
    remote = epath.Path(gcs_bucket) / "data"
    copy_tree(local, remote)
    return local, remote


def test_sources_on_gcs_read_as_their_local_copies(data):
    local, remote = data
    for spec in ("wds:{}/{{00000..00001}}.tar", "wds:{}/*.tar", "csv:{}/table.csv", "arrayrecord:{}/ar",
                 "arrayrecord:{}/ar/*.array_record"):
        want, got = make_source(spec.format(local)), make_source(spec.format(remote))
        got = pickle.loads(pickle.dumps(got))  # as grain's worker processes receive it
        assert len(got) == len(want) == 64
        for i in (0, 31, 32, 63):
            assert {**got[i], "key": None} == {**want[i], "key": None}
    with pytest.raises(FileNotFoundError, match=f"webdataset shards: no such file '{remote}/00002.tar'"):
        make_source(f"wds:{remote}/{{00000..00002}}.tar")
    # each shard downloaded once (not per opening), under its own name after a key of path and generation
    staged = sorted((local.parent / "cache" / "staged").iterdir(), key=lambda p: p.name.split("-", 1)[1])
    assert [p.name.split("-", 1)[1] for p in staged] == ["data-00000-of-00002.array_record",
                                                         "data-00001-of-00002.array_record"]
    assert [p.read_bytes() for p in staged] == [p.read_bytes() for p in sorted((local / "ar").glob("*.array_record"))]


def test_training_streams_tar_shards_from_the_bucket(data, tmp_path):
    _, remote = data
    config = _config(2)
    config.data.train = f"wds:{remote}/{{00000..00001}}.tar"
    history = run_experiment(config, epath.Path(remote.parent) / "run")
    assert [h["step"] for h in history["train"]] == [1, 2]
    assert all(h["data/skipped_examples"] == 0 for h in history["train"])


def test_training_reads_arrayrecord_shards_from_the_bucket(data, tmp_path):
    _, remote = data
    config = _config(2)
    config.data.train = f"arrayrecord:{remote}/ar"
    history = run_experiment(config, tmp_path / "run")
    assert [h["step"] for h in history["train"]] == [1, 2]
    assert all(h["data/skipped_examples"] == 0 for h in history["train"])
