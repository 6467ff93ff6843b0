"""Retrieval Recall@k: hand-computed cases, the any-caption rule, ties, masks, and a brute-force reference."""

from __future__ import annotations

import time

import numpy as np
import pytest

from clipup_jax.evaluate.retrieval import retrieval_metrics
from clipup_jax.evaluate.scoring import target_ranks

# Hand case: 3 images (one-hot, so score[t, j] = text_t[j]) and 6 captions, two per image.
# Rows: caption -> its similarity to images 0, 1, 2.
HAND_SCORES = np.array([
    [0.9, 0.1, 0.0],  # t0 (image 0): image 0 first
    [0.2, 0.5, 0.1],  # t1 (image 0): image 0 second
    [0.1, 0.3, 0.6],  # t2 (image 1): image 1 second
    [0.0, 0.7, 0.2],  # t3 (image 1): image 1 first
    [0.6, 0.4, 0.3],  # t4 (image 2): image 2 third
    [0.3, 0.2, 0.1],  # t5 (image 2): image 2 third
])
HAND_OWNER = np.array([0, 0, 1, 1, 2, 2])


def hand_embeddings():
    """Unit embeddings whose score matrix is exactly HAND_SCORES (a 4th dimension absorbs the norm)."""
    images = np.eye(3, 4)
    texts = np.concatenate([HAND_SCORES, np.sqrt(1 - (HAND_SCORES**2).sum(1, keepdims=True))], axis=1)
    return images.astype(np.float32), texts.astype(np.float32)


def test_hand_case_both_directions():
    images, texts = hand_embeddings()
    m = retrieval_metrics(images, texts, HAND_OWNER, ks=(1, 2, 5))
    # text->image: hits at 1 are t0, t3; at 2 also t1, t2; at 5 (>= 3 images) every caption.
    assert m["text_to_image_R@1"] == pytest.approx(2 / 6)
    assert m["text_to_image_R@2"] == pytest.approx(4 / 6)
    assert m["text_to_image_R@5"] == 1.0
    # image->text, columns of HAND_SCORES:
    #   image 0: t0 (0.9) is best and its own -> hit at 1
    #   image 1: t3 (0.7) is best and its own -> hit at 1
    #   image 2: t2 (0.6, image 1's) first, then its own t4 (0.3) -> miss at 1, hit at 2
    assert m["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert m["image_to_text_R@2"] == 1.0
    assert m["image_to_text_R@5"] == 1.0
    assert set(m) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 2, 5)}


def test_default_ks_and_unnormalised_inputs_give_cosine_recall():
    images, texts = hand_embeddings()
    scale = np.array([[3.0], [0.5], [7.0]], np.float32)  # per-image norms must not matter
    m = retrieval_metrics(images * scale, texts * 2.0, HAND_OWNER)
    assert m == retrieval_metrics(images, texts, HAND_OWNER)
    assert sorted(m) == sorted(f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))


def test_image_hits_when_any_caption_is_in_top_k():
    # Image 0 owns t0 (ranked last for it) and t2 (ranked first); image 1 owns t1.
    images = np.array([[1, 0], [0, 1]], np.float32)
    texts = np.array([[-1, 0], [0, 1], [1, 0]], np.float32)
    m = retrieval_metrics(images, texts, np.array([0, 1, 0]), ks=(1,))
    assert m["image_to_text_R@1"] == 1.0  # CLIP-paper rule: one caption in the top 1 is enough
    assert m["text_to_image_R@1"] == pytest.approx(2 / 3)  # t0 ranks image 1 (score 0) above image 0 (-1)


def test_captions_of_other_images_count_as_misses():
    # Image 0's best caption is image 1's: a miss at 1 even though image 0's own caption is close.
    images = np.array([[1, 0], [0.8, 0.6]], np.float32)
    texts = np.array([[0.6, 0.8], [1, 0]], np.float32)  # t0 -> image 0, t1 -> image 1
    m = retrieval_metrics(images, texts, np.array([0, 1]), ks=(1, 2))
    assert m["image_to_text_R@1"] == 0.0  # image 0 picks t1 (1.0 > 0.6); image 1 picks t0 (0.96 > 0.8)
    assert m["image_to_text_R@2"] == 1.0
    assert m["text_to_image_R@1"] == 0.0  # t0 prefers image 1 (0.96 > 0.6); t1 prefers image 0 (1.0 > 0.8)


