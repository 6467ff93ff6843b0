"""The field's eval sets from small files in each form people have them: an ImageNet-style image folder for
zero-shot (OpenAI's class names and 80 templates), and Karpathy-split COCO / Flickr30k annotations for retrieval,
with every caption of an image kept in one record."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from clipup_jax.config import preset
from clipup_jax.data.bpe_trainer import train_bpe, write_hf_tokenizer
from clipup_jax.data.sources import make_source
from clipup_jax.data.tokenizer import Tokenizer
from clipup_jax.evaluate import templates
from clipup_jax.evaluate.run import EvalData, eval_data, evaluate, zero_shot_classes
from clipup_jax.models import CLIP

CAPTIONS = {"a.jpg": ["a red circle", "a circle, red and round"], "b.jpg": ["two blue squares"],
            "c.jpg": ["a green triangle", "one triangle", "green, pointed"]}


def _image(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (20, 28, 3), dtype=np.uint8)).save(path, "JPEG")


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory):
    """The same test split in Karpathy's JSON, CLIP_benchmark's COCO JSON and its Flickr text file."""
    root = tmp_path_factory.mktemp("karpathy")
    for i, name in enumerate([*CAPTIONS, "train_only.jpg"]):
        _image(root / "val2014" / name, i)
        _image(root / "flat" / name, i)
    images = [{"filepath": "val2014", "filename": name, "split": "test",
               "sentences": [{"raw": c} for c in caps]} for name, caps in CAPTIONS.items()]
    images.insert(1, {"filepath": "val2014", "filename": "train_only.jpg", "split": "train",
                      "sentences": [{"raw": "not in the test split"}]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    coco = {"images": [{"id": 10 + i, "file_name": f"val2014/{name}"} for i, name in enumerate(CAPTIONS)],
            "annotations": [{"image_id": 10 + i, "id": 100 * i + j, "caption": c}
                            for i, caps in enumerate(CAPTIONS.values()) for j, c in enumerate(caps)]}
    coco["annotations"].sort(key=lambda a: a["id"] % 100)  # interleaved across images, in order within each
    (root / "coco_test_karpathy.json").write_text(json.dumps(coco))
    lines = ["image,caption"] + [f"{name},{c}" for name, caps in CAPTIONS.items() for c in caps]
    (root / "flat" / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    return root


def _records(source):
    return [(r["key"].split("/")[-1], list(r["captions"]), len(r["image_bytes"]) > 0) for r in source]


def test_every_karpathy_form_gives_the_same_grouped_records(karpathy):
    want = [(name, caps, True) for name, caps in CAPTIONS.items()]
    forms = [make_source(f"karpathy:{karpathy / 'dataset_coco.json'}"),
             make_source({"kind": "karpathy", "path": str(karpathy / "coco_test_karpathy.json")}),
             make_source(f"karpathy:{karpathy / 'flat' / 'flickr30k_test_karpathy.txt'}")]
    for source in forms:
        assert _records(source) == want and source.max_captions == 3
    train = make_source({"kind": "karpathy", "path": str(karpathy / "dataset_coco.json"), "split": "train"})
    assert _records(train) == [("train_only.jpg", ["not in the test split"], True)]


@pytest.mark.parametrize("spec, match", [
    ("karpathy:{root}/gone.json", "no such annotation file"),
    ({"kind": "karpathy", "path": "{root}/dataset_coco.json", "split": "restval"}, "no images in split 'restval'"),
    ({"kind": "karpathy", "path": "{root}/dataset_coco.json", "images": "{root}/nowhere"}, "not a directory"),
    ("karpathy:{root}/bad.json", "not a Karpathy-split annotation file"),
    ({"kind": "karpathy", "path": "{root}/dataset_coco.json", "images": "{root}/flat"},
     "3 of its 3 test images are not under .*flat \\(first: val2014/a.jpg\\)"),
    ("imagefolder:{root}/val2014/a.jpg", "not a directory"),
    ("imagefolder:{root}/val2014", "no class sub-directories"),
])
def test_bad_eval_sets_are_one_line_errors(karpathy, spec, match):
    (karpathy / "bad.json").write_text(json.dumps({"images": [{"file": "x"}]}))
    spec = spec.format(root=karpathy) if isinstance(spec, str) else {k: v.format(root=karpathy) for k, v in spec.items()}
    with pytest.raises(ValueError, match=match):
        make_source(spec)


def _tokenizer(tmp_path) -> Tokenizer:
    corpus = [*(c for caps in CAPTIONS.values() for c in caps), *templates.imagenet1k()[0][:50]]
    return Tokenizer.from_path(write_hf_tokenizer(train_bpe(corpus, 30), tmp_path / "tok"))


def _model(tokenizer: Tokenizer) -> CLIP:
    cfg = preset("tiny")
    return CLIP(cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=tokenizer.vocab_size)), nnx.Rngs(0))


def test_retrieval_on_a_karpathy_split(karpathy, tmp_path):
    tokenizer = _tokenizer(tmp_path)
    data = EvalData(make_source(f"karpathy:{karpathy / 'dataset_coco.json'}"), tokenizer)
    metrics = evaluate(_model(tokenizer), data, batch_size=2)
    assert metrics["eval_images"] == 3 and metrics["eval_captions"] == 6  # every caption of every image
    assert metrics["image_to_text_R@10"] == metrics["text_to_image_R@10"] == 1.0  # 3 images, 6 captions
    assert "zero_shot_top1" not in metrics


def test_imagenet_folder_zero_shot_with_openai_names_and_templates(tmp_path):
    """1000 synset folders in the standard (sorted) order, a few holding images; OpenAI's class names follow it."""
    names, prompts = templates.imagenet1k()
    assert len(names) == 1000 and len(prompts) == 80 and names[:2] == ("tench", "goldfish")
    assert all("{}" in p for p in prompts) and len(set(prompts)) == 80
    root = tmp_path / "val"
    wnids = [f"n{7 * i + 1000:08d}" for i in range(1000)]
    for wnid in wnids:
        (root / wnid).mkdir(parents=True)
    for i, label in enumerate((0, 1, 1, 999)):
        _image(root / wnids[label] / f"ILSVRC2012_val_{i:08d}.JPEG", i)
    (root / wnids[0] / "notes.txt").write_text("not an image")
    source = make_source(f"imagefolder:{root}")
    assert [r["label"] for r in source] == [0, 1, 1, 999] and all(r["captions"] == () for r in source)

    class_names, class_prompts = zero_shot_classes("imagenet1k")
    three = tmp_path / "three"
    for i, wnid in enumerate(wnids[:3]):
        _image(three / wnid / "x.JPEG", i)
    with pytest.raises(ValueError, match="1000 class names for the 3 classes"):
        eval_data(make_source(f"imagefolder:{three}"), _tokenizer(tmp_path), zero_shot="imagenet1k")
    assert (class_names, class_prompts) == (names, prompts)
    tokenizer = _tokenizer(tmp_path)
    metrics = evaluate(_model(tokenizer), EvalData(source, tokenizer, None, class_names[:1000], class_prompts[:2]),
                       batch_size=4)
    assert metrics["eval_images"] == 4 and metrics["eval_captions"] == 0
    assert {"zero_shot_top1", "zero_shot_top5", "zero_shot_mean_per_class_recall"} <= set(metrics)
    assert not any(k.startswith(("image_to_text", "text_to_image")) for k in metrics)  # no captions: no retrieval


