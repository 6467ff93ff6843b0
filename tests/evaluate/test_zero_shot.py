"""Zero-shot classification: prompt-ensemble class embeddings, top-k accuracy and mean per-class recall by hand."""

from __future__ import annotations

import numpy as np
import pytest

from clipup_jax.data.tokenizer import Tokenizer
from clipup_jax.evaluate.templates import DEFAULT_TEMPLATE, SIMPLE_IMAGENET_TEMPLATES, TEMPLATE_SETS
from clipup_jax.evaluate.zero_shot import class_embeddings, zero_shot_metrics

TEMPLATES = ("a photo of a {}.", "art of the {}.")
# Raw (unnormalised) prompt embeddings; their norms differ on purpose, so averaging before normalising is wrong.
PROMPT_EMB = {
    "a photo of a cat.": [3.0, 4.0, 0.0],  # unit: (0.6, 0.8, 0)
    "art of the cat.": [0.0, 0.0, 2.0],  # unit: (0, 0, 1)
    "a photo of a dog.": [5.0, 0.0, 0.0],  # unit: (1, 0, 0)
    "art of the dog.": [0.0, -0.1, 0.0],  # unit: (0, -1, 0)
}


class FakeText:
    """Tokenizer + text tower pair: token row i stands for the i-th prompt of the last call."""

    def __init__(self):
        self.calls = []

    def tokenize(self, texts, context_length):
        self.calls.append((list(texts), context_length))
        return np.arange(len(texts), dtype=np.int32)[:, None].repeat(context_length, axis=1)

    def embed(self, tokens):
        prompts = self.calls[-1][0]
        return np.array([PROMPT_EMB[prompts[i]] for i in tokens[:, 0]], np.float32)


def test_class_embeddings_average_unit_prompts_then_renormalise():
    fake = FakeText()
    got = class_embeddings(fake.embed, fake.tokenize, ["cat", "dog"], TEMPLATES, context_length=8)
    # cat: mean((0.6, 0.8, 0), (0, 0, 1)) = (0.3, 0.4, 0.5), norm sqrt(0.5)
    # dog: mean((1, 0, 0), (0, -1, 0)) = (0.5, -0.5, 0), norm sqrt(0.5)
    want = np.array([[0.3, 0.4, 0.5], [0.5, -0.5, 0.0]]) / np.sqrt(0.5)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.dtype == np.float32
    # Averaging the raw embeddings first would give cat = (1.5, 2, 1) / |.| = (0.557, 0.743, 0.371): different.
    assert not np.allclose(got[0], np.array([1.5, 2.0, 1.0]) / np.linalg.norm([1.5, 2.0, 1.0]), atol=1e-2)
    assert fake.calls == [(["a photo of a cat.", "art of the cat.", "a photo of a dog.", "art of the dog."], 8)]


