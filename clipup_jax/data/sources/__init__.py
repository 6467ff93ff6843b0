"""Random-access image-text sources (``len`` + ``getitem`` -> record, see ``records``) and the one factory.

``make_source`` maps a config value to a source through the explicit ``SOURCES`` table:

==============  ===========================================  ==================================================
kind            argument                                     example
==============  ===========================================  ==================================================
``tfds``        ``NAME[/CONFIG][:VERSION]/SPLIT``            ``tfds:coco_captions/test`` (+ ``data_dir=...``)
``wds``         tar shards, brace ranges and globs           ``wds:/data/laion/{00000..00099}.tar``
``arrayrecord`` shard files, glob, or a ``clipup-data`` dir  ``arrayrecord:/data/cc3m/*.array_record``
``csv``         a ``.tsv``/``.csv`` of (path, caption)       ``csv:/data/captions.tsv``
``synthetic``   a split of the embedded data set             ``synthetic:train`` (+ ``size=...``)
``imagefolder`` one directory per class (ImageNet's layout)  ``imagefolder:/data/imagenet/val``
``karpathy``    a Karpathy-split COCO / Flickr30k file       ``karpathy:/data/coco/dataset_coco.json`` (+
                                                             ``images=DIR``, ``split=test``)
==============  ===========================================  ==================================================

A dict spec is ``{"kind": ..., "path": <argument>, **options}``; its options go to the source's constructor.
Keyword arguments of ``make_source`` are defaults for them: ``KIND_OPTION=value`` (``tfds_data_dir=...``,
``synthetic_size=...``) applies only when the spec is of that kind, so a trainer can pass defaults for every kind
without knowing which one its config names; an unprefixed keyword goes to whichever kind is chosen.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from clipup_jax.data.sources.arrayrecord import ArrayRecordSource
from clipup_jax.data.sources.captions_table import CaptionsTableSource
from clipup_jax.data.sources.eval_sets import ImageFolderSource, KarpathySource
from clipup_jax.data.sources.paths import expand_braces, resolve_files
from clipup_jax.data.sources.tfds_source import TfdsSource, tfds_source
from clipup_jax.data.sources.webdataset import WebDatasetSource


class Source(Protocol):
    """What grain's ``MapDataset.source`` needs; must also pickle, for multi-process loading."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...


def synthetic_source(split: str, **options: Any) -> Source:
    """The embedded procedurally generated data set (``clipup_jax.data.synthetic``): `world` picks which, the
    other options go to its constructor."""
    from clipup_jax.data import synthetic  # imported on use: it is only needed for this kind

    if not split:
        raise ValueError("synthetic source needs a split, e.g. 'synthetic:train'")
    return synthetic.make_source(split, **options)


SOURCES: dict[str, Callable[..., Source]] = {
    "tfds": tfds_source,
    "wds": WebDatasetSource.from_pattern,
    "arrayrecord": ArrayRecordSource.from_pattern,
    "csv": CaptionsTableSource,
    "synthetic": synthetic_source,
    "imagefolder": ImageFolderSource,
    "karpathy": KarpathySource,
}


def make_source(spec: str | Mapping[str, Any], **defaults: Any) -> Source:
    """The source a config value names (see module doc); unknown kinds and missing paths fail here, clearly."""
    options: dict[str, Any] = {}
    if hasattr(spec, "to_dict"):  # an ml_collections.ConfigDict from an experiment file
        spec = spec.to_dict()
    if isinstance(spec, str):
        kind, sep, argument = spec.partition(":")
        if not sep:
            raise ValueError(f"data source {spec!r} must be KIND:ARGUMENT with KIND one of {', '.join(SOURCES)}")
    elif isinstance(spec, Mapping):
        fields = dict(spec)
        if "kind" not in fields:
            raise ValueError(f"data source {dict(spec)!r} lacks 'kind' (one of {', '.join(SOURCES)})")
        kind, argument, options = fields.pop("kind"), fields.pop("path", ""), fields
    else:
        raise TypeError(f"data source spec must be a string or a dict, got {type(spec).__name__}")
    factory = SOURCES.get(kind)
    if factory is None:
        raise ValueError(f"unknown data source kind {kind!r} in {spec!r}; expected one of {', '.join(SOURCES)}")
    options = {**_defaults_for(kind, defaults), **options}
    try:
        inspect.signature(factory).bind(argument, **options)
    except TypeError as e:
        raise ValueError(f"data source {spec!r}: {kind} sources do not take these options ({e})") from None
    return factory(argument, **options)


def _defaults_for(kind: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The ``make_source`` keywords meant for ``kind``: its own ``KIND_``-prefixed ones (prefix dropped) and the
    unprefixed ones."""
    out = {}
    for name, value in defaults.items():
        prefix, sep, option = name.partition("_")
        if sep and prefix in SOURCES:
            if prefix == kind:
                out[option] = value
        else:
            out[name] = value
    return out


__all__ = ["SOURCES", "ArrayRecordSource", "CaptionsTableSource", "ImageFolderSource", "KarpathySource", "Source",
           "TfdsSource", "WebDatasetSource", "expand_braces", "make_source", "resolve_files", "synthetic_source"]
