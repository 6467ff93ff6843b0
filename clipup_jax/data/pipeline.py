"""Grain pipelines from a source of image-text records (see ``sources.records``) to model batches.

Train: ``source -> seed/shuffle -> repeat -> random_map(decode, random-resized-crop, tokenise one caption) ->
this process's rows of each global batch -> to_iter_dataset -> drop invalid, counting -> batch -> mp_prefetch``.
Shuffle and augmentation depend only on the seed and an example's global position, and process ``p`` of ``P`` reads
rows ``[p*b, (p+1)*b)`` of every global batch of ``P*b``, exactly the rows the batch sharding gives its devices: the
global batches are the same whatever the number of processes (until an invalid example is replaced by the next one
of the same process). It yields
``{"pixels": float32 (B, H, W, 3) CLIP-normalised, "tokens": int32 (B, L), "num_skipped": int64 ()}``.

Skipped examples (undecodable or empty image, no usable caption: empty, blank or not UTF-8) never crash a run.
They are counted *in the data*: the drop stage stamps each kept example with how many invalid ones it stepped
over, and batching sums that into ``num_skipped``. The count is computed inside whichever process builds the batch,
so it reaches the trainer through ``mp_prefetch`` like any other field, is exact per batch, and survives
checkpoint/restore (the state is the position in the stream; there is no side counter to save). The trainer pops
``num_skipped`` before putting the batch on devices and logs its running sum. A stream in which more than
``max_consecutive_skips`` examples in a row are invalid is an error: that is a broken data set, not bad luck.

Eval: deterministic, all ``MapDataset`` (no shuffle, no repeat, no filter), each process its own slice, padded so
every process yields the same number of full batches (``eval_num_batches``), which keeps multi-host eval exact:
``{"pixels": (B, H, W, 3), "tokens": int32 (B, C, L), "caption_mask": bool (B, C), "mask": bool (B,),
"index": int64 (B,), "label": int64 (B,), "num_skipped": int64 ()}``. ``C = max_captions`` (5, the COCO/Flickr
protocol): an image's usable captions fill rows ``0..n-1`` in source order, captions beyond ``C`` are dropped.
``mask`` is False for padding and for invalid examples (image undecodable, or no usable caption; those count in
``num_skipped``). ``index`` is the example's index in the source (-1 for padding), so results gathered from several
processes can be put back in order; ``label`` is the record's class for zero-shot eval (-1 when it has none).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from clipup_jax.data.image_ops import CLIP_MEAN, CLIP_STD, check_resize_mode, preprocess
from clipup_jax.data.sources.records import CAPTION, CAPTIONS, IMAGE, IMAGE_BYTES, KEY, LABEL
from clipup_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

NUM_SKIPPED = "num_skipped"
_SCALE = (1.0 / (255.0 * CLIP_STD)).astype(np.float32)
_OFFSET = (CLIP_MEAN / CLIP_STD).astype(np.float32)
_LOGGED_SKIPS = 20  # per process: enough to find the bad files, not enough to flood a log


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Marker for an example the pipeline drops and counts (never leaves the process that made it)."""

    reason: str


_logged_keys: set = set()  # records already reported in this process: a bad file warns once, not every epoch


def _note_skip(key: Any, reason: str) -> Skipped:
    """Counted every time (``num_skipped``); logged the first time this record is skipped, up to _LOGGED_SKIPS."""
    if key not in _logged_keys and len(_logged_keys) < _LOGGED_SKIPS:
        _logged_keys.add(key)
        last = len(_logged_keys) == _LOGGED_SKIPS
        log.warning("skipping example %s: %s%s", key, reason, " (further skipped records not logged)" * last)
    return Skipped(f"{key}: {reason}")


# ----- record -> image / captions ------------------------------------------------------------------------------------
def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every mode PIL decodes; 16/32-bit greyscale is rescaled (PIL's own convert would clip it to white)."""
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, np.float64)
        if image.mode != "F":
            array = array / 257.0  # 16-bit range onto 8-bit
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))  # mode L
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns converting such palettes straight to RGB
    return image.convert("RGB")


