"""CLIP tokenizer + BPE trainer: hand-computed ids, loader parity, HF reference parity, errors.

Vocabularies are trained here on generated captions; nothing is downloaded or committed. The HF reference
(``transformers.CLIPTokenizer``) has no ftfy / html.unescape step, so strings those steps change are compared
against the HF result on the already-cleaned text instead.
"""

from __future__ import annotations

import collections
import gzip
import html
import json
import pickle
import random

import ftfy
import numpy as np
import pytest

from clipup_jax.data.bpe_trainer import train_bpe, write_hf_tokenizer, write_openai_bpe
from clipup_jax.data.tokenizer import (
    OPENAI_MAX_MERGES,
    Tokenizer,
    byte_encode,
    clean_text,
    pre_tokenize,
    source_files,
)

SUBJECTS = ["dog", "cat", "man", "woman", "child", "bird", "horse", "car", "bicycle", "train", "boat", "pizza",
            "giraffe", "elephant", "skateboarder", "surfer", "chef", "teddy bear", "laptop", "umbrella"]
ADJECTIVES = ["small", "large", "red", "blue", "green", "old", "young", "happy", "shiny", "wooden", "striped",
              "fluffy", "wet", "dark", "bright"]
VERBS = ["sitting on", "standing next to", "running across", "jumping over", "lying under", "looking at",
         "holding", "riding", "parked near", "eating"]
PLACES = ["the beach", "a busy street", "the kitchen table", "a snowy field", "the river", "a park bench",
          "the city square", "a wooden fence", "the mountains", "an airport runway"]
EXTRAS = ["", ".", "!", " at night.", " in the rain.", ", isn't it?", " (photo 2019).", " -- it's huge!",
          " with 3 friends.", " that don't move.", " they've got 12 of them."]


def make_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        caption = (f"{rng.choice(['A', 'a', 'The', 'Two', 'Some'])} {rng.choice(ADJECTIVES)} {rng.choice(SUBJECTS)} "
                   f"{rng.choice(VERBS)} {rng.choice(PLACES)}{rng.choice(EXTRAS)}")
        out.append(caption.upper() if rng.random() < 0.05 else caption)
    return out


CAPTIONS = make_captions(300)

TRICKY = [
    "naïve café",
    "Crème Brûlée à la française, über-cool señor",
    "東京タワーの夜景 北京 한국어 텍스트",
    "emoji 😀👍🏽🇯🇵 party 🎉!!",
    "don't stop, it's fine; we're here, they'll go, I'd say, you've won, I'm ok",
    "DON'T IT'S",
    "12345 and 3.14159 and 1,000,000",
    "  lots   of \t whitespace \n\n between   ",
    "MiXeD CaSe WoRdS",
    "!!! ??? ... ,,, --- ### $$$ %%% ^^^ &&& ***",
    "a photo of a cat.",
    "A Diagram",
    "  Hello,   World!!  ",
    "naïve café 123",
    "a <|endoftext|> b <|startoftext|>",
    "tabs\tand\rcarriage\r\nreturns",
    "",
    "   ",
    "x",
]

# ftfy / html.unescape change these; HF must see the cleaned text to agree.
CLEANED_BY_US = {
    "&amp; html &lt;b&gt;": "& html <b>",
    "fish &amp;amp; chips": "fish & chips",
    "don’t “quote” me": "don't \"quote\" me",
    "ﬁne ligature": "fine ligature",
    "ＦＵＬＬ ｗｉｄｔｈ": "full width",
}


@pytest.fixture(scope="module")
def merges() -> list[tuple[str, str]]:
    return train_bpe(CAPTIONS, 400)


@pytest.fixture(scope="module")
def files(tmp_path_factory, merges):
    root = tmp_path_factory.mktemp("tok")
    gz = write_openai_bpe(merges, root / "bpe.txt.gz")
    txt = root / "bpe.txt"
    txt.write_bytes(gzip.decompress(gz.read_bytes()))
    hf_dir = write_hf_tokenizer(merges, root / "hf")
    return {"gz": gz, "txt": txt, "hf": hf_dir}


@pytest.fixture(scope="module")
def tok(files) -> Tokenizer:
    return Tokenizer.from_path(files["gz"])


@pytest.fixture(scope="module")
def hf(files):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(files["hf"]))


