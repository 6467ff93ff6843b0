"""Train a CLIP-format byte-level BPE vocabulary, and write it as an OpenAI ``.txt.gz`` or a HF directory.

Lets tests and small experiments build a real tokenizer from their own captions instead of downloading
OpenAI's 1.3 MB merges file. Pre-tokenisation and clean-up are shared with :mod:`clipup_jax.data.tokenizer`,
so a trained vocab covers exactly the words the tokenizer will see.
"""

from __future__ import annotations

import collections
import gzip
import heapq
import json
from collections.abc import Iterable, Sequence

from clipup_jax.data.tokenizer import (
    END_OF_WORD,
    EOT_TOKEN,
    HF_MERGES_FILE,
    HF_VOCAB_FILE,
    SOT_TOKEN,
    byte_encode,
    clean_text,
    clip_vocab,
    merge_pair,
    pre_tokenize,
)
from clipup_jax.storage import Path, PathLike, as_path

MERGES_HEADER = "#version: 0.2"


def _word_counts(texts: Iterable[str]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        counts.update(pre_tokenize(clean_text(text)))
    for special in (SOT_TOKEN, EOT_TOKEN):
        counts.pop(special, None)
    return counts


def _pairs(word: Sequence[str]) -> collections.Counter[tuple[str, str]]:
    return collections.Counter(zip(word, word[1:]))


def train_bpe(texts: Iterable[str], num_merges: int, *, min_frequency: int = 1) -> list[tuple[str, str]]:
    """Learn up to ``num_merges`` merges, most frequent adjacent pair first.

    Pair frequencies count every adjacent occurrence inside a word, weighted by the word's count. Ties go to the
    lexicographically smallest pair, so the result depends only on the multiset of ``texts``. Stops early when no
    pair reaches ``min_frequency``. Only words containing the merged pair are revisited each step, and a lazy
    max-heap finds the next pair, so thousands of merges over ~10k captions take seconds.
    """
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    counts = _word_counts(texts)
    words: list[list[str]] = []
    freqs: list[int] = []
    for piece, freq in sorted(counts.items()):
        chars = byte_encode(piece)
        words.append(list(chars[:-1]) + [chars[-1] + END_OF_WORD])
        freqs.append(freq)

    pair_counts: collections.Counter[tuple[str, str]] = collections.Counter()
    where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
    for idx, word in enumerate(words):
        for pair, n in _pairs(word).items():
            pair_counts[pair] += n * freqs[idx]
            where[pair].add(idx)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale entry; the current count was pushed when it changed
        if -neg < max(min_frequency, 1):
            break
        merges.append(pair)
        changed: set[tuple[str, str]] = set()
        for idx in sorted(where.pop(pair)):
            word = words[idx]
            new = merge_pair(word, pair)
            if len(new) == len(word):
                continue  # index entry was stale: pair no longer in this word
            old_pairs, new_pairs = _pairs(word), _pairs(new)
            freq = freqs[idx]
            for p, c in old_pairs.items():
                delta = new_pairs.get(p, 0) - c
                if delta:
                    pair_counts[p] += delta * freq
                    changed.add(p)
            for p, c in new_pairs.items():
                if p not in old_pairs:
                    pair_counts[p] += c * freq
                    where[p].add(idx)
                    changed.add(p)
            words[idx] = new
        pair_counts.pop(pair, None)
        for p in changed:
            c = pair_counts.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                pair_counts.pop(p, None)
    return merges


def _merge_lines(merges: Sequence[tuple[str, str]]) -> str:
    for a, b in merges:
        if not a or not b or any(ch.isspace() for ch in a + b):
            raise ValueError(f"merge symbols must be non-empty and contain no whitespace, got {(a, b)!r}")
    return "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n"


def write_openai_bpe(merges: Sequence[tuple[str, str]], path: PathLike) -> Path:
    """Write an OpenAI-layout gzip merges file (header line, then ``a b`` per line); byte-reproducible."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _merge_lines(merges).encode("utf-8")
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(data)
    return path


def write_hf_tokenizer(merges: Sequence[tuple[str, str]], directory: PathLike) -> Path:
    """Write ``vocab.json`` (ids in CLIP order, as the OpenAI loader assigns them) and ``merges.txt``."""
    directory = as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = _merge_lines(merges)
    vocab = {token: i for i, token in enumerate(clip_vocab(merges))}  # duplicate results: last id wins, as OpenAI
    (directory / HF_VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / HF_MERGES_FILE).write_text(text, encoding="utf-8")
    return directory


def build_tokenizer(directory: PathLike, texts: Iterable[str], num_merges: int) -> Path:
    """Train BPE on `texts` and write it as a HF-format tokenizer directory (returned)."""
    return write_hf_tokenizer(train_bpe(texts, num_merges), directory)