def decode_image(record: dict, draft_size: int | None = None) -> Image.Image | str:
    """The record's image as RGB PIL, or the reason it cannot be decoded (never raises).

    ``draft_size`` lets the JPEG decoder downscale by 2/4/8 while keeping both sides >= ``draft_size``: a large
    speed-up for big photos that are cropped to 224 anyway.
    """
    try:
        if record.get(IMAGE) is not None:
            array = np.asarray(record[IMAGE])
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3 or 0 in array.shape:
                return f"image array must be uint8 (H, W, 3), got {array.dtype} {array.shape}"
            return Image.fromarray(array)
        data = record.get(IMAGE_BYTES) or b""
        if not data:
            return "no image bytes"
        image = Image.open(io.BytesIO(data))
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        if 0 in image.size:
            return f"empty image {image.size}"
        return _to_rgb(image)
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data; none may stop a run
        message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "these bytes", str(e))  # not a memory address
        return f"cannot decode image ({type(e).__name__}: {message})"


def usable_captions(record: dict) -> list[str]:
    """The record's captions that can train or evaluate: UTF-8 (bytes decoded strictly), not blank."""
    raw = record.get(CAPTIONS)
    if raw is None or len(raw) == 0:
        raw = (record.get(CAPTION),)
    out = []
    for caption in raw:
        if isinstance(caption, (bytes, bytearray, np.bytes_)):
            try:
                caption = bytes(caption).decode("utf-8")
            except UnicodeDecodeError:
                continue
        if not isinstance(caption, str):
            continue
        try:
            caption.encode("utf-8")  # lone surrogates from a lossy decode upstream
        except UnicodeEncodeError:
            continue
        if caption.strip():
            out.append(caption)
    return out


def caption_corpus(source: Any, n: int) -> list[str]:
    """Every usable caption of the first `n` records (a tokenizer's training texts). A source that gives captions
    without its image (`captions(i)`: the embedded data set, which would otherwise draw every picture) is asked
    for them alone."""
    captions = getattr(source, "captions", None) or (lambda i: usable_captions(source[i]))
    return [c for i in range(min(n, len(source))) for c in captions(i)]


def _has_captions(record: dict) -> bool:
    """Whether the record carries caption entries at all, usable or not."""
    raw = record.get(CAPTIONS)
    return len(raw) > 0 if raw is not None else record.get(CAPTION) not in (None, "")


def normalise(image: Image.Image) -> np.ndarray:
    """float32 (H, W, 3): ``(x / 255 - mean) / std`` in one fused multiply-add."""
    return np.asarray(image, np.float32) * _SCALE - _OFFSET


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float],
                            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom): area fraction in ``scale``, aspect
    (w/h) log-uniform in ``ratio``; ten tries, then a centre crop with the aspect clamped into ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


# ----- per-example transforms ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainExample:
    """record, rng -> {"pixels", "tokens"} or ``Skipped``; picklable, so it runs in grain worker processes."""

    tokenizer: Tokenizer
    image_size: int
    context_length: int
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        if not (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1 and 0 < self.crop_ratio[0] <= self.crop_ratio[1]):
            raise ValueError(f"bad crop_scale {self.crop_scale} / crop_ratio {self.crop_ratio}")
        # The smallest crop side is >= short side * sqrt(min scale * min aspect); decode no smaller than that.
        shrink = math.sqrt(self.crop_scale[0] * min(self.crop_ratio[0], 1 / self.crop_ratio[1]))
        self._draft = math.ceil(self.image_size / shrink)

    def __call__(self, record: dict, rng: np.random.Generator) -> dict | Skipped:
        captions = usable_captions(record)
        if not captions:
            return _note_skip(record.get(KEY), "no usable caption")
        image = decode_image(record, self._draft)
        if isinstance(image, str):
            return _note_skip(record.get(KEY), image)
        box = random_resized_crop_box(*image.size, rng, self.crop_scale, self.crop_ratio)
        size = (self.image_size, self.image_size)
        pixels = normalise(image.resize(size, Image.Resampling.BICUBIC, box=box))
        caption = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
        return {"pixels": pixels, "tokens": self.tokenizer([caption], self.context_length)[0]}