# ----- hand-checkable ids ---------------------------------------------------------------------------------------
# Vocab order: ids 0..255 are bytes_to_unicode() order ('!'..'~' first, so '!'=0, 'a'=64, 'h'=71, 'l'=75, 'o'=78),
# 256..511 the same with '</w>', then merges in order, then SOT, EOT.
A, H, L, O = 64, 71, 75, 78
W = 256  # offset of the '</w>' variants


def test_hand_merges_ids(tmp_path):
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o</w>"), ("a", "a")]
    tok = Tokenizer.from_merges(merges)
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id, tok.pad_token_id) == (519, 517, 518, 0)
    assert tok.encode("hello") == [515]
    assert tok.encode("Hello, HELLO!") == [515, W + 11, 515, W + 0]  # ',' is '!'+11
    assert tok.encode("hell") == [512, L, W + L]  # 'he' 'l' 'l</w>': ('l','l</w>') is not a merge
    assert tok.encode("aaa") == [516, W + A]  # left-to-right, non-overlapping
    assert tok.encode("a .") == [320, 269]  # same ids as OpenAI's real vocab for single characters
    assert tok.encode("é") == [127, W + 102]  # UTF-8 c3 a9 -> byte symbols 127, 102
    assert tok.encode("42") == [W + 19, W + 17]  # digits are split one by one
    row = tok("hello a", context_length=6)
    assert row.dtype == np.int32 and row.tolist() == [[517, 515, 320, 518, 0, 0]]
    assert tok.decode(row[0]) == "hello a"
    # Both loaders give the same ids for the hand-made merges.
    write_openai_bpe(merges, tmp_path / "m.txt.gz")
    write_hf_tokenizer(merges, tmp_path / "hf")
    for path in (tmp_path / "m.txt.gz", tmp_path / "hf"):
        loaded = Tokenizer.from_path(path)
        assert loaded.encode("hello hell aaa") == [515, 512, L, W + L, 516, W + A]
        assert loaded.vocab_size == 519


def test_lowest_rank_merge_wins_over_position():
    tok = Tokenizer.from_merges([("e", "l"), ("h", "e"), ("l", "l")])
    # pairs (h,e)=1 (e,l)=0 (l,l)=2: 'el' first, after which neither (h,el) nor (el,l) is a merge.
    assert tok.encode("hello") == [H, 512, L, W + O]


def test_decode_roundtrip_and_padding(tok):
    for text in CAPTIONS[:50] + ["naïve café 😀 東京"]:
        ids = tok(text)[0]
        assert tok.decode(ids) == " ".join(pre_tokenize(clean_text(text)))
    assert tok.decode([tok.sot_token_id, 0, 0, tok.eot_token_id, 0]) == "!!"  # pad before EOT is the token '!'
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([10**6])


def test_call_shapes_and_truncation(tok):
    assert tok("a dog").shape == (1, 77)
    batch = tok(CAPTIONS[:7], context_length=32)
    assert batch.shape == (7, 32) and batch.dtype == np.int32
    assert tok([]).shape == (0, 77)
    empty = tok("")[0]
    assert empty[:2].tolist() == [tok.sot_token_id, tok.eot_token_id] and not empty[2:].any()
    long = tok(" ".join(CAPTIONS[:40]))[0]
    assert long.shape == (77,) and long[0] == tok.sot_token_id and long[-1] == tok.eot_token_id
    assert long[1:-1].tolist() == tok.encode(" ".join(CAPTIONS[:40]))[:75]
    exact = "a " * 75  # exactly fills 77 with SOT/EOT: no truncation
    assert tok(exact)[0].tolist() == [tok.sot_token_id] + [320] * 75 + [tok.eot_token_id]
    with pytest.raises(ValueError, match="context_length"):
        tok("a", context_length=1)


def test_pickles_for_worker_processes(tok):
    clone = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(clone(CAPTIONS[:20]), tok(CAPTIONS[:20]))


def test_special_token_text_maps_to_special_id(tok):
    assert tok.encode("<|endoftext|>") == [tok.eot_token_id]
    assert tok.encode("<|StartOfText|>") == [tok.sot_token_id]  # lowercased first, as OpenAI


