"""The embedded data set: deterministic, captions true of the pictures, disjoint splits, grain- and tokenizer-ready."""

import collections
import re

import grain
import numpy as np
import pytest

from clipup_jax.data import synthetic as syn
from clipup_jax.data.synthetic import Obj, Scene, SyntheticCaptions, describe, render
from clipup_jax.data.bpe_trainer import build_tokenizer
from clipup_jax.data.pipeline import caption_corpus
from clipup_jax.data.tokenizer import Tokenizer

_PREFIXES = ("a picture of ", "an image of ", "a scene with ", "there is ", "there are ")


def _words(caption: str, names) -> set[str]:
    """Which of ``names`` a caption mentions (plural forms included)."""
    return {n for n in names if re.search(rf"\b{n}(e?s)?\b", caption)}


def _hand_scene(style: int = 0) -> Scene:
    red = [Obj("circle", "red", "small", 0.3, 0.25), Obj("circle", "red", "small", 0.7, 0.25)]
    return Scene((*red, Obj("square", "blue", "large", 0.5, 0.72)), background=(90, 90, 90), style=style)


def test_same_index_same_bytes_and_seeds_and_splits_differ():
    a, b = SyntheticCaptions("train", 50, seed=3), SyntheticCaptions("train", 50, seed=3)
    for i in (0, 7, 49):
        x, y = a[i], b[i]
        assert x["image"].tobytes() == y["image"].tobytes() and x["captions"] == y["captions"]
        assert a[i]["image"].tobytes() == x["image"].tobytes()  # no hidden state across calls
    other_seed, other_split = SyntheticCaptions("train", 50, seed=4), SyntheticCaptions("eval", 50, seed=3)
    assert sum(a[i]["image"].tobytes() != other_seed[i]["image"].tobytes() for i in range(10)) == 10
    assert sum(a[i]["captions"] != other_split[i]["captions"] for i in range(10)) == 10


@pytest.mark.parametrize("image_size", [32, 64])
def test_example_fields(image_size):
    src = SyntheticCaptions("eval", 20, image_size=image_size)
    for i in range(len(src)):
        ex = src[i]
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (image_size, image_size, 3)
        caps = ex["captions"]
        assert isinstance(caps, tuple) and len(caps) == syn.NUM_CAPTIONS == len(set(caps))
        assert all(isinstance(c, str) and c for c in caps) and ex["caption"] == caps[0]
        assert 0 <= ex["label"] < len(syn.CLASS_NAMES) and 0 <= ex["colour_label"] < len(syn.COLOUR_NAMES)
        assert ex["index"] == i
    assert src[-1]["index"] == 19


def test_hand_written_scene_caption_and_pixels():
    scene = _hand_scene()
    caps = describe(scene)
    assert caps[:2] == ("two small red circles above a large blue square",
                        "a large blue square below two small red circles")
    assert caps[2].startswith(_PREFIXES)
    assert syn.labels(scene) == (syn.CLASS_NAMES.index("square"), syn.COLOUR_NAMES.index("blue"))
    image = render(scene, 64)
    for o in scene.objects:
        assert tuple(image[int(o.y * 64), int(o.x * 64)]) == syn.COLOURS[o.colour]
    assert tuple(image[0, 0]) == tuple(image[63, 63]) == (90, 90, 90)
    assert tuple(image[int(0.25 * 64), 32]) == (90, 90, 90)  # between the two circles


def test_single_group_location_and_article():
    star = Scene((Obj("star", "green", "large", 0.25, 0.25),))
    assert describe(star)[:2] == ("a large green star in the top left corner",
                                  "in the top left corner, a large green star")
    pair = Scene((Obj("triangle", "orange", "small", 0.3, 0.8), Obj("triangle", "orange", "small", 0.7, 0.8)))
    assert describe(pair)[0] == "two small orange triangles at the bottom"
    middle = Scene((Obj("triangle", "orange", "large", 0.5, 0.5),))
    assert describe(middle)[:2] == ("a large orange triangle", "a large orange triangle and nothing else")
    # the free paraphrase may lead with the colour: the article must follow it
    assert not any(re.search(r"\ba orange\b", describe(Scene(middle.objects, style=s))[2]) for s in range(50))


@pytest.mark.parametrize(
    "a_xy, b_xy, expected",
    [((0.5, 0.2), (0.5, 0.8), "a small red circle above a large blue square"),
     ((0.5, 0.8), (0.5, 0.2), "a large blue square above a small red circle"),
     ((0.2, 0.5), (0.8, 0.5), "a small red circle to the left of a large blue square"),
     ((0.8, 0.5), (0.2, 0.5), "a large blue square to the left of a small red circle"),
     ((0.2, 0.45), (0.8, 0.55), "a small red circle to the left of a large blue square"),  # widest gap wins
     ((0.5, 0.5), (0.53, 0.52), "a large blue square and a small red circle")],  # nothing clear: no relation
)
def test_relations_follow_centres(a_xy, b_xy, expected):
    scene = Scene((Obj("circle", "red", "small", *a_xy), Obj("square", "blue", "large", *b_xy)))
    assert describe(scene)[0] == expected


