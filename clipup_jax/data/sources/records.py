"""The record every source returns, so pipelines need not know where data came from.

A record is a dict:

* ``"image_bytes"``: the encoded image file (JPEG/PNG/...) exactly as stored, decoded later in the pipeline so a
  corrupt file is skipped and counted there instead of crashing a reader; ``b""`` when the sample has no image or
  its file cannot be read. Sources holding decoded pixels give ``"image"`` (uint8 ``(H, W, 3)``) instead.
* ``"caption"``: the first caption; ``"captions"``: all captions of the image (several for COCO-style eval data).
  Each is a ``str``, or the raw ``bytes`` when they are not valid UTF-8 (the pipeline counts those as invalid).
* ``"key"``: a stable identifier (file name, shard/member, COCO image id) for logs and de-duplication.
* optionally ``"label"``: an int class for zero-shot evaluation (the synthetic data set has one).
"""

from __future__ import annotations

IMAGE_BYTES = "image_bytes"
IMAGE = "image"
CAPTION = "caption"
CAPTIONS = "captions"
KEY = "key"
LABEL = "label"


def caption_text(raw: bytes | str) -> str | bytes:
    """UTF-8 text of a stored caption, or the bytes untouched when they do not decode (never raises)."""
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return bytes(raw)


def record(image_bytes: bytes, captions: tuple, key: str) -> dict:
    """A record from encoded image bytes and its captions (decoded where they are UTF-8)."""
    texts = tuple(caption_text(c) for c in captions)
    return {IMAGE_BYTES: image_bytes, CAPTION: texts[0] if texts else "", CAPTIONS: texts, KEY: key}
