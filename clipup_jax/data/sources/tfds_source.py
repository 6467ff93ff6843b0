"""TFDS image-text data through ``tfds.data_source`` (ArrayRecord files, random access, no TensorFlow at read time).

Defaults fit ``coco_captions`` (config ``2014``): features ``image`` (JPEG), ``image/id``, ``captions`` =
Sequence{``text``, ``id``}. Its splits are Karpathy's: ``train`` (82,783), ``restval`` (30,504), ``val`` and
``test`` (5,000 each); papers' "Karpathy train" is ``train+restval`` (TFDS split arithmetic works here).

The builder is restored from the prepared files (``features.json``), not from TFDS's builder code: for COCO that
code's ``_info()`` imports TensorFlow (``tf.int64``), which ``tfds.data_source("coco_captions")`` would hit on a
machine without TF. Reading from files is what ``tfds.data_source`` itself does for a version-pinned name
(``coco_captions/2014:1.1.0``). The image stays encoded (``SkipDecoding``) so the pipeline decodes it and can skip
a corrupt one.

Classification sets (``imagenet2012``, ``imagenet_v2``: features ``image``, ``label``, ``file_name``) give records
with a ``label`` and no captions, zero-shot examples for the eval pipeline; ``classes`` holds the label names in
index order (for ImageNet the synsets, in the standard order OpenAI's class names follow).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from clipup_jax.data.sources.records import LABEL, record

COCO = "coco_captions"
# Classification sets, by TFDS name: (label feature, key feature). Their records carry a label and no captions.
CLASSIFICATION = {"imagenet2012": ("label", "file_name"), "imagenet_v2": ("label", "file_name")}


def _default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


class TfdsSource:
    """``len``/``getitem`` over one split (or split expression) of a prepared TFDS image-text data set."""

    def __init__(self, name: str, split: str, *, data_dir: str | os.PathLike[str] | None = None,
                 image_feature: str = "image", captions_feature: Sequence[str] = ("captions", "text"),
                 key_feature: str = "image/id", label_feature: str | None = None) -> None:
        import tensorflow_datasets as tfds
        from tensorflow_datasets.core import read_only_builder

        data_dir = os.fspath(data_dir) if data_dir is not None else _default_data_dir()
        try:
            builder = read_only_builder.builder_from_files(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise FileNotFoundError(f"TFDS data set {name!r} is not prepared in {data_dir} (build it with "
                                    f"`tfds build {name.split(':')[0]} --data_dir {data_dir}` on a machine with "
                                    f"the raw data)") from e
        splits = list(builder.info.splits)
        try:
            self._data = builder.as_data_source(split=split, decoders={image_feature: tfds.decode.SkipDecoding()})
        except (ValueError, KeyError) as e:
            raise ValueError(f"TFDS {name}: cannot read split {split!r} (splits: {', '.join(splits)}): {e}") from e
        features = builder.info.features
        wanted = (image_feature, label_feature if label_feature else captions_feature[0], key_feature)
        for feature in wanted:
            if feature not in features:
                raise ValueError(f"TFDS {name} has no feature {feature!r} (features: {', '.join(features)})")
        self.classes = tuple(features[label_feature].names) if label_feature else None
        config = f"/{builder.builder_config.name}" if builder.builder_config else ""
        self._name = f"{builder.name}{config}:{builder.version}[{split}]"
        self._image, self._captions, self._key = image_feature, tuple(captions_feature), key_feature
        self._label = label_feature

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict:
        example = self._data[int(index)]
        key = example[self._key]
        key = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        if self._label:
            return {**record(example[self._image], (), key), LABEL: int(example[self._label])}
        captions = example
        for part in self._captions:
            captions = captions[part]
        if isinstance(captions, (bytes, str)):
            captions = [captions]
        return record(example[self._image], tuple(captions), key)

    def __repr__(self) -> str:
        return f"TfdsSource({self._name}, {len(self)} examples)"


def tfds_source(spec: str, *, data_dir: str | os.PathLike[str] | None = None, **options) -> TfdsSource:
    """``NAME[/CONFIG][:VERSION]/SPLIT``, e.g. ``coco_captions/test``, ``coco_captions/2014:1.1.0/train+restval`` or
    ``imagenet2012/validation`` (a classification set: see `CLASSIFICATION`)."""
    name, _, split = spec.rpartition("/")
    if not name or not split:
        raise ValueError(f"TFDS source {spec!r} must be NAME[/CONFIG][:VERSION]/SPLIT, e.g. '{COCO}/test'")
    base = name.split("/")[0].split(":")[0]
    if base in CLASSIFICATION:
        label, key = CLASSIFICATION[base]
        options = {"label_feature": label, "key_feature": key, **options}
    return TfdsSource(name, split, data_dir=data_dir, **options)
