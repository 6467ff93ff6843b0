"""CLIP_benchmark's data set names found under a data root in the layouts their users have, and its result file.

`clipup-eval --task ... --dataset NAME --data-root DIR` resolves NAME here to a data source and class names, and
writes the metrics under CLIP_benchmark's keys (`clip_benchmark_result`), so scripts that aggregate its result
files read ours. Looked for under DIR, in this order:

=================  ======================================================================================
``imagenet1k``     ``DIR/val/<wnid>/*`` or ``DIR/<wnid>/*`` (the ILSVRC synset folders)
``mscoco_captions`` ``DIR/coco_{split}_karpathy.json`` (CLIP_benchmark), then ``DIR/dataset_coco.json`` (Karpathy)
``flickr30k``      ``DIR/flickr30k_{split}_karpathy.txt`` (CLIP_benchmark), then ``DIR/dataset_flickr30k.json``
``flickr8k``       ``DIR/flickr8k_{split}_karpathy.txt``, then ``DIR/dataset_flickr8k.json``
=================  ======================================================================================

Image paths in the annotation files are relative to DIR (for Karpathy's Flickr files, whose entries name bare
files, to ``DIR/flickr30k-images`` or ``DIR/Flicker8k_Dataset`` when that folder exists, as the archives unpack).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping

CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"  # CLIP_benchmark's task names
RECALL_KS = (1, 5, 10)
_FLICKR_IMAGE_DIRS = {"flickr30k": "flickr30k-images", "flickr8k": "Flicker8k_Dataset"}


@dataclasses.dataclass(frozen=True)
class BenchmarkSet:
    name: str
    task: str
    source: dict[str, Any]  # a `make_source` spec
    zero_shot: str  # a `config.data.zero_shot` value: class names and templates, or ""


def find(name: str, root: str | pathlib.Path, split: str = "test") -> BenchmarkSet:
    """`name` under `root`, or a one-line error naming what was looked for."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise ValueError(f"--data-root {root}: not a directory")
    if name == "imagenet1k":
        folder = root / "val" if (root / "val").is_dir() else root
        return BenchmarkSet(name, CLASSIFICATION, {"kind": "imagefolder", "path": str(folder)}, "imagenet1k")
    if name == "mscoco_captions":
        candidates = [(root / f"coco_{split}_karpathy.json", root), (root / "dataset_coco.json", root)]
    elif name in _FLICKR_IMAGE_DIRS:
        unpacked = root / _FLICKR_IMAGE_DIRS[name]
        candidates = [(root / f"{name}_{split}_karpathy.txt", root),
                      (root / f"dataset_{name}.json", unpacked if unpacked.is_dir() else root)]
    else:
        raise ValueError(f"--dataset {name!r}: expected one of imagenet1k, mscoco_captions, flickr30k, flickr8k")
    for annotation, images in candidates:
        if annotation.is_file():
            return BenchmarkSet(name, RETRIEVAL, {"kind": "karpathy", "path": str(annotation), "images": str(images),
                                                  "split": split}, "")
    raise ValueError(f"--dataset {name}: none of {', '.join(str(a) for a, _ in candidates)} exists")


def clip_benchmark_result(dataset: BenchmarkSet, metrics: Mapping[str, float], model: str,
                          pretrained: str) -> dict[str, Any]:
    """A CLIP_benchmark result record (its keys and metric names) from `clipup_jax.evaluate.run.evaluate`'s."""
    if dataset.task == CLASSIFICATION:
        scores = {"acc1": metrics["zero_shot_top1"], "acc5": metrics["zero_shot_top5"],
                  "mean_per_class_recall": metrics["zero_shot_mean_per_class_recall"]}
    else:  # CLIP_benchmark names a direction by what is retrieved: text -> image is image retrieval
        scores = {}
        for k in RECALL_KS:
            scores[f"image_retrieval_recall@{k}"] = metrics[f"text_to_image_R@{k}"]
            scores[f"text_retrieval_recall@{k}"] = metrics[f"image_to_text_R@{k}"]
    return {"dataset": dataset.name, "model": model, "pretrained": pretrained, "task": dataset.task,
            "metrics": scores, "language": "en"}
