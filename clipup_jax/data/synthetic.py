"""The embedded data set, in two worlds: a catalogue of named species to memorise (``SyntheticCatalogue``, the
demo's), and procedurally drawn scenes of coloured shapes with compositional captions (``SyntheticCaptions``).

The demo must run on a fresh machine with no download, so images and captions are generated here, each example a
pure function of ``(seed, split, index)``: any grain worker can make any example, and nothing is stored.

The catalogue is CLIP's long tail of named fine-grained concepts (bird species, products, places) in miniature:
``species`` made-up species, each a name of ``NAME_WORDS`` words from a lexicon of ``LEXICON_SIZE`` made-up words
("a photo of a voki lamu pere.") and a look, the colours of its 2 x 2 markings; names and looks are paired at
random. Seeing is easy by design (four flat colours, whatever the view), so what a model must do is store the
pairing, which is what parameters buy: a name is a combination of words each shared by many names, so no token's
embedding can hold it, and the text tower must compute it. Eval captions all occur in training; eval pictures are
new views of the species. Measured (benchmarks/RESULTS.md, clipup-demo): continued from a parent that is still
learning the pairing, CLIP-UP learns it faster than dense at the same steps. It is not capacity-bound in the strict
sense: the demo's dense model memorises all 1,024 species in 3,000 steps, and one with a 16x narrower text MLP
about as fast (attention stores the pairing too), so a catalogue that outgrows the dense model would need far more
training than the minutes a 2-core CPU gives.

A scene holds one or two *groups* of identical objects (shape, colour, size), e.g. "two small red circles above a
large blue square". Retrieval needs binding (which colour goes with which shape, which group is on top). Captions
are derived from the objects' positions only, so they are true of the picture by construction. ``species=K`` adds
a long tail: K made-up glyph species (an irregular polygon each, a made-up name each, e.g. "a small red vokimu"),
drawn for half of all groups with Zipf(1) frequencies over their rank. Measured (benchmarks/RESULTS.md): at the
demo's budget the scenes, with or without the tail, are bound by optimisation steps and CLIP-UP gains nothing there.

Train/eval separation in the scenes is structural: every scene has a canonical caption; a hash of it puts 1 in
``EVAL_BUCKETS`` captions in the eval reserve. Train redraws a scene whose canonical caption is reserved, eval
redraws until it is, so no eval scene's description ever occurs in train (different seeds per split keep the draws
independent too).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import itertools
import math
import operator
import random
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw


SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
CLASS_NAMES = SHAPES  # zero-shot label: shape of the dominant group (see `labels`); `class_names(K)` with species
SPECIES_SHARE = 0.5  # with species: the fraction of groups that are a species rather than a basic shape
_GLYPH_SEED = 20_261_203
_ONSETS, _VOWELS = "bdfgklmnprstvz", "aeiou"
COLOURS = {
    "red": (220, 45, 45), "orange": (245, 140, 25), "yellow": (240, 220, 45), "green": (45, 170, 65),
    "cyan": (40, 205, 215), "blue": (45, 80, 225), "purple": (145, 65, 200), "pink": (245, 135, 195),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = {"small": 0.09, "large": 0.16}  # bounding-circle radius as a fraction of the image side
CLASS_PROMPT_TEMPLATES = ("a picture of a {}.", "a {} shape.", "an image with a {} in it.", "a drawing of a {}.")
COLOUR_PROMPT_TEMPLATES = ("a picture of a {} shape.", "something {}.", "a {} object.")
NUM_CAPTIONS = 3
EVAL_BUCKETS = 8  # 1/8 of canonical captions are reserved for eval
SPLITS = {"train": 0, "eval": 1}
NUM_TEXTURES = 256  # 32 noise tiles x 8 flips/rotations
SINGLE_GROUP_P = 0.3

_MARGIN, _GAP, _PAD = 0.02, 0.02, 0.03  # border, half-split gap, min clearance between objects
_MIN_SEPARATION = 0.05  # centre distance below which "above"/"left of" is not claimed (generated: >= 0.18)
_SUPERSAMPLE = 2
_TEXTURE_SEED = 20_241_129
_REL = {"above": ("above", "over"), "below": ("below", "under", "beneath"),
        "left": ("to the left of", "left of"), "right": ("to the right of", "right of"), "and": ("and", "and also")}
_INVERSE = {"above": "below", "left": "right", "and": "and"}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_PREFIXES = ("a picture of", "an image of", "a scene with", "there {be}")


@dataclasses.dataclass(frozen=True)
class Obj:
    """One drawn object; (x, y) is its centre as a fraction of the image side, y growing downwards."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    angle: float = 0.0  # degrees, a small tilt so shapes are not pixel-identical
    shade: int = 0  # brightness offset added to the palette colour


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything `render` and `describe` need. ``texture=-1``: flat background; ``style`` picks the free paraphrase."""

    objects: tuple[Obj, ...]
    background: tuple[int, int, int] = (96, 96, 96)
    texture: int = -1
    style: int = 0


class _Group(NamedTuple):
    shape: str
    colour: str
    size: str
    objects: tuple[Obj, ...]


# ----- text -----------------------------------------------------------------------------------------------------------
def _groups(scene: Scene) -> list[_Group]:
    found: dict[tuple[str, str, str], list[Obj]] = {}
    for o in scene.objects:
        found.setdefault((o.shape, o.colour, o.size), []).append(o)
    if not found or len(found) > 2:
        raise ValueError(f"a scene needs one or two kinds of object, got {len(found)}")
    return [_Group(*key, tuple(objs)) for key, objs in found.items()]


def _dominance(g: _Group) -> tuple[int, int]:
    return (g.size == "large", len(g.objects))


def _arrange(groups: list[_Group]) -> tuple[list[_Group], str]:
    """Order two groups as (upper, lower) or (left, right) by their centres: the largest clear separation wins."""
    if len(groups) == 1:
        return groups, ""
    a, b = groups
    ys = lambda g: [o.y for o in g.objects]
    xs = lambda g: [o.x for o in g.objects]
    options = [(min(ys(b)) - max(ys(a)), [a, b], "above"), (min(ys(a)) - max(ys(b)), [b, a], "above"),
               (min(xs(b)) - max(xs(a)), [a, b], "left"), (min(xs(a)) - max(xs(b)), [b, a], "left")]
    sep, order, rel = max(options, key=lambda t: t[0])
    if sep < _MIN_SEPARATION:  # interleaved or nearly level: no relation is clearly true, so state none
        return sorted(groups, key=_dominance, reverse=True), "and"
    return order, rel


def _location(g: _Group) -> str:
    """'top left' etc. when every object of the group lies wholly in that half/quadrant, else ''."""
    r = [SIZES[o.size] for o in g.objects]
    v = "top" if all(o.y + q <= 0.5 for o, q in zip(g.objects, r)) else (
        "bottom" if all(o.y - q >= 0.5 for o, q in zip(g.objects, r)) else "")
    h = "left" if all(o.x + q <= 0.5 for o, q in zip(g.objects, r)) else (
        "right" if all(o.x - q >= 0.5 for o, q in zip(g.objects, r)) else "")
    return f"{v} {h}".strip()


def _location_words(loc: str) -> tuple[str, ...]:
    if " " in loc:
        v, h = loc.split()
        return (f"in the {loc} corner", f"at the {loc}", f"in the {'upper' if v == 'top' else 'lower'} {h}")
    if loc in ("top", "bottom"):
        return (f"at the {loc}", f"near the {loc}", f"in the {'upper' if loc == 'top' else 'lower'} half")
    return (f"on the {loc}", f"on the {loc} side", f"in the {loc} half")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(g: _Group, pick: random.Random | None = None) -> str:
    """``pick=None``: the canonical '{count} {size} {colour} {shape}'; otherwise synonyms and word order vary."""
    n = len(g.objects)
    noun = g.shape if n == 1 else g.shape + ("es" if g.shape.endswith(("s", "x", "ch", "sh")) else "s")
    size = _SIZE_WORDS[g.size][0] if pick is None else pick.choice(_SIZE_WORDS[g.size])
    form = 0 if pick is None else pick.randrange(3)
    be = "is" if n == 1 else "are"
    words = [(size, g.colour, noun), (size, noun, "in", g.colour), (g.colour, noun, "that", be, size)][form]
    if n == 1:
        count = _article(words[0]) if pick is None else pick.choice((_article(words[0]), "one", "a single"))
    else:
        count = _NUMBERS[n] if n < len(_NUMBERS) else str(n)
        count = count if pick is None or n != 2 else pick.choice((count, "a pair of"))
    return " ".join((count, *words))


def canonical_caption(scene: Scene) -> str:
    """The one fixed-wording description that identifies a scene's content (used for the train/eval split)."""
    groups, rel = _arrange(_groups(scene))
    if rel:
        return f"{_noun_phrase(groups[0])} {_REL[rel][0]} {_noun_phrase(groups[1])}"
    loc = _location(groups[0])
    return f"{_noun_phrase(groups[0])} {_location_words(loc)[0]}" if loc else _noun_phrase(groups[0])