@dataclasses.dataclass
class EvalExample:
    """(local index, record) -> a masked eval example; invalid ones come back with ``mask`` False, counted."""

    tokenizer: Tokenizer
    image_size: int
    context_length: int
    max_captions: int
    process_index: int = 0
    process_count: int = 1
    resize: str = "shortest"  # image_ops.RESIZE_MODES

    def empty(self, index: int, skipped: int) -> dict:
        s, c, n = self.image_size, self.max_captions, self.context_length
        return {"pixels": np.zeros((s, s, 3), np.float32), "tokens": np.zeros((c, n), np.int32),
                "caption_mask": np.zeros((c,), bool), "mask": np.bool_(False), "index": np.int64(index),
                "label": np.int64(-1), NUM_SKIPPED: skipped}

    def __call__(self, local_index: int, record: dict) -> dict:
        index = self.process_index + local_index * self.process_count
        captions = usable_captions(record)[: self.max_captions]
        # A labelled image that carries no captions at all (an image folder) is a zero-shot example; one whose
        # captions are all unusable is broken data, skipped like a training example.
        image = decode_image(record) if captions or (LABEL in record and not _has_captions(record)) \
            else "no usable caption"
        if isinstance(image, str):
            _note_skip(record.get(KEY), image)
            return self.empty(index, 1)
        out = self.empty(index, 0)
        out["pixels"] = preprocess(image, self.image_size, self.resize)
        out["tokens"][: len(captions)] = self.tokenizer(captions, self.context_length)
        out["caption_mask"][: len(captions)] = True
        out["mask"] = np.bool_(True)
        out["label"] = np.int64(record.get(LABEL, -1))
        return out


class _Padding:
    """``n`` copies of a padding example, as a random-access source."""

    def __init__(self, n: int, example: dict) -> None:
        self._n, self._example = n, example

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self._n:
            raise IndexError(index)
        return self._example


# ----- stream stages -------------------------------------------------------------------------------------------------
class ProcessRows(grain.MapDataset):
    """Process ``p``'s rows of every global batch: local element ``j`` is global element
    ``(j // b) * b * P + p * b + j % b`` (``b`` rows per process, ``P`` processes); whole global batches only."""

    def __init__(self, parent: grain.MapDataset, batch_size: int, process_index: int, process_count: int) -> None:
        super().__init__(parent)
        self._b, self._p, self._count = batch_size, process_index, process_count
        self._length = len(parent) // (batch_size * process_count) * batch_size

    def __len__(self) -> int:
        return self._length

    def _global_index(self, index: int) -> int:
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range [0, {self._length})")
        batch, row = divmod(index, self._b)
        return (batch * self._count + self._p) * self._b + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._global_index(index)]

    def __str__(self) -> str:
        return f"ProcessRows(batch_size={self._b}, process={self._p}/{self._count})"


class _DropSkippedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_consecutive: int) -> None:
        super().__init__(parent)
        self._max = max_consecutive

    def __next__(self) -> dict:
        skipped = 0
        while True:
            element = next(self._parent)  # a finite stream's trailing skips end with it (no batch to report them)
            if not isinstance(element, Skipped):
                return {**element, NUM_SKIPPED: skipped}
            skipped += 1
            if skipped > self._max:
                raise ValueError(f"more than {self._max} consecutive examples were invalid (last: {element.reason}); "
                                 "the data source looks broken")

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()  # between elements nothing is pending: the parent's position is all

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class DropSkipped(grain.IterDataset):
    """Drops ``Skipped`` markers, stamping the next kept element with how many it replaced (``num_skipped``)."""

    def __init__(self, parent: grain.IterDataset, max_consecutive: int = 1000) -> None:
        super().__init__(parent)
        self._max = max_consecutive

    def __iter__(self) -> grain.DatasetIterator:
        return _DropSkippedIterator(self._parent.__iter__(), self._max)

    def __str__(self) -> str:
        return f"DropSkipped(max_consecutive={self._max})"


def collate(examples: Sequence[dict]) -> dict:
    """Stack every field; ``num_skipped`` is summed into one int64 per batch."""
    out = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != NUM_SKIPPED}
    out[NUM_SKIPPED] = np.int64(sum(e[NUM_SKIPPED] for e in examples))
    return out


def _read_threads(read_threads: int | None, num_workers: int) -> int:
    """Decoding threads per loading process: by default the CPUs shared out among the processes (PIL releases
    the GIL while decoding and resizing; more threads than cores only adds contention)."""
    return read_threads or max(1, (os.cpu_count() or 1) // max(1, num_workers))


def _prefetch(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers)) if num_workers else ds