def test_class_embeddings_with_the_real_tokenizer():
    tok = Tokenizer.from_merges([])
    table = np.random.default_rng(0).normal(size=(tok.vocab_size, 6))

    def embed(tokens):  # a deterministic stand-in tower: sum of per-token vectors
        return table[tokens].sum(axis=1).astype(np.float32)

    got = class_embeddings(embed, tok, ["red circle", "blue square"], SIMPLE_IMAGENET_TEMPLATES, 32)
    for row, name in zip(got, ["red circle", "blue square"]):
        prompts = [t.format(name) for t in SIMPLE_IMAGENET_TEMPLATES]
        unit = [e / np.linalg.norm(e) for e in embed(tok(prompts, 32)).astype(np.float64)]
        mean = np.mean(unit, axis=0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize(
    "names, templates, match",
    [([], TEMPLATES, "at least one"), (["cat"], (), "at least one"), (["cat"], ("a photo",), "placeholder"),
     ("cat", TEMPLATES, "single string"), (["cat"], "a {}", "single string")],
)
def test_class_embeddings_bad_input(names, templates, match):
    fake = FakeText()
    with pytest.raises(ValueError, match=match):
        class_embeddings(fake.embed, fake.tokenize, names, templates, 8)


def test_class_embeddings_checks_the_embedder_output():
    fake = FakeText()
    with pytest.raises(ValueError, match="returned shape"):
        class_embeddings(lambda tokens: fake.embed(tokens)[:1], fake.tokenize, ["cat", "dog"], TEMPLATES, 8)


# Three classes along the axes; an image's scores are its coordinates (after normalisation).
CLASSES = np.eye(3, dtype=np.float32)


def test_top_k_by_hand():
    images = np.array([
        [0.9, 0.3, 0.1],  # order 0, 1, 2
        [0.2, 0.1, 0.9],  # order 2, 0, 1
        [0.5, 0.4, 0.6],  # order 2, 0, 1
        [0.1, 0.8, 0.3],  # order 1, 2, 0
    ], np.float32)
    labels = np.array([0, 0, 1, 0])  # ranks 0, 1, 2, 2
    m = zero_shot_metrics(images, labels, CLASSES, ks=(1, 2, 3))
    assert m["top1"] == 0.25
    assert m["top2"] == 0.5
    assert m["top3"] == 1.0


def test_top_k_is_capped_at_the_class_count():
    images = np.array([[0.1, 0.2, 0.9], [1.0, 0.0, 0.0]], np.float32)
    m = zero_shot_metrics(images, np.array([0, 0]), CLASSES)  # default ks=(1, 5) with only 3 classes
    assert m["top1"] == 0.5
    assert m["top5"] == 1.0  # the worst possible rank (2) is inside the top 5


def test_mean_per_class_recall_on_imbalanced_classes():
    images = np.array([
        [1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0],  # four images of class 0: three right, one predicted 1
        [0, 0, 1],  # the one image of class 1, predicted 2
    ], np.float32)
    labels = np.array([0, 0, 0, 0, 1])
    m = zero_shot_metrics(images, labels, CLASSES)
    assert m["top1"] == pytest.approx(3 / 5)
    # Class 2 has no images: left out of the mean (balanced_accuracy_score), though it was predicted once.
    assert m["mean_per_class_recall"] == pytest.approx((3 / 4 + 0 / 1) / 2)


def test_ties_go_to_the_lower_class_index():
    images = np.array([[1, 1, 0], [1, 1, 0]], np.float32)  # equally close to classes 0 and 1
    m = zero_shot_metrics(images, np.array([0, 1]), CLASSES, ks=(1, 2))
    assert m["top1"] == 0.5 and m["top2"] == 1.0
    assert m["mean_per_class_recall"] == 0.5  # class 0 recall 1, class 1 recall 0


def test_padding_rows_are_ignored():
    images = np.array([[1, 0, 0], [np.nan, 0, 0], [0, 0, 1], [0, 1, 0]], np.float32)
    labels = np.array([0, -1, 2, 0])
    mask = np.array([True, False, True, False])
    assert zero_shot_metrics(images, labels, CLASSES, ks=(1,), mask=mask) == {
        "top1": 1.0, "mean_per_class_recall": 1.0}


def test_matches_brute_force_reference():
    rng = np.random.default_rng(0)
    classes = rng.choice([-1.0, 1.0], size=(7, 16)).astype(np.float32)  # exact scores, many ties
    labels = rng.integers(0, 6, size=300)  # class 6 never appears
    flip = rng.random((300, 16)) < 0.35
    images = np.where(flip, -classes[labels], classes[labels]).astype(np.float32)
    mask = rng.random(300) < 0.9
    got = zero_shot_metrics(images, labels, classes, ks=(1, 3, 5), mask=mask)

    hits = {1: 0, 3: 0, 5: 0}
    right, seen = [0] * 7, [0] * 7
    for x, y in zip(images[mask], labels[mask]):
        order = sorted(range(7), key=lambda c: (-float(np.dot(x.astype(np.float64), classes[c])), c))
        for k in hits:
            hits[k] += y in order[:k]
        seen[y] += 1
        right[y] += order[0] == y
    want = {f"top{k}": v / mask.sum() for k, v in hits.items()}
    want["mean_per_class_recall"] = float(np.mean([r / s for r, s in zip(right, seen) if s]))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert 0 < got["top1"] < 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(labels=np.array([0, 3])), "outside"),
        (dict(labels=np.array([0.0, 1.0])), "integers"),
        (dict(labels=np.array([0, 1]), mask=np.zeros(2, bool)), "nothing"),
        (dict(labels=np.array([0, 1]), class_emb=np.eye(3, 4, dtype=np.float32)), r"\(C, E\)"),
        (dict(labels=np.array([0, 1]), ks=(0,)), "positive"),
    ],
)
def test_zero_shot_bad_input(kwargs, match):
    args = dict(image_emb=np.eye(2, 3, dtype=np.float32), class_emb=CLASSES)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        zero_shot_metrics(**args)


def test_templates_are_plain_data():
    assert DEFAULT_TEMPLATE == "a photo of a {}."
    assert len(SIMPLE_IMAGENET_TEMPLATES) == 7
    for templates in TEMPLATE_SETS.values():
        assert all(isinstance(t, str) and t.count("{}") == 1 for t in templates)