# ----- loaders ----------------------------------------------------------------------------------------------------
def test_loaders_agree(files, merges):
    toks = {name: Tokenizer.from_path(path) for name, path in files.items()}
    texts = CAPTIONS + TRICKY + list(CLEANED_BY_US)
    ref = toks["gz"](texts)
    for name, t in toks.items():
        n = len(merges)
        assert (t.vocab_size, t.sot_token_id, t.eot_token_id) == (514 + n, 512 + n, 513 + n), name
        np.testing.assert_array_equal(t(texts), ref, err_msg=name)


def test_source_files(files):
    assert source_files(files["gz"]) == [files["gz"]]


def test_gzip_detected_from_content(files):
    gz_named_txt = files["gz"].with_name("actually_gzip.txt")
    gz_named_txt.write_bytes(files["gz"].read_bytes())
    expected = Tokenizer.from_path(files["txt"]).encode("a red dog")
    assert Tokenizer.from_path(gz_named_txt).encode("a red dog") == expected
    assert source_files(str(files["hf"])) == [files["hf"] / "vocab.json", files["hf"] / "merges.txt"]


def test_openai_file_is_capped_at_48894_merges(tmp_path):
    lines = ["bpe_simple_vocab_16e6.txt#version: 0.2"] + [f"x{i} y{i}" for i in range(OPENAI_MAX_MERGES + 100)]
    path = tmp_path / "big.txt.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    tok = Tokenizer.from_path(path)
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) == (49408, 49406, 49407)


# ----- errors -----------------------------------------------------------------------------------------------------
def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        Tokenizer.from_path(tmp_path / "nope.txt.gz")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"d.*merges\.txt"):
        Tokenizer.from_path(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        source_files(tmp_path / "d")


@pytest.mark.parametrize(
    "content, message",
    [
        ("#version: 0.2\na b\na b c\n", r"line 3 .*'a b c'"),
        ("#version: 0.2\nab\n", "line 2"),
        ("#version: 0.2\na b\n\nc d\n", "line 3"),
        ("a b\nc d\n", "#version"),
        ("", "#version"),
    ],
)
def test_malformed_merges_file(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        Tokenizer.from_path(path)
    assert "bad.txt" in str(err.value)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "broken.txt.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="broken.txt.gz"):
        Tokenizer.from_path(path)


def test_malformed_hf_directory(tmp_path, merges):
    d = write_hf_tokenizer(merges, tmp_path / "hf")
    vocab = json.loads((d / "vocab.json").read_text())
    del vocab["".join(merges[5])]
    (d / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=r"merges\.txt: line 7 .*absent from .*vocab\.json"):
        Tokenizer.from_path(d)
    del vocab["<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=r"vocab\.json lacks"):
        Tokenizer.from_path(d)
    (d / "vocab.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"vocab\.json"):
        Tokenizer.from_path(d)


# ----- Hugging Face reference -------------------------------------------------------------------------------------
def _hf_ids(hf, text: str, context_length: int = 77) -> list[int]:
    return hf(text, truncation=True, max_length=context_length)["input_ids"]


def _ours_unpadded(tok, text: str, context_length: int = 77) -> list[int]:
    row = tok(text, context_length=context_length)[0].tolist()
    last_eot = len(row) - 1 - row[::-1].index(tok.eot_token_id)  # text may contain EOT itself
    return row[: last_eot + 1]


def test_hf_reference_special_ids(tok, hf):
    # write_hf_tokenizer puts the specials at the end, so HF's bos/eos are our SOT/EOT by construction.
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.sot_token_id, tok.eot_token_id)
    assert hf.pad_token_id == tok.eot_token_id  # HF pads with EOT; we pad with 0 (checked below)


@pytest.mark.parametrize("text", TRICKY + CAPTIONS[:20])
def test_matches_hf_reference(tok, hf, text):
    assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert _ours_unpadded(tok, text) == _hf_ids(hf, text)


@pytest.mark.parametrize("raw, cleaned", list(CLEANED_BY_US.items()))
def test_matches_hf_on_cleaned_text(tok, hf, raw, cleaned):
    assert clean_text(raw) == cleaned.lower()
    assert tok.encode(raw) == hf(cleaned, add_special_tokens=False)["input_ids"]
    assert tok.encode(raw) != hf(raw, add_special_tokens=False)["input_ids"]  # the documented difference


def test_special_glued_to_punctuation_differs_from_hf(tok, hf):
    # OpenAI's regex sees "<<|" "endoftext" "|>" (punctuation runs are greedy); HF cuts added tokens out first.
    text = "<<|endoftext|>"
    assert tok.encode(text) == tok.encode("<<|") + tok.encode("endoftext") + tok.encode("|>")
    assert tok.eot_token_id in hf(text, add_special_tokens=False)["input_ids"]


def test_truncation_matches_hf(tok, hf):
    text = " ".join(CAPTIONS[:30]) + " 1234567890" * 5
    for context_length in (77, 16, 2):
        ours = tok(text, context_length=context_length)[0]
        assert ours.shape == (context_length,) and ours[-1] == tok.eot_token_id
        assert ours.tolist() == _hf_ids(hf, text, context_length)
    padded = hf("a dog", padding="max_length", max_length=10)["input_ids"]
    ours = tok("a dog", context_length=10)[0].tolist()
    assert ours[:4] == padded[:4] and ours[4:] == [0] * 6 and padded[4:] == [tok.eot_token_id] * 6


def test_fuzz_against_hf(tok, hf):
    rng = random.Random(1234)
    alphabet = [*"abcXYZ éüñçÅßæ京タ한😀👍🏽🇯 '.,!?-&;<>09\t\n’ﬁＡ", "'s", "'ll", "&amp;", " <|endoftext|> "]
    for _ in range(1000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        assert _ours_unpadded(tok, text, 200) == _hf_ids(hf, clean_text(text), 200), repr(text)


def test_clean_text_ascii_shortcut_is_exact():
    rng = random.Random(7)
    chars = [chr(c) for c in range(32, 127)]
    for _ in range(500):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 30)))
        slow = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).strip().split()).lower()
        assert clean_text(text) == slow, repr(text)  # str.split == \s+ on printable ASCII


