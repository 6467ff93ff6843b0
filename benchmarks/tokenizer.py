"""Tokenizer throughput: ours (cold / warm BPE cache) next to the Rust HF tokenizer on the same captions.

Run from the repo root: ``python -m benchmarks.tokenizer``. The vocab is trained here (~5000 merges) on generated
captions, so nothing is downloaded. Ours runs on one core; HF is shown single-threaded and with its thread
pool, both through ``CLIPTokenizer`` (padded numpy output, like ours) and as the bare Rust ``encode_batch``
(no padding, no array).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence

from clipup_jax.data.bpe_trainer import train_bpe, write_hf_tokenizer, write_openai_bpe
from clipup_jax.data.tokenizer import Tokenizer

N_CAPTIONS = 20_000
NUM_MERGES = 5_000
CONTEXT_LENGTH = 77

_COMMON = ("a an the of on in with and at near two three photo picture image man woman dog cat car street "
           "red blue green small large old young sitting standing holding riding walking it's don't").split()
_SYLLABLES = ("ka lo mi ne ru sa to vi ze qu bra ste pli gon dar fel mox tri an el is or um ex ul "
              "ph th ch sh wr gl").split()


def make_captions(n: int, seed: int = 0) -> list[str]:
    """~10-word captions over common words plus a long tail of pseudo-words (so 5000 merges exist)."""
    rng = random.Random(seed)
    tail = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 5))) for _ in range(12_000)]
    captions = []
    for _ in range(n):
        words = [rng.choice(_COMMON) if rng.random() < 0.6 else rng.choice(tail) for _ in range(10)]
        captions.append(" ".join(words).capitalize() + rng.choice([".", "", "!", " 2"]))
    return captions


def _rate(fn: Callable[[], object], n: int, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def _hf_rate(hf, captions: Sequence[str], parallel: bool, raw: bool = False) -> float:
    """``raw``: the Rust backend's ``encode_batch`` alone (no padding to arrays, no transformers wrapper)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
    texts = list(captions)
    if raw:
        call = lambda: hf.backend_tokenizer.encode_batch(texts)
    else:
        call = lambda: hf(texts, padding="max_length", truncation=True, max_length=CONTEXT_LENGTH, return_tensors="np")
    return _rate(call, len(captions), repeats=3)


def main() -> None:
    captions = make_captions(N_CAPTIONS)
    non_ascii = [c.replace("a ", "à ", 1).replace("photo", "phötö") + " café" for c in captions[:5000]]
    start = time.perf_counter()
    merges = train_bpe(captions, NUM_MERGES)
    train_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        gz = write_openai_bpe(merges, os.path.join(tmp, "bpe.txt.gz"))
        hf_dir = write_hf_tokenizer(merges, os.path.join(tmp, "hf"))
        tok = Tokenizer.from_path(gz)
        rows = [("ours, cold cache", _rate(lambda: tok(captions), len(captions)))]
        rows.append(("ours, warm cache", _rate(lambda: tok(captions), len(captions), repeats=3)))
        tok(non_ascii)
        rows.append(("ours, warm, non-ASCII (ftfy path)", _rate(lambda: tok(non_ascii), len(non_ascii), repeats=3)))
        hf = None
        try:
            from transformers import CLIPTokenizer

            hf = CLIPTokenizer.from_pretrained(str(hf_dir))
        except ImportError:
            pass
        hf_rows = []
        if hf is not None:
            threads = len(os.sched_getaffinity(0))
            hf_rows = [("HF CLIPTokenizer -> np, 1 thread", _hf_rate(hf, captions, parallel=False)),
                       ("HF Rust encode_batch, 1 thread", _hf_rate(hf, captions, parallel=False, raw=True)),
                       (f"HF CLIPTokenizer -> np, {threads} threads", _hf_rate(hf, captions, parallel=True)),
                       (f"HF Rust encode_batch, {threads} threads", _hf_rate(hf, captions, parallel=True, raw=True))]

    print(f"{len(captions)} captions (~10 words), {len(merges)} merges trained in {train_s:.1f}s, "
          f"context_length={CONTEXT_LENGTH}")
    ref = hf_rows[0][1] if hf_rows else None  # the drop-in equivalent: padded int array, one core
    print(f"{'tokenizer':<40}{'captions/s':>12}{'/ HF np 1t':>12}")
    for name, rate in rows + hf_rows:
        ratio = f"{rate / ref:.2f}" if ref else "-"
        print(f"{name:<40}{rate:>12,.0f}{ratio:>12}")


if __name__ == "__main__":
    main()
