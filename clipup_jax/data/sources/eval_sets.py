"""The data sets the field reports on, read from the files people have: an image folder (ImageNet's ILSVRC
synset layout) for zero-shot classification, and Karpathy-split COCO / Flickr30k annotations for retrieval.

* ``ImageFolderSource(root)``: one sub-directory per class, classes in sorted name order -- for ImageNet's
  ``n01440764/ ...`` synset folders that is the standard class index order, which OpenAI's class names follow.
  Records carry the class index as ``label`` and no caption.
* ``KarpathySource(annotation, images=DIR, split="test")``: every caption of an image kept together in one
  record (several captions per image are what the Karpathy protocol scores), in the forms the files come in:
  Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json`` (``images[].sentences[].raw``, filtered by
  ``split``), CLIP_benchmark's ``coco_{split}_karpathy.json`` (COCO annotation format) and its
  ``flickr30k_{split}_karpathy.txt`` (a header line, then ``name.jpg,caption``). Image paths are relative to
  ``images`` (default: the annotation file's directory).

Every image an annotation file names must exist (checked when the source is made, one error naming the first
missing file); images are read when a record is asked for, and one that cannot be read then gives ``b""``, which
the pipeline skips and counts like any corrupt image.
"""

from __future__ import annotations

import json
import pathlib
from collections import defaultdict

from clipup_jax.data.sources.records import LABEL, record

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _read(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


class ImageFolderSource:
    def __init__(self, root: str | pathlib.Path):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise ValueError(f"imagefolder:{root}: not a directory")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"imagefolder:{root}: no class sub-directories")
        self.items = [(path, label) for label, name in enumerate(self.classes)
                      for path in sorted((self.root / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
        if not self.items:
            raise ValueError(f"imagefolder:{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its "
                             f"{len(self.classes)} class directories")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, label = self.items[index]
        return {**record(_read(path), (), f"{path.parent.name}/{path.name}"), LABEL: label}


class KarpathySource:
    def __init__(self, annotation: str | pathlib.Path, images: str | pathlib.Path | None = None, split: str = "test"):
        self.annotation = pathlib.Path(annotation)
        if not self.annotation.is_file():
            raise ValueError(f"karpathy:{annotation}: no such annotation file")
        self.images = pathlib.Path(images) if images is not None else self.annotation.parent
        if not self.images.is_dir():
            raise ValueError(f"karpathy:{annotation}: images={self.images} is not a directory")
        try:
            self.items = _parse(self.annotation, split)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"karpathy:{annotation}: not a Karpathy-split annotation file ({type(e).__name__}: "
                             f"{e})") from None
        if not self.items:
            raise ValueError(f"karpathy:{annotation}: no images in split {split!r}")
        missing = [name for name, _ in self.items if not (self.images / name).is_file()]
        if missing:
            raise ValueError(f"karpathy:{annotation}: {len(missing)} of its {len(self.items)} {split} images are not "
                             f"under {self.images} (first: {missing[0]}); pass images=DIR")
        # Evaluation keeps this many caption slots per image, so no caption is cut (COCO has images with 6 or 7).
        self.max_captions = max(len(captions) for _, captions in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        name, captions = self.items[index]
        return record(_read(self.images / name), tuple(captions), name)


def _parse(path: pathlib.Path, split: str) -> list[tuple[str, list[str]]]:
    """(image path relative to the image root, its captions), in file order."""
    if path.suffix == ".txt":  # CLIP_benchmark's Flickr: header, then "name.jpg,caption" (captions may hold commas)
        grouped: dict[str, list[str]] = defaultdict(list)
        for line in path.read_text(encoding="utf-8").splitlines()[1:]:
            if line.strip():
                name, sep, caption = line.strip().partition(".jpg,")
                if not sep:
                    raise ValueError(f"line {line[:60]!r} is not 'name.jpg,caption'")
                grouped[name + ".jpg"].append(caption)
        return list(grouped.items())
    data = json.loads(path.read_text(encoding="utf-8"))
    if "annotations" in data:  # COCO format (CLIP_benchmark's coco_{split}_karpathy.json): already one split
        captions: dict[int, list[str]] = defaultdict(list)
        for a in data["annotations"]:
            captions[a["image_id"]].append(a["caption"])
        return [(image["file_name"], captions[image["id"]]) for image in data["images"]]
    # Karpathy's dataset_{coco,flickr30k}.json: every split in one file.
    return [(str(pathlib.PurePosixPath(image.get("filepath", "")) / image["filename"]),
             [s["raw"] for s in image["sentences"]]) for image in data["images"] if image["split"] == split]
