"""Train/eval pipelines: shapes, crops, odd and broken inputs skipped and counted, slicing, shuffling, resume."""

from __future__ import annotations

import io
import math

import grain
import numpy as np
import pytest
from PIL import Image

from clipup_jax.data.bpe_trainer import train_bpe, write_hf_tokenizer
from clipup_jax.data.image_ops import CLIP_MEAN, CLIP_STD, preprocess
from clipup_jax.data.pipeline import (DropSkipped, Skipped, calibration_batch, collate, decode_image, eval_num_batches,
                                      eval_pipeline, random_resized_crop_box, train_pipeline)
from clipup_jax.data.sources import make_source
from clipup_jax.data.tokenizer import Tokenizer

SIZE, LENGTH = 24, 12
LOW, HIGH = (0 - CLIP_MEAN) / CLIP_STD, (1 - CLIP_MEAN) / CLIP_STD


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def rgb(value: int, size=(32, 32)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(value).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = [f"photo {i} of a red dog" for i in range(40)]
    return Tokenizer.from_path(write_hf_tokenizer(train_bpe(corpus, 50), tmp_path_factory.mktemp("tok")))


def caption_of(tokenizer: Tokenizer, tokens: np.ndarray) -> str:
    """Decoded caption without spaces (CLIP's BPE splits digits, so "photo 12" decodes as "photo 1 2")."""
    return tokenizer.decode(tokens).replace(" ", "")


class Arrays:
    """Records carrying decoded uint8 images (like the synthetic data set); captions name the index."""

    def __init__(self, n: int, invalid: frozenset[int] = frozenset()) -> None:
        self.n, self.invalid = n, invalid

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        caption = "" if i in self.invalid else f"photo {i}"
        return {"image": np.asarray(rgb(i, (20 + i % 5, 28))), "caption": caption, "captions": (caption,),
                "label": i % 3}


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    """A TSV over odd and broken files: 6 usable rows (RGB JPEG/PNG, CMYK, 16-bit, RGBA, grey) and 4 to skip
    (truncated JPEG, zero-byte file, an empty caption, a caption that is not UTF-8)."""
    root = tmp_path_factory.mktemp("odd")
    files = {
        "ok0.jpg": encode(rgb(0), "JPEG"), "ok1.png": encode(rgb(1), "PNG"),
        "cmyk.jpg": encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"),
        "deep.png": encode(Image.fromarray(np.full((32, 32), 128 * 257, np.uint16)), "PNG"),
        "alpha.png": encode(Image.new("RGBA", (32, 40), (10, 200, 30, 0)), "PNG"),
        "gray.jpg": encode(Image.new("L", (48, 32), 90), "JPEG"),
        "corrupt.jpg": encode(rgb(2), "JPEG")[:300], "empty.jpg": b"",
        "ok2.jpg": encode(rgb(3), "JPEG"), "ok3.jpg": encode(rgb(4), "JPEG"),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    rows = [f"{name}\tphoto {i}".encode() for i, name in enumerate(list(files)[:8])]
    rows += [b"ok2.jpg\t", b"ok3.jpg\tcaf\xe9"]
    (root / "odd.tsv").write_bytes(b"\n".join(rows) + b"\n")
    return root


# ----- decoding and crops --------------------------------------------------------------------------------------------
def test_decode_image_handles_every_mode(odd_files):
    def decoded(name):
        return decode_image({"image_bytes": (odd_files / name).read_bytes()})

    assert np.asarray(decoded("deep.png"))[0, 0].tolist() == [128, 128, 128]  # not clipped to white
    assert np.asarray(decoded("alpha.png"))[0, 0].tolist() == [10, 200, 30]
    r, g, b = np.asarray(decoded("cmyk.jpg"))[0, 0].tolist()
    assert r > 200 and g < 60 and b < 60  # C=0, M=Y=255: red
    assert decoded("gray.jpg").mode == "RGB" and decoded("gray.jpg").size == (48, 32)
    assert "cannot decode image" in decoded("corrupt.jpg")
    assert decoded("empty.jpg") == "no image bytes"
    assert "uint8 (H, W, 3)" in decode_image({"image": np.zeros((4, 4), np.float32)})


def test_random_resized_crop_respects_scale_ratio_and_bounds():
    rng = np.random.default_rng(0)
    for width, height in [(32, 32), (64, 20), (20, 64)]:
        for _ in range(200):
            left, top, right, bottom = random_resized_crop_box(width, height, rng, (0.5, 1.0), (3 / 4, 4 / 3))
            w, h = right - left, bottom - top
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            if (width, height) == (32, 32):  # square: the sampled box always fits
                assert 0.5 - 0.1 <= w * h / (width * height) <= 1.0 and 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
    # Too wide for any try: centre crop with the aspect clamped to 4/3.
    assert random_resized_crop_box(400, 10, rng, (0.9, 1.0), (3 / 4, 4 / 3)) == (193, 0, 206, 10)


# ----- train ---------------------------------------------------------------------------------------------------------
def test_train_batches_shapes_range_and_tokens(tokenizer, odd_files):
    ds = train_pipeline(make_source(f"csv:{odd_files}/odd.tsv"), tokenizer=tokenizer, image_size=SIZE,
                        context_length=LENGTH, batch_size=3, seed=0)
    it = iter(ds)
    batches = [next(it) for _ in range(6)]  # 3 epochs of 6 valid images
    for batch in batches:
        assert batch["pixels"].shape == (3, SIZE, SIZE, 3) and batch["pixels"].dtype == np.float32
        assert (batch["pixels"] >= LOW - 1e-5).all() and (batch["pixels"] <= HIGH + 1e-5).all()
        assert batch["tokens"].shape == (3, LENGTH) and batch["tokens"].dtype == np.int32
        assert (batch["tokens"][:, 0] == tokenizer.sot_token_id).all()
    seen = {caption_of(tokenizer, t) for b in batches for t in b["tokens"]}
    assert seen == {f"photo{i}" for i in range(6)}  # cmyk, 16-bit, rgba, gray all kept; broken ones never
    skipped = sum(int(b["num_skipped"]) for b in batches)
    assert 2 * 4 <= skipped <= 3 * 4  # 4 bad rows per epoch; the last epoch's trailing ones may not be reached


def test_a_bad_record_is_counted_every_epoch_and_logged_once_by_name(tokenizer, odd_files, caplog, monkeypatch):
    from clipup_jax.data import pipeline

    monkeypatch.setattr(pipeline, "_logged_keys", set())  # what earlier tests in this process reported
    ds = train_pipeline(make_source(f"csv:{odd_files}/odd.tsv"), tokenizer=tokenizer, image_size=SIZE,
                        context_length=LENGTH, batch_size=3, seed=0)
    with caplog.at_level("WARNING", logger=pipeline.log.name):
        it = iter(ds)
        skipped = sum(int(next(it)["num_skipped"]) for _ in range(6))  # 3 epochs
    warned = [r.getMessage() for r in caplog.records if "skipping example" in r.getMessage()]
    assert skipped >= 8 and len(warned) == 4, warned  # each of the 4 bad rows once, however many epochs
    assert any("corrupt.jpg" in w and "cannot decode image" in w for w in warned), warned
    assert not any("BytesIO object at" in w for w in warned), warned


def test_drop_skipped_counts_exactly_per_batch():
    elements = [{"x": 1}, Skipped("a"), Skipped("b"), {"x": 2}, {"x": 3}, Skipped("c"), {"x": 4}]
    ds = DropSkipped(grain.MapDataset.source(elements).to_iter_dataset()).batch(2, batch_fn=collate)
    assert [(b["x"].tolist(), int(b["num_skipped"])) for b in ds] == [([1, 2], 2), ([3, 4], 1)]


def test_all_invalid_source_is_an_error_not_a_hang(tokenizer):
    ds = train_pipeline(Arrays(4, frozenset(range(4))), tokenizer=tokenizer, image_size=SIZE, context_length=LENGTH,
                        batch_size=2, seed=0, max_consecutive_skips=50)
    with pytest.raises(ValueError, match="more than 50 consecutive examples were invalid"):
        next(iter(ds))


def _captions(tokenizer, ds, n):
    it = iter(ds)
    out = [caption_of(tokenizer, t) for _ in range(n) for t in next(it)["tokens"]]
    if hasattr(it, "close"):
        it.close()
    return out


def test_global_batches_do_not_depend_on_the_process_count(tokenizer):
    """Process p's rows concatenated in process order are the one-process batch, pixels and tokens bitwise, for
    2 and 3 processes; within an epoch every example appears once across processes."""
    source = Arrays(24)
    kw = dict(tokenizer=tokenizer, image_size=SIZE, context_length=LENGTH, seed=3, num_epochs=2)

    def batches(count):
        its = [iter(train_pipeline(source, batch_size=12 // count, process_index=p, process_count=count, **kw))
               for p in range(count)]
        return [{k: np.concatenate([b[k] for b in parts]) for k in ("pixels", "tokens")}
                for parts in zip(*its)]

    one = batches(1)
    assert len(one) == 4
    for count in (2, 3):
        for got, want in zip(batches(count), one, strict=True):
            np.testing.assert_array_equal(got["tokens"], want["tokens"])
            np.testing.assert_array_equal(got["pixels"], want["pixels"])
    first_epoch = [caption_of(tokenizer, t) for b in one[:2] for t in b["tokens"]]
    assert sorted(first_epoch) == sorted(f"photo{i}" for i in range(24))


def test_shuffle_is_a_function_of_the_seed_and_changes_every_epoch(tokenizer):
    def order(seed):
        return _captions(tokenizer, train_pipeline(Arrays(16), tokenizer=tokenizer, image_size=SIZE,
                                                   context_length=LENGTH, batch_size=8, seed=seed), 4)

    first = order(1)
    assert first == order(1) and first != order(2)
    assert sorted(first[:16]) == sorted(first[16:]) and first[:16] != first[16:]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_state_resumes_the_same_stream(tokenizer, odd_files, num_workers):
    ds = train_pipeline(make_source(f"csv:{odd_files}/odd.tsv"), tokenizer=tokenizer, image_size=SIZE,
                        context_length=LENGTH, batch_size=2, seed=5, num_workers=num_workers)
    it = iter(ds)
    skipped = sum(int(next(it)["num_skipped"]) for _ in range(5))
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    resumed = iter(ds)
    resumed.set_state(state)
    got = [next(resumed) for _ in range(3)]
    for it_ in (it, resumed):
        if num_workers:
            it_.close()
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert skipped + sum(int(b["num_skipped"]) for b in want) >= 4  # counts also flow through worker processes


# ----- eval ----------------------------------------------------------------------------------------------------------
class Captions:
    """Records with several captions each: 0 has 6, 1 has a blank one among 3, 2 has none usable."""

    captions = {0: tuple(f"photo {j}" for j in range(6)), 1: ("photo 7", "  ", "photo 8"), 2: ("",)}

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> dict:
        captions = self.captions.get(i, (f"photo {10 + i}",))
        return {"image_bytes": encode(rgb(i, (40, 30)), "PNG"), "caption": captions[0], "captions": captions,
                "key": str(i), "label": i}


def test_eval_layout_padding_mask_and_counts(tokenizer):
    ds = eval_pipeline(Captions(), tokenizer=tokenizer, image_size=SIZE, context_length=LENGTH, batch_size=4,
                       max_captions=5)
    batches = list(ds)
    assert len(batches) == eval_num_batches(7, 4) == 2
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert mask.tolist() == [True, True, False, True, True, True, True, False]
    assert index.tolist() == [0, 1, 2, 3, 4, 5, 6, -1]
    assert [int(b["num_skipped"]) for b in batches] == [1, 0]  # record 2; padding is not a skip
    first = batches[0]
    assert first["tokens"].shape == (4, 5, LENGTH) and first["caption_mask"].shape == (4, 5)
    assert first["caption_mask"][:2].sum(axis=1).tolist() == [5, 2]  # 6 -> first 5; blank caption left out
    assert [caption_of(tokenizer, t) for t in first["tokens"][1, :2]] == ["photo7", "photo8"]
    assert not first["tokens"][1, 2:].any() and not first["tokens"][2].any()
    assert first["label"].tolist()[:2] == [0, 1] and batches[1]["label"][-1] == -1
    want = preprocess(rgb(1, (40, 30)), SIZE)
    np.testing.assert_allclose(first["pixels"][1], want, atol=1e-6)
    assert not first["pixels"][2].any()


def test_eval_processes_share_batch_count_and_cover_everything(tokenizer):
    indices = []
    for p in range(2):
        batches = list(eval_pipeline(Captions(), tokenizer=tokenizer, image_size=SIZE, context_length=LENGTH,
                                     batch_size=3, process_index=p, process_count=2))
        assert len(batches) == eval_num_batches(7, 3, 2) == math.ceil(4 / 3)
        indices += [int(i) for b in batches for i, m in zip(b["index"], b["mask"]) if m]
    assert sorted(indices) == [0, 1, 3, 4, 5, 6]


def test_eval_with_workers_yields_the_same_padded_batches(tokenizer):
    """Workers take whole batches, so the batch count, padding and content match the single-process run."""
    kwargs = dict(tokenizer=tokenizer, image_size=SIZE, context_length=LENGTH, batch_size=3)
    want = list(eval_pipeline(Captions(), **kwargs))
    it = iter(eval_pipeline(Captions(), num_workers=2, **kwargs))
    got = list(it)
    it.close()
    assert len(got) == len(want) == 3
    for a, b in zip(sorted(want, key=lambda b: b["index"][0]), sorted(got, key=lambda b: b["index"][0])):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_eval_skips_and_counts_odd_files(tokenizer, odd_files):
    batches = list(eval_pipeline(make_source(f"csv:{odd_files}/odd.tsv"), tokenizer=tokenizer, image_size=SIZE,
                                 context_length=LENGTH, batch_size=4))
    assert sum(int(b["num_skipped"]) for b in batches) == 4
    assert sum(int(b["mask"].sum()) for b in batches) == 6


def test_calibration_batch_is_the_first_valid_examples_as_eval_sees_them(tokenizer):
    source = Arrays(12, invalid=frozenset({1, 4}))
    pixels, tokens = calibration_batch(source, tokenizer=tokenizer, image_size=SIZE, context_length=LENGTH, size=5)
    assert pixels.shape == (5, SIZE, SIZE, 3) and tokens.shape == (5, LENGTH)
    assert [caption_of(tokenizer, t) for t in tokens] == [f"photo{i}" for i in (0, 2, 3, 5, 6)]
    np.testing.assert_array_equal(pixels[1], preprocess(Image.fromarray(source[2]["image"]), SIZE))  # centre crop
    with pytest.raises(ValueError, match="10 valid examples of 12, fewer than the 11 asked for"):
        calibration_batch(source, tokenizer=tokenizer, image_size=SIZE, context_length=LENGTH, size=11)


@pytest.mark.parametrize("kwargs, message", [
    (dict(process_index=2, process_count=2), "process_index 2"),
    (dict(batch_size=0), "batch_size"),
    (dict(num_workers=-1), "num_workers"),
])
def test_bad_arguments(tokenizer, kwargs, message):
    args = dict(tokenizer=tokenizer, image_size=SIZE, context_length=LENGTH, batch_size=2, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        train_pipeline(Arrays(4), **args)


def _png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims `width` x `height` (what a decompression bomb looks like to PIL)."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def test_huge_images_are_refused_or_decoded_small():
    """A header claiming 40k x 40k pixels is refused before any pixel is allocated (a reason, not a crash); a
    large real JPEG decodes at a reduced size (draft) that still covers the crop."""
    reason = decode_image({"image_bytes": _png_claiming(40_000, 40_000)})
    assert isinstance(reason, str) and "DecompressionBomb" in reason
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (200, 10, 10)).save(buf, format="JPEG")
    image = decode_image({"image_bytes": buf.getvalue()}, draft_size=224)
    assert not isinstance(image, str) and image.mode == "RGB"
    assert 224 <= min(image.size) < 3000


def test_resize_modes_against_hand_built_squares():
    """A 40x20 image whose left half is red and right half blue: each mode's square, built by hand with PIL."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    normalise = lambda im: (np.asarray(im, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD  # noqa: E731
    # shortest: short side to 16 (long side 32), centre crop: the middle 16 columns, half red, half blue.
    want = normalise(image.resize((32, 16), Image.Resampling.BICUBIC).crop((8, 0, 24, 16)))
    np.testing.assert_array_equal(preprocess(image, 16), want)
    np.testing.assert_array_equal(preprocess(image, 16, "shortest"), want)
    # squash: the whole image in 16x16, aspect lost.
    np.testing.assert_array_equal(preprocess(image, 16, "squash"), normalise(image.resize((16, 16), Image.Resampling.BICUBIC)))
    # longest: long side to 16 (16x8), centred on black: rows 0-3 and 12-15 are padding.
    longest = preprocess(image, 16, "longest")
    np.testing.assert_array_equal(longest[4:12], normalise(image.resize((16, 8), Image.Resampling.BICUBIC)))
    np.testing.assert_array_equal(longest[:4], np.broadcast_to(-CLIP_MEAN / CLIP_STD, (4, 16, 3)))
    np.testing.assert_array_equal(longest[12:], np.broadcast_to(-CLIP_MEAN / CLIP_STD, (4, 16, 3)))
    with pytest.raises(ValueError, match="resize mode 'crop': expected one of shortest, squash, longest"):
        preprocess(image, 16, "crop")