def describe(scene: Scene) -> tuple[str, ...]:
    """``NUM_CAPTIONS`` distinct true captions: canonical, reordered, and a paraphrase picked by ``scene.style``."""
    groups, rel = _arrange(_groups(scene))
    pick = random.Random(scene.style)
    first = canonical_caption(scene)
    if rel:
        second = f"{_noun_phrase(groups[1])} {_REL[_INVERSE[rel]][0]} {_noun_phrase(groups[0])}"
        a, b, r = (groups[0], groups[1], rel) if pick.random() < 0.5 else (groups[1], groups[0], _INVERSE[rel])
        body = f"{_noun_phrase(a, pick)} {pick.choice(_REL[r])} {_noun_phrase(b, pick)}"
    else:
        a, loc = groups[0], _location(groups[0])
        second = f"{_location_words(loc)[0]}, {_noun_phrase(a)}" if loc else f"{_noun_phrase(a)} and nothing else"
        body = f"{_noun_phrase(a, pick)} {pick.choice(_location_words(loc))}" if loc else _noun_phrase(a, pick)
    prefix = pick.choice(_PREFIXES).format(be="is" if body.startswith(("a ", "an ", "one ")) else "are")
    return (first, second, f"{prefix} {body}")


def _made_up_words(k: int, syllables: int, seed: int) -> tuple[str, ...]:
    """K distinct made-up words of `syllables` consonant-vowel syllables (no English word of the captions is one)."""
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while len(words) < k:
        word = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                       for _ in range(syllables))
        if word not in words:
            words.append(word)
    return tuple(words)