def test_more_than_two_kinds_is_an_error():
    objs = tuple(Obj(s, "red", "small", x, 0.5) for s, x in (("circle", 0.2), ("square", 0.5), ("star", 0.8)))
    with pytest.raises(ValueError, match="one or two kinds"):
        describe(Scene(objs))


def test_paraphrases_differ_but_name_the_same_things():
    assert len({describe(_hand_scene(s))[2] for s in range(40)}) > 10
    src = SyntheticCaptions("train", 300)
    for i in range(len(src)):
        scene, caps = src.scene(i), src.captions(i)
        assert len(set(caps)) == len(caps)
        colours, shapes = {o.colour for o in scene.objects}, {o.shape for o in scene.objects}
        for c in caps:
            assert _words(c, syn.COLOUR_NAMES) == colours and _words(c, syn.SHAPES) == shapes, (c, scene)


def test_generated_pictures_match_their_scenes():
    palette = np.array(list(syn.COLOURS.values()), np.float32)
    src = SyntheticCaptions("train", 150)
    for i in range(len(src)):
        scene, image = src.scene(i), src[i]["image"]
        assert 1 <= len(scene.objects) <= 3
        for o in scene.objects:
            pixel = image[int(o.y * 64), int(o.x * 64)].astype(np.float32)
            assert syn.COLOUR_NAMES[np.argmin(((palette - pixel) ** 2).sum(-1))] == o.colour
        largest = max(syn.SIZES[o.size] for o in scene.objects)
        shape = syn.CLASS_NAMES[src[i]["label"]]
        assert shape in {o.shape for o in scene.objects if syn.SIZES[o.size] == largest}


@pytest.mark.parametrize("max_objects", [1, 2, 5])
def test_max_objects(max_objects):
    src = SyntheticCaptions("train", 100, max_objects=max_objects)
    counts = [len(src.scene(i).objects) for i in range(len(src))]
    assert max(counts) <= max_objects and (max_objects == 1 or max(counts) > 1)


def test_train_and_eval_never_share_a_description():
    train, evals = SyntheticCaptions("train", 3000), SyntheticCaptions("eval", 600)
    train_caps = {c for i in range(len(train)) for c in train.captions(i)}
    eval_caps = {c for i in range(len(evals)) for c in evals.captions(i)}
    assert not train_caps & eval_caps
    assert all(syn.is_eval_caption(evals.captions(i)[0]) for i in range(len(evals)))
    assert not any(syn.is_eval_caption(train.captions(i)[0]) for i in range(len(train)))
    assert len({evals.captions(i)[0] for i in range(len(evals))}) > 0.8 * len(evals)  # retrieval is not ambiguous


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        SyntheticCaptions("test", 10)
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticCaptions("train", 10, max_objects=0)
    with pytest.raises(IndexError):
        SyntheticCaptions("train", 10)[10]


def test_grain_source():
    src = SyntheticCaptions("train", 16)
    ds = grain.MapDataset.source(src).map(lambda ex: (ex["image"].mean(), ex["caption"]))
    assert len(ds) == 16 and ds[3] == (src[3]["image"].mean(), src[3]["caption"])
    first = next(iter(grain.MapDataset.source(src).to_iter_dataset()))
    assert first["caption"] == src[0]["caption"]


def test_tokenizer_from_the_corpus_covers_every_caption(tmp_path):
    train = SyntheticCaptions("train", 2000)
    assert len(caption_corpus(train, 10)) == 10 * syn.NUM_CAPTIONS
    directory = build_tokenizer(tmp_path / "tok", caption_corpus(train, 2000), num_merges=1000)
    tok = Tokenizer.from_path(directory)
    evals = SyntheticCaptions("eval", 300)
    texts = [c for i in range(len(evals)) for c in evals.captions(i)]
    texts += [t.format(n) for t in syn.CLASS_PROMPT_TEMPLATES for n in syn.CLASS_NAMES]
    texts += [t.format(n) for t in syn.COLOUR_PROMPT_TEMPLATES for n in syn.COLOUR_NAMES]
    for text in texts:
        ids = tok.encode(text)
        assert ids and max(ids) < tok.vocab_size and re.sub(r" ([,.])", r"\1", tok.decode(ids)) == text
    for caption in texts[: 3 * len(evals)]:  # every caption word was learnt whole
        assert len(tok.encode(caption)) == len(caption.split()) + caption.count(",")
    assert tok(texts, context_length=32)[:, -1].max() == 0  # all fit in 32 tokens