# ----- trainer ----------------------------------------------------------------------------------------------------
def _naive_train(texts, num_merges):
    """Recount everything each step: slow, obviously right."""
    words = collections.Counter()
    for t in texts:
        for piece in pre_tokenize(clean_text(t)):
            chars = byte_encode(piece)
            words[tuple(chars[:-1]) + (chars[-1] + "</w>",)] += 1
    words = dict(words)
    merges = []
    for _ in range(num_merges):
        counts = collections.Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                counts[p] += f
        if not counts:
            break
        best = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        new_words = collections.Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i < len(w) - 1 and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += f
        words = dict(new_words)
    return merges


def test_train_bpe_hand_corpus():
    corpus = ["low " * 5, "lower " * 2, "newest " * 6, "widest " * 3]
    merges = train_bpe(corpus, 6)
    # (e,s)=9 and (s,t</w>)=9 tie -> lexicographically smaller first; then (es,t</w>)=9, (l,o)=7,
    # then a three-way tie at 6 between (e,w), (n,e), (w,est</w>).
    assert merges[:4] == [("e", "s"), ("es", "t</w>"), ("l", "o"), ("e", "w")]
    assert merges == _naive_train(corpus, 6)


def test_train_bpe_matches_naive_and_is_deterministic(merges):
    assert merges == _naive_train(CAPTIONS, 400)
    shuffled = CAPTIONS[:]
    random.Random(3).shuffle(shuffled)
    assert train_bpe(shuffled, 400) == merges
    assert train_bpe(iter(CAPTIONS), 400) == merges


def test_train_bpe_stops_when_exhausted():
    merges = train_bpe(["ab ab"], 10)
    assert merges == [("a", "b</w>")]
    assert train_bpe(["ab cd"], 10, min_frequency=2) == []
    assert train_bpe([], 5) == []


def test_writers_roundtrip(tmp_path, merges):
    gz = write_openai_bpe(merges, tmp_path / "a" / "v.txt.gz")
    lines = gzip.decompress(gz.read_bytes()).decode().splitlines()
    assert lines[0] == "#version: 0.2" and [tuple(l.split(" ")) for l in lines[1:]] == merges
    assert write_openai_bpe(merges, tmp_path / "b.txt.gz").read_bytes() == gz.read_bytes()  # reproducible
    d = write_hf_tokenizer(merges, tmp_path / "hf")
    vocab = json.loads((d / "vocab.json").read_text())
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["".join(merges[0])] == 512
    assert vocab["<|endoftext|>"] == len(vocab) - 1
    with pytest.raises(ValueError, match="whitespace"):
        write_openai_bpe([("a b", "c")], tmp_path / "x.txt.gz")