def test_ties_go_to_the_lower_candidate_index():
    e0, e1 = [1, 0], [0, 1]
    # text->image: images 0 and 1 are identical. A caption of image 1 loses the tie to image 0 (rank 1);
    # a caption of image 0 wins it (rank 0).
    images = np.array([e0, e0, e1], np.float32)
    texts = np.array([e0, e0, e1], np.float32)
    m = retrieval_metrics(images, texts, np.array([1, 0, 2]), ks=(1, 2))
    assert m["text_to_image_R@1"] == pytest.approx(2 / 3)
    assert m["text_to_image_R@2"] == 1.0
    # image->text: t0 and t1 are identical; image 0 owns t1 only, so t0 (image 1's) takes its top slot.
    # Image 1 owns t0: hit. Image 2 owns t2: hit.
    assert m["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert m["image_to_text_R@2"] == 1.0


def test_target_ranks_is_a_stable_descending_order():
    scores = np.array([[0.5, 0.5, 0.9, 0.5], [0.1, 0.1, 0.1, 0.1]], np.float32)
    np.testing.assert_array_equal(target_ranks(scores, np.array([3, 3])), [3, 3])
    np.testing.assert_array_equal(target_ranks(scores, np.array([0, 0])), [1, 0])
    np.testing.assert_array_equal(target_ranks(scores, np.array([2, 1])), [0, 1])


def test_padding_rows_never_count_and_never_steal_ranks():
    images, texts = hand_embeddings()
    expected = retrieval_metrics(images, texts, HAND_OWNER, ks=(1, 2, 5))
    # Padding images copy the captions they would beat everything for; padding captions copy the images.
    # Padding sits at low indices too, where it would win every tie; one pad row holds NaNs.
    pad_images = np.concatenate([texts[:2], np.full((1, 4), np.nan, np.float32)])
    pad_texts = np.concatenate([images, np.full((1, 4), np.nan, np.float32)])
    padded_images = np.concatenate([pad_images[:2], images[:2], pad_images[2:], images[2:]])
    image_mask = np.array([False, False, True, True, False, True])
    new_image = np.array([2, 3, 5])  # where each real image now lives
    padded_texts = np.concatenate([pad_texts[:1], texts[:3], pad_texts[1:], texts[3:]])
    text_mask = np.array([False, True, True, True, False, False, False, True, True, True])
    owner = np.full(10, -1)  # padding captions point nowhere: ignored
    owner[text_mask] = new_image[HAND_OWNER]
    got = retrieval_metrics(padded_images, padded_texts, owner, ks=(1, 2, 5), image_mask=image_mask,
                            text_mask=text_mask)
    assert got == expected


def test_masked_tied_candidate_does_not_push_the_positive_down():
    images = np.array([[1, 0], [1, 0]], np.float32)  # image 0 is padding, tied with image 1 at a lower index
    texts = np.array([[1, 0]], np.float32)
    owner = np.array([1])
    assert retrieval_metrics(images, texts, owner, ks=(1,))["text_to_image_R@1"] == 0.0
    masked = retrieval_metrics(images, texts, owner, ks=(1,), image_mask=np.array([False, True]))
    assert masked == {"image_to_text_R@1": 1.0, "text_to_image_R@1": 1.0}


def test_image_whose_captions_are_all_masked_is_a_miss():
    images = np.eye(2, dtype=np.float32)
    texts = np.eye(2, dtype=np.float32)
    m = retrieval_metrics(images, texts, np.array([0, 1]), ks=(1, 5), text_mask=np.array([True, False]))
    assert m["image_to_text_R@5"] == 0.5  # image 1 stays a query, with no caption to find
    assert m["text_to_image_R@1"] == 1.0


def brute_force(images, texts, owner, ks, image_mask, text_mask):
    """Plain-Python reference: sort candidates by (-score, index) per query and look at the first k."""
    real_images = [i for i in range(len(images)) if image_mask[i]]
    real_texts = [t for t in range(len(texts)) if text_mask[t]]

    def dot(a, b):
        return sum(float(x) * float(y) for x, y in zip(a, b))

    out = {}
    i2t = {k: 0 for k in ks}
    for i in real_images:
        order = sorted(real_texts, key=lambda t: (-dot(images[i], texts[t]), t))
        for k in ks:
            i2t[k] += any(owner[t] == i for t in order[:k])
    t2i = {k: 0 for k in ks}
    for t in real_texts:
        order = sorted(real_images, key=lambda i: (-dot(texts[t], images[i]), i))
        for k in ks:
            t2i[k] += owner[t] in order[:k]
    for k in ks:
        out[f"image_to_text_R@{k}"] = i2t[k] / len(real_images)
    for k in ks:
        out[f"text_to_image_R@{k}"] = t2i[k] / len(real_texts)
    return out


def random_problem(rng, n_images, width, captions_per_image, signs):
    if signs:  # +-1 vectors of width 16 normalise to +-0.25 exactly: exact scores with many exact ties
        images = rng.choice([-1.0, 1.0], size=(n_images, width))
    else:
        images = rng.normal(size=(n_images, width))
    owner = np.repeat(np.arange(n_images), captions_per_image)
    rng.shuffle(owner)
    flip = rng.random((len(owner), width)) < 0.3
    if signs:
        texts = np.where(flip, -images[owner], images[owner])
    else:
        texts = images[owner] + 1.5 * rng.normal(size=(len(owner), width))
    image_mask = rng.random(n_images) < 0.85
    text_mask = image_mask[owner] & (rng.random(len(owner)) < 0.9)
    owner = np.where(text_mask, owner, -1)
    return images.astype(np.float32), texts.astype(np.float32), owner, image_mask, text_mask


@pytest.mark.parametrize("signs", [True, False], ids=["exact_ties", "continuous"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_reference(signs, seed):
    rng = np.random.default_rng(seed)
    images, texts, owner, image_mask, text_mask = random_problem(rng, 40, 16, 5, signs)
    if not signs:  # the reference does not normalise: give both sides unit vectors
        images = (images / np.linalg.norm(images, axis=1, keepdims=True)).astype(np.float32)
        texts = (texts / np.linalg.norm(texts, axis=1, keepdims=True)).astype(np.float32)
    ks = (1, 2, 5, 10, 500)
    want = brute_force(images, texts, owner, ks, image_mask, text_mask)
    for chunk_size in (None, 1, 7):
        got = retrieval_metrics(images, texts, owner, ks, image_mask, text_mask, chunk_size=chunk_size)
        assert got == want, chunk_size
    assert 0 < want["image_to_text_R@1"] < 1 and 0 < want["text_to_image_R@1"] < 1  # not a trivial problem


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_coco_sized_problem_is_fast():
    """Both directions in less time than one full sort of one direction's score matrix (what a naive ranking does),
    timed side by side: a ratio, so it holds on a loaded or slow machine."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2000, 64)).astype(np.float32)
    owner = np.repeat(np.arange(2000), 5)
    texts = (images[owner] + 2 * rng.normal(size=(10000, 64))).astype(np.float32)
    m = retrieval_metrics(images, texts, owner)
    rounds = [(_seconds(lambda: retrieval_metrics(images, texts, owner)),
               _seconds(lambda: np.argsort(-(texts @ images.T), axis=1))) for _ in range(3)]  # interleaved
    ours, sort = (min(times) for times in zip(*rounds))
    assert ours < sort, f"retrieval_metrics {ours:.2f} s vs one argsort {sort:.2f} s"
    assert m["image_to_text_R@1"] <= m["image_to_text_R@5"] <= m["image_to_text_R@10"]
    assert m["text_to_image_R@1"] <= m["text_to_image_R@5"] <= m["text_to_image_R@10"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(text_to_image=np.array([0, 3])), "outside"),
        (dict(text_to_image=np.array([0, 1]), image_mask=np.array([True, False, True])), "masked"),
        (dict(text_to_image=np.array([0.0, 1.0])), "integers"),
        (dict(text_to_image=np.array([0, 1]), text_mask=np.array([1, 1])), "bool"),
        (dict(text_to_image=np.array([0, 1]), ks=(0,)), "positive"),
        (dict(text_to_image=np.array([0, 1]), image_mask=np.zeros(3, bool)), "nothing"),
        (dict(text_to_image=np.array([0, 1]), text_emb=np.ones((2, 5), np.float32)), "widths"),
        (dict(text_to_image=np.array([0, 1]), text_emb=np.array([[1, 0], [np.nan, 0]], np.float32)), "non-finite"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    args = dict(image_emb=np.eye(3, 2, dtype=np.float32), text_emb=np.eye(2, dtype=np.float32))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(**args)


def test_non_finite_padding_is_fine():
    texts = np.array([[1, 0], [np.nan, np.inf]], np.float32)
    m = retrieval_metrics(np.eye(2, dtype=np.float32), texts, np.array([0, -1]), ks=(1,),
                          text_mask=np.array([True, False]))
    assert m == {"image_to_text_R@1": 0.5, "text_to_image_R@1": 1.0}