def test_species_are_a_zipf_long_tail_of_named_glyphs():
    k = 32
    names = syn.species_names(k)
    assert len(set(names)) == k and syn.species_names(4) == names[:4]  # fixed, whatever K
    assert not set(names) & set(syn.SHAPES + syn.COLOUR_NAMES)
    assert syn.class_names(k) == syn.SHAPES + names
    source = SyntheticCaptions("train", 1500, 32, seed=0, species=k)
    counts = {name: 0 for name in names}
    for i in range(len(source)):
        example = source[i]
        for o in source.scene(i).objects:
            if o.shape in counts:
                counts[o.shape] += 1
                assert o.shape in example["caption"]  # a species is named by its made-up word
        assert syn.class_names(k)[example["label"]] in example["caption"]
    shares = np.array(list(counts.values())) / sum(counts.values())
    want = (1 / np.arange(1, k + 1)) / (1 / np.arange(1, k + 1)).sum()
    assert abs(shares[:4].sum() - want[:4].sum()) < 0.05 and shares[-8:].sum() < want[:1].sum()  # head and tail
    assert 0.4 < sum(counts.values()) / sum(len(source.scene(i).objects) for i in range(len(source))) < 0.6
    # Each species has its own glyph: drawn alone, two species' pictures differ, the same species' do not.
    pictures = [render(Scene((Obj(name, "red", "large", 0.5, 0.5),)), 32) for name in names[:3] + names[:1]]
    assert not np.array_equal(pictures[0], pictures[1]) and not np.array_equal(pictures[1], pictures[2])
    assert np.array_equal(pictures[0], pictures[3])
    assert SyntheticCaptions("train", 5, 32)[3]["caption"] == SyntheticCaptions("train", 5, 32, species=0)[3]["caption"]
    with pytest.raises(ValueError, match="species >= 0"):
        SyntheticCaptions("train", 5, 32, species=-1)


# ----- the catalogue world ------------------------------------------------------------------------------------------
def test_catalogue_pairs_names_and_looks_at_random_and_eval_shows_each_species_once():
    train, again = syn.SyntheticCatalogue("train", 40, species=12), syn.SyntheticCatalogue("train", 40, species=12)
    names = syn.catalogue_names(12)
    for i in (0, 5, 39):
        x = train[i]
        assert x["image"].tobytes() == again[i]["image"].tobytes() and x["captions"] == train.captions(i)
        assert x["captions"] == tuple(t.format(names[x["label"]]) for t in syn.CATALOGUE_TEMPLATES)
    assert len({train[i]["label"] for i in range(40)}) > 6  # species drawn uniformly, not in turn
    evals = syn.SyntheticCatalogue("eval", 30, species=12)
    assert [evals[i]["label"] for i in range(30)] == [i % 12 for i in range(30)]
    assert evals.zero_shot_classes() == (names, syn.CATALOGUE_TEMPLATES)
    # Two views of one species differ; the look (the markings' colours) is one per species, all distinct.
    same = [i for i in range(40) if train[i]["label"] == evals[0]["label"]]
    assert same and train[same[0]]["image"].tobytes() != evals[0]["image"].tobytes()
    looks = syn.catalogue_looks(12, 0)
    assert len(set(looks)) == 12 and looks != syn.catalogue_looks(12, 1)  # the data set seed re-pairs them
    assert syn.catalogue_names(12, 1) != names
    # Each corner shows its marking's colour, off by at most the shade (+-20) plus the texture's mean over a 4x4
    # corner (at most 19.1 over the fixed tile bank, any rotation): under 40.
    for x in (evals[0], evals[7], train[3]):
        image = x["image"].astype(float)
        corners = [image[:4, :4], image[:4, -4:], image[-4:, :4], image[-4:, -4:]]
        for corner, colour in zip(corners, looks[x["label"]]):
            assert np.abs(corner.reshape(-1, 3).mean(axis=0) - syn.COLOURS[colour]).max() < 40


def test_catalogue_names_need_every_word():
    """No one word of a name tells its species: each word is shared by many names, and the pairing of names with
    looks is random, so only the whole combination does (what makes the text tower memorise)."""
    names = syn.catalogue_names(1024)
    assert len(set(names)) == 1024 and all(len(n.split()) == syn.NAME_WORDS for n in names)
    assert {w for n in names for w in n.split()} == set(syn.lexicon())
    for position in range(syn.NAME_WORDS):
        counts = collections.Counter(n.split()[position] for n in names)
        assert min(counts.values()) > 30
    looks = syn.catalogue_looks(1024)
    first = collections.defaultdict(set)
    for n, look in zip(names, looks):
        first[n.split()[0]].add(look[0])
    assert all(len(colours) == len(syn.COLOURS) for colours in first.values())  # a first word fixes no colour


@pytest.mark.parametrize("kwargs, match", [
    (dict(world="catalogue", species=1), "2 <= species <= 4096"),
    (dict(world="catalogue", species=4097), "2 <= species <= 4096"),
    (dict(world="catalogue", species=8, max_objects=2), "catalogue world.*max_objects"),
    (dict(world="cities"), "world 'cities': expected one of scenes, catalogue"),
])
def test_catalogue_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        syn.make_source("train", size=4, **kwargs)