def test_clip_benchmark_class_name_and_template_files(tmp_path):
    (tmp_path / "en_classnames.json").write_text(json.dumps({"cars": ["audi", "bmw"], "pets": ["cat"]}))
    (tmp_path / "en_zeroshot_classification_templates.json").write_text(
        json.dumps({"cars": ["a photo of a {c}.", "a {c}, a car."]}))
    assert zero_shot_classes(f"clip_benchmark:cars@{tmp_path}") == (("audi", "bmw"), ("a photo of a {}.", "a {}, a car."))
    with pytest.raises(ValueError, match="no templates for 'pets'"):
        zero_shot_classes(f"clip_benchmark:pets@{tmp_path}")
    with pytest.raises(ValueError, match="config.data.zero_shot='imagenet21k'"):
        zero_shot_classes("imagenet21k")


def test_tfds_imagenet2012_validation_is_a_zero_shot_set(tmp_path):
    """A prepared `imagenet2012` (written by a stand-in builder with TFDS's feature spec: image, label, file_name):
    records carry the label and no captions, its class names come from the data set, and zero-shot runs on it."""
    import io

    import tensorflow_datasets as tfds

    wnids = ["n01440764", "n01443537", "n01484850"]

    class Imagenet2012(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "imagenet2012"
        VERSION = tfds.core.Version("5.1.0")
        code_path = None  # no checksums file to look for beside this module

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"), "label": tfds.features.ClassLabel(names=wnids),
                "file_name": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples()}

        def _generate_examples(self):
            for i, label in enumerate((0, 2, 2, 1)):
                buffer = io.BytesIO()
                Image.fromarray(np.random.RandomState(i).randint(0, 256, (20, 28, 3), dtype=np.uint8)).save(buffer, "JPEG")
                yield str(i), {"image": buffer.getvalue(), "label": label, "file_name": f"ILSVRC2012_val_{i:08d}.JPEG"}

    Imagenet2012(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    source = make_source("tfds:imagenet2012/validation", tfds_data_dir=tmp_path / "tfds")
    assert source.classes == tuple(wnids)
    records = sorted((r["key"], r["label"], r["captions"]) for r in map(source.__getitem__, range(len(source))))
    assert records == [(f"ILSVRC2012_val_{i:08d}.JPEG", label, ()) for i, label in enumerate((0, 2, 2, 1))]
    with pytest.raises(ValueError, match="1000 class names for the 3 classes"):
        eval_data(source, _tokenizer(tmp_path), zero_shot="imagenet1k")
    tokenizer = _tokenizer(tmp_path)
    names, prompts = templates.imagenet1k()
    metrics = evaluate(_model(tokenizer), EvalData(source, tokenizer, None, names[:3], prompts[:2]), batch_size=4)
    assert metrics["eval_images"] == 4 and metrics["eval_captions"] == 0
    assert 0.0 <= metrics["zero_shot_top1"] <= metrics["zero_shot_top5"] == 1.0  # 3 classes: all in the top 5