@functools.cache
def species_names(k: int) -> tuple[str, ...]:
    """The scenes' K glyph species: made-up words of three syllables, the same first ones whatever K."""
    return _made_up_words(k, 3, _GLYPH_SEED)


def class_names(species: int = 0) -> tuple[str, ...]:
    """Zero-shot classes of a world with `species` species: the basic shapes, then the species by rank."""
    return SHAPES + species_names(species)


@functools.cache
def _species_cdf(k: int) -> np.ndarray:
    weights = 1.0 / np.arange(1, k + 1)
    return np.cumsum(weights) / weights.sum()


@functools.cache
def _glyph(name: str) -> tuple[tuple[float, float], ...]:
    """The species' polygon inside the unit circle: 5-9 vertices at jittered angles and radii in [0.35, 1]."""
    rng = np.random.default_rng([_GLYPH_SEED, int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(),
                                                             "little")])
    n = int(rng.integers(5, 10))
    angles = np.sort((np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * math.pi / n)
    radii = rng.uniform(0.35, 1.0, n)
    radii[rng.integers(n)] = 1.0  # one vertex on the circle: every glyph spans its size
    return tuple((float(r * math.cos(a)), float(r * math.sin(a))) for r, a in zip(radii, angles))


def labels(scene: Scene, species: int = 0) -> tuple[int, int]:
    """(shape, colour) class indices of the dominant group: large beats small, then more objects; ties: first."""
    g = max(_arrange(_groups(scene))[0], key=_dominance)
    return class_names(species).index(g.shape), COLOUR_NAMES.index(g.colour)


def is_eval_caption(caption: str) -> bool:
    """Whether a canonical caption is in the eval reserve (a stable hash; Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % EVAL_BUCKETS == 0


# ----- pixels ---------------------------------------------------------------------------------------------------------
def _star(points: int, inner: float) -> list[tuple[float, float]]:
    return [((1.0 if k % 2 == 0 else inner) * math.cos(math.pi * (k / points - 0.5)),
             (1.0 if k % 2 == 0 else inner) * math.sin(math.pi * (k / points - 0.5))) for k in range(2 * points)]


_W = 0.33  # half-width of a cross arm
_UNIT_SHAPES = {  # vertices inside the unit bounding circle, y down
    "square": [(-0.72, -0.72), (0.72, -0.72), (0.72, 0.72), (-0.72, 0.72)],
    "diamond": [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)],
    "triangle": [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)],
    "star": _star(5, 0.45),
    "cross": [(-_W, -0.95), (_W, -0.95), (_W, -_W), (0.95, -_W), (0.95, _W), (_W, _W), (_W, 0.95), (-_W, 0.95),
              (-_W, _W), (-0.95, _W), (-0.95, -_W), (-_W, -_W)],
}


def _draw(draw: ImageDraw.ImageDraw, o: Obj, side: int) -> None:
    cx, cy, r = o.x * side, o.y * side, SIZES[o.size] * side
    fill = tuple(min(255, max(0, c + o.shade)) for c in COLOURS[o.colour])
    if o.shape == "circle":
        r *= 0.85  # about the area of the other shapes
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    c, s = math.cos(math.radians(o.angle)), math.sin(math.radians(o.angle))
    unit = _UNIT_SHAPES[o.shape] if o.shape in _UNIT_SHAPES else _glyph(o.shape)
    draw.polygon([(cx + r * (u * c - v * s), cy + r * (u * s + v * c)) for u, v in unit], fill=fill)


@functools.cache
def _texture_bank(image_size: int) -> np.ndarray:
    """int16 (32, S, S, 3) zero-mean tiles: a smooth luminance wash plus pixel noise; fixed for all runs."""
    rng = np.random.default_rng(_TEXTURE_SEED)
    coarse = rng.normal(0.0, 8.0, (32, 4, 4))
    interp = np.clip(1.0 - np.abs(np.linspace(0.0, 3.0, image_size)[:, None] - np.arange(4)[None, :]), 0.0, None)
    wash = np.einsum("sa,kab,tb->kst", interp, coarse, interp)[..., None]
    noise = rng.normal(0.0, 4.0, (32, image_size, image_size, 3))
    return np.rint(wash + noise).astype(np.int16)


def render(scene: Scene, image_size: int = 64) -> np.ndarray:
    """uint8 (image_size, image_size, 3): drawn at 2x and box-downsampled (anti-aliased), then texture added."""
    side = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), tuple(scene.background))
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        _draw(draw, o, side)
    pixels = np.asarray(image.reduce(_SUPERSAMPLE))
    if scene.texture < 0:
        return pixels.copy()
    bank = _texture_bank(image_size)
    tile = np.rot90(bank[scene.texture % len(bank)], scene.texture // len(bank) % 4)
    tile = tile[:, ::-1] if scene.texture // len(bank) % 8 >= 4 else tile
    return np.clip(pixels + tile, 0, 255).astype(np.uint8)


# ----- sampling -------------------------------------------------------------------------------------------------------
class _Draws:
    """Uniform floats from a numpy Generator, fetched in blocks: scalar Generator calls cost ~1 us each."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng, self._buf = rng, []

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        if not self._buf:
            self._buf = self._rng.random(64).tolist()
        return lo + (hi - lo) * self._buf.pop()

    def choice(self, options: Sequence[Any]) -> Any:
        return options[int(self.uniform() * len(options))]


_Rect = tuple[float, float, float, float]  # x0, y0, x1, y1
_FULL: _Rect = (_MARGIN, _MARGIN, 1 - _MARGIN, 1 - _MARGIN)
_TOP: _Rect = (_MARGIN, _MARGIN, 1 - _MARGIN, 0.5 - _GAP)
_BOTTOM: _Rect = (_MARGIN, 0.5 + _GAP, 1 - _MARGIN, 1 - _MARGIN)
_LEFT: _Rect = (_MARGIN, _MARGIN, 0.5 - _GAP, 1 - _MARGIN)
_RIGHT: _Rect = (0.5 + _GAP, _MARGIN, 1 - _MARGIN, 1 - _MARGIN)
_QUADRANTS = [(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
              for a in (_TOP, _BOTTOM) for b in (_LEFT, _RIGHT)]
_SINGLE_REGIONS = [_FULL, _TOP, _BOTTOM, _LEFT, _RIGHT, *_QUADRANTS]


def _place(d: _Draws, radius: float, rect: _Rect, placed: list[tuple[float, float, float]]) -> bool:
    """Put one object of ``radius`` wholly inside ``rect``, clear of ``placed``; False after 30 misses."""
    for _ in range(30):
        x, y = d.uniform(rect[0] + radius, rect[2] - radius), d.uniform(rect[1] + radius, rect[3] - radius)
        if all((x - px) ** 2 + (y - py) ** 2 >= (radius + pr + _PAD) ** 2 for px, py, pr in placed):
            placed.append((x, y, radius))
            return True
    return False


def _shape(d: _Draws, species: int) -> str:
    if species and d.uniform() < SPECIES_SHARE:
        return species_names(species)[min(int(np.searchsorted(_species_cdf(species), d.uniform())), species - 1)]
    return d.choice(SHAPES)


def _sample_groups(d: _Draws, max_objects: int, species: int = 0) -> list[tuple[int, str, str, str]]:
    """(count, shape, colour, size) per group; two groups never look alike and never tie for dominance."""
    if max_objects < 2 or d.uniform() < SINGLE_GROUP_P:
        counts = [1 + int(d.uniform() * min(3, max_objects))]
    else:
        counts = list(d.choice([(a, b) for a in (1, 2, 3) for b in (1, 2, 3) if a + b <= max_objects]))
    groups = [[n, _shape(d, species), d.choice(COLOUR_NAMES), d.choice(tuple(SIZES))] for n in counts]
    if len(groups) == 2:
        (na, sa, ca, za), (nb, sb, cb, zb) = groups
        if (sa, ca, za) == (sb, cb, zb):
            groups[1][2] = COLOUR_NAMES[(COLOUR_NAMES.index(ca) + 1 + int(d.uniform() * 7)) % len(COLOUR_NAMES)]
        if za == zb and na == nb:
            groups[1][3] = "small" if za == "large" else "large"
    return [tuple(g) for g in groups]


def sample_scene(d: _Draws, max_objects: int, species: int = 0) -> Scene:
    """A random scene: one group in a random region, or two groups on either side of a horizontal/vertical split."""
    for attempt in itertools.count():
        if attempt % 20 == 0:  # some group sets cannot fit (e.g. many large objects in a half): draw new ones
            groups = _sample_groups(d, max_objects, species)
        if len(groups) == 1:
            rects = [d.choice(_SINGLE_REGIONS)]
        else:
            rects = d.choice([[_TOP, _BOTTOM], [_BOTTOM, _TOP], [_LEFT, _RIGHT], [_RIGHT, _LEFT]])
        placed: list[tuple[float, float, float]] = []
        if all(_place(d, SIZES[g[3]], rect, placed) for g, rect in zip(groups, rects) for _ in range(g[0])):
            break
    kinds = [g[1:] for g in groups for _ in range(g[0])]
    objects = tuple(Obj(shape, colour, size, x, y, 0.0 if shape == "circle" else d.uniform(-15.0, 15.0),
                        int(d.uniform(-15.0, 16.0))) for (shape, colour, size), (x, y, _) in zip(kinds, placed))
    grey = d.uniform(60.0, 130.0)
    background = tuple(int(grey + d.uniform(-8.0, 8.0)) for _ in range(3))
    return Scene(objects, background, int(d.uniform() * NUM_TEXTURES), int(d.uniform() * 2**31))


def _checked_index(index: int, size: int) -> int:
    """`index` into a source of `size` examples (negative counts from the end), or IndexError."""
    i = operator.index(index)
    i = i + size if i < 0 else i
    if not 0 <= i < size:
        raise IndexError(f"index {index} out of range for {size} examples")
    return i


# ----- the source -----------------------------------------------------------------------------------------------------
class SyntheticCaptions:
    """Random-access source for ``grain.MapDataset.source``; example ``i`` depends only on (seed, split, i)."""

    def __init__(self, split: str, size: int, image_size: int = 64, seed: int = 0, max_objects: int = 3,
                 species: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if size < 0 or seed < 0 or image_size < 8 or max_objects < 1 or species < 0:
            raise ValueError(f"need size >= 0, seed >= 0, image_size >= 8, max_objects >= 1, species >= 0; got "
                             f"{size=}, {seed=}, {image_size=}, {max_objects=}, {species=}")
        self.split, self.size, self.image_size, self.seed, self.max_objects = split, size, image_size, seed, max_objects
        self.species = species

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (f"SyntheticCaptions(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
                f"seed={self.seed}, max_objects={self.max_objects}, species={self.species})")

    def scene(self, index: int) -> Scene:
        """The scene of example ``index``: redrawn until its canonical caption is on this split's side of the hash."""
        i = _checked_index(index, self.size)
        d = _Draws(np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[self.split], i])))
        want_eval = self.split == "eval"
        while True:
            scene = sample_scene(d, self.max_objects, self.species)
            if is_eval_caption(canonical_caption(scene)) == want_eval:
                return scene

    def captions(self, index: int) -> tuple[str, ...]:
        """Captions alone, without drawing the image (for tokenizer corpora)."""
        return describe(self.scene(index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = _checked_index(index, self.size)
        scene = self.scene(i)
        captions = describe(scene)
        label, colour_label = labels(scene, self.species)
        return {"image": render(scene, self.image_size), "captions": captions, "caption": captions[0],
                "label": label, "colour_label": colour_label, "index": i}

    def zero_shot_classes(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(class names, prompt templates) of `label`: the dominant group's shape."""
        return class_names(self.species), CLASS_PROMPT_TEMPLATES


# ----- the catalogue world --------------------------------------------------------------------------------------------
WORLDS = ("scenes", "catalogue")
LEXICON_SIZE, NAME_WORDS = 16, 3  # a species' name: NAME_WORDS of the lexicon's made-up words
MARKINGS = 4  # a species' look: the colours of its 2 x 2 markings
CATALOGUE_TEMPLATES = ("a photo of a {}.", "a {}.", "this is a {}.")  # its captions, and its zero-shot prompts
MAX_CATALOGUE_SPECIES = min(LEXICON_SIZE ** NAME_WORDS, len(COLOURS) ** MARKINGS)
_CATALOGUE_SEED = 20_261_206
_PALETTE = np.array(list(COLOURS.values()), np.int16)


@functools.cache
def lexicon() -> tuple[str, ...]:
    """The catalogue's words: LEXICON_SIZE made-up two-syllable words, fixed for all data sets."""
    return _made_up_words(LEXICON_SIZE, 2, _CATALOGUE_SEED)


@functools.cache
def catalogue_names(species: int, seed: int = 0) -> tuple[str, ...]:
    """Species i's name: distinct NAME_WORDS-word combinations drawn at random (from `seed`)."""
    codes = np.random.default_rng([_CATALOGUE_SEED, 0, seed, species]).permutation(LEXICON_SIZE ** NAME_WORDS)
    return tuple(" ".join(lexicon()[int(c) // LEXICON_SIZE ** j % LEXICON_SIZE] for j in range(NAME_WORDS))
                 for c in codes[:species])


@functools.cache
def catalogue_looks(species: int, seed: int = 0) -> tuple[tuple[str, ...], ...]:
    """Species i's look, the colour names of its markings (top left, top right, bottom left, bottom right):
    distinct looks drawn at random (from `seed`), independently of the names, so a name says nothing about its
    look."""
    codes = np.random.default_rng([_CATALOGUE_SEED, 1, seed, species]).permutation(len(COLOURS) ** MARKINGS)
    return tuple(tuple(COLOUR_NAMES[int(c) // len(COLOURS) ** j % len(COLOURS)] for j in range(MARKINGS))
                 for c in codes[:species])


def render_specimen(look: Sequence[str], d: _Draws, image_size: int = 64) -> np.ndarray:
    """uint8 (image_size, image_size, 3): the species' 2 x 2 markings, split at a random point near the centre,
    each shaded at random, with a random texture tile on top (a new view each draw)."""
    sx, sy = (int(image_size * d.uniform(0.4, 0.6)) for _ in range(2))
    image = np.empty((image_size, image_size, 3), np.int16)
    for (rows, cols), colour in zip(((slice(0, sy), slice(0, sx)), (slice(0, sy), slice(sx, None)),
                                     (slice(sy, None), slice(0, sx)), (slice(sy, None), slice(sx, None))), look):
        image[rows, cols] = _PALETTE[COLOUR_NAMES.index(colour)] + int(d.uniform(-20.0, 20.0))
    bank = _texture_bank(image_size)
    tile = np.rot90(bank[int(d.uniform() * len(bank))], int(d.uniform() * 4))
    return np.clip(image + tile, 0, 255).astype(np.uint8)


class SyntheticCatalogue:
    """The catalogue world: `species` made-up species, each a made-up name and a look, paired at random.

    Captions name the species and nothing else ("a photo of a voki lamu pere."), so matching a caption to a
    picture is recall of memorised pairs (the module docstring says why). Eval pictures are new views (where the
    markings meet, their shades, the texture) of species seen in training; eval example i shows species
    i mod `species`, so an eval set of at most `species` examples holds each species once and no caption matches
    two pictures. The pairing is fixed by `seed` (the data set); the split only changes the views.
    """

    def __init__(self, split: str, size: int, image_size: int = 64, seed: int = 0, species: int = 256) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if size < 0 or seed < 0 or image_size < 8 or not 2 <= species <= MAX_CATALOGUE_SPECIES:
            raise ValueError(f"catalogue world: need size >= 0, seed >= 0, image_size >= 8, 2 <= species <= "
                             f"{MAX_CATALOGUE_SPECIES}; got {size=}, {seed=}, {image_size=}, {species=}")
        self.split, self.size, self.image_size, self.seed, self.species = split, size, image_size, seed, species

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (f"SyntheticCatalogue(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
                f"seed={self.seed}, species={self.species})")

    def _view(self, index: int) -> tuple[int, int, _Draws]:
        """(index, species, the draws that make its view) of example `index`."""
        i = _checked_index(index, self.size)
        d = _Draws(np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[self.split], i, self.species])))
        species = i % self.species if self.split == "eval" else int(d.uniform() * self.species)
        return i, species, d

    def _captions(self, species: int) -> tuple[str, ...]:
        return tuple(t.format(catalogue_names(self.species, self.seed)[species]) for t in CATALOGUE_TEMPLATES)

    def captions(self, index: int) -> tuple[str, ...]:
        return self._captions(self._view(index)[1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, species, d = self._view(index)
        captions = self._captions(species)
        image = render_specimen(catalogue_looks(self.species, self.seed)[species], d, self.image_size)
        return {"image": image, "captions": captions, "caption": captions[0], "label": species, "index": i}

    def zero_shot_classes(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(class names, prompt templates) of `label`: the species' names."""
        return catalogue_names(self.species, self.seed), CATALOGUE_TEMPLATES


def make_source(split: str, world: str = "scenes", **options: Any) -> SyntheticCaptions | SyntheticCatalogue:
    """The embedded data set's `world` ("scenes": compositional scenes, "catalogue": memorised named species)."""
    if world not in WORLDS:
        raise ValueError(f"synthetic world {world!r}: expected one of {', '.join(WORLDS)}")
    cls = SyntheticCatalogue if world == "catalogue" else SyntheticCaptions
    try:
        inspect.signature(cls).bind(split, **options)
    except TypeError as e:
        raise ValueError(f"synthetic source ({world} world): {e}") from None
    return cls(split, **options)