def _check_process(process_index: int, process_count: int, batch_size: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


# ----- pipelines -----------------------------------------------------------------------------------------------------
def train_pipeline(source: Any, *, tokenizer: Tokenizer, image_size: int, context_length: int, batch_size: int,
                   seed: int, process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                   num_epochs: int | None = None, crop_scale: tuple[float, float] = (0.9, 1.0),
                   crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), read_threads: int | None = None,
                   max_consecutive_skips: int = 1000) -> grain.IterDataset:
    """Endless (or ``num_epochs``) shuffled training batches of ``batch_size`` per process (see module doc).

    The whole source is reshuffled every epoch with one seed shared by all processes, each taking its rows of every
    global batch, so the global stream does not depend on the process count. The output is a pure function of
    (source, seed, process rows, ``num_workers``) and ``get_state``/``set_state`` resume it exactly.
    """
    _check_process(process_index, process_count, batch_size)
    if len(source) == 0:
        raise ValueError("the training source is empty")
    transform = TrainExample(tokenizer, image_size, context_length, tuple(crop_scale), tuple(crop_ratio))
    # SeedSequence([seed, 0]): the stream seed of process 0 when each process shuffled its own slice, so one-process
    # streams (and the runs recorded with them) are unchanged.
    stream_seed = int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])
    ds = grain.MapDataset.source(source).seed(stream_seed).shuffle().repeat(num_epochs).random_map(transform)
    ds = ProcessRows(ds, batch_size, process_index, process_count)
    read = grain.ReadOptions(num_threads=_read_threads(read_threads, num_workers), prefetch_buffer_size=2 * batch_size)
    it = DropSkipped(ds.to_iter_dataset(read), max_consecutive_skips)
    return _prefetch(it.batch(batch_size, drop_remainder=True, batch_fn=collate), num_workers)


def eval_num_batches(num_examples: int, batch_size: int, process_count: int = 1) -> int:
    """Batches every process yields for a source of ``num_examples``: enough for the largest process slice."""
    return math.ceil(math.ceil(num_examples / process_count) / batch_size)


def eval_pipeline(source: Any, *, tokenizer: Tokenizer, image_size: int, context_length: int, batch_size: int,
                  max_captions: int = 5, process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                  read_threads: int | None = None, resize: str = "shortest") -> grain.IterDataset:
    """Each example of this process's slice exactly once, made square as `resize` says (image_ops.RESIZE_MODES),
    in ``eval_num_batches`` padded batches with every usable caption (see module doc for the layout)."""
    _check_process(process_index, process_count, batch_size)
    if max_captions < 1:
        raise ValueError(f"max_captions must be >= 1, got {max_captions}")
    transform = EvalExample(tokenizer, image_size, context_length, max_captions, process_index, process_count,
                            check_resize_mode(resize))
    ds = grain.MapDataset.source(source)[process_index::process_count].map_with_index(transform)
    total = eval_num_batches(len(source), batch_size, process_count) * batch_size
    if total > len(ds):
        padding = _Padding(total - len(ds), transform.empty(-1, 0))
        ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source(padding)])
    # Batched before to_iter_dataset, so mp_prefetch hands whole batches to workers and the padded batch count
    # survives; each read thread then builds one batch, and the buffer holds batches (keep it small).
    threads = _read_threads(read_threads, num_workers)
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=collate)
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads + 1)
    return _prefetch(ds.to_iter_dataset(read), num_workers)


def calibration_batch(source: Any, *, tokenizer: Tokenizer, image_size: int, context_length: int,
                      size: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (N, H, W, 3), tokens (N, L)): the first `size` valid examples of `source` as eval sees them
    (centre crop, first caption), for statistics of a model's activations; invalid ones are passed over."""
    if size < 1:
        raise ValueError(f"calibration size {size}: must be >= 1")
    transform = EvalExample(tokenizer, image_size, context_length, max_captions=1)
    pixels, tokens = [], []
    for index in range(len(source)):
        example = transform(index, source[index])
        if example["mask"] and example["caption_mask"][0]:
            pixels.append(example["pixels"])
            tokens.append(example["tokens"][0])
            if len(pixels) == size:
                break
    if len(pixels) < size:
        raise ValueError(f"calibration data: {len(pixels)} valid examples of {len(source)}, fewer than the "
                         f"{size} asked for")
    return np.stack(pixels), np.stack(tokens)
