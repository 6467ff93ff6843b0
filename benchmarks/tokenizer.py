"""Tokenizer throughput: ours (cold / warm BPE cache) next to the Rust HF tokenizer on the same captions.

Run from the repo root: ``python -m benchmarks.tokenizer [--quick]``. The vocab is trained here (~5000 merges) on generated
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


def measure(n_captions: int = N_CAPTIONS, num_merges: int = NUM_MERGES) -> tuple[list[tuple[str, float]], dict]:
    """[(row, captions/s)] for ours then HF (when transformers is installed), and what was measured."""
    captions = make_captions(n_captions)
    non_ascii = [c.replace("a ", "à ", 1).replace("photo", "phötö") + " café" for c in captions[:n_captions // 4]]
    start = time.perf_counter()
    merges = train_bpe(captions, num_merges)
    train_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        gz = write_openai_bpe(merges, os.path.join(tmp, "bpe.txt.gz"))
        hf_dir = write_hf_tokenizer(merges, os.path.join(tmp, "hf"))
        tok = Tokenizer.from_path(gz)
        rows = [("ours, cold cache", _rate(lambda: tok(captions), len(captions)))]
        rows.append(("ours, warm cache", _rate(lambda: tok(captions), len(captions), repeats=3)))
        tok(non_ascii)
        rows.append(("ours, warm, non-ASCII captions (ftfy path)",
                     _rate(lambda: tok(non_ascii), len(non_ascii), repeats=3)))
        hf = None
        try:
            from transformers import CLIPTokenizer

            hf = CLIPTokenizer.from_pretrained(str(hf_dir))
        except ImportError:
            pass
        if hf is not None:
            threads = len(os.sched_getaffinity(0))
            rows += [("HF `CLIPTokenizer` -> np, 1 thread", _hf_rate(hf, captions, parallel=False)),
                     ("HF Rust `encode_batch`, 1 thread", _hf_rate(hf, captions, parallel=False, raw=True)),
                     (f"HF `CLIPTokenizer` -> np, {threads} threads", _hf_rate(hf, captions, parallel=True)),
                     (f"HF Rust `encode_batch`, {threads} threads", _hf_rate(hf, captions, parallel=True, raw=True))]
    return rows, {"captions": len(captions), "merges": len(merges), "train_s": train_s}


def section(quick: bool = False):
    from benchmarks.run import Goal, Section

    rows, info = measure(2_000 if quick else N_CAPTIONS, 1_000 if quick else NUM_MERGES)
    ref = dict(rows).get("HF `CLIPTokenizer` -> np, 1 thread")  # the drop-in equivalent: padded array, one core
    lines = [f"Command: `python -m benchmarks.tokenizer{' --quick' if quick else ''}`. {info['captions']:,} generated "
             f"captions of about 10 words, a {info['merges']:,}-merge vocab trained by `clipup_jax.data.bpe_trainer`, "
             f"`context_length={CONTEXT_LENGTH}`, output an int32 `(N, {CONTEXT_LENGTH})` array.",
             "", "| tokenizer | captions/s | vs HF `CLIPTokenizer` -> np, 1 thread |", "|---|---:|---:|"]
    for name, rate in rows:
        lines.append(f"| {name} | {rate:,.0f} | {f'{rate / ref:.2f}x' if ref else '-'} |")
    lines += ["", NOTES]
    warm = dict(rows)["ours, warm cache"]
    non_ascii = dict(rows)["ours, warm, non-ASCII captions (ftfy path)"]
    goals = [Goal("tokeniser captions/s (reported; ours vs HF `CLIPTokenizer`, one core)",
                  f"{warm:,.0f} warm ({warm / ref:.1f}x HF), {non_ascii:,.0f} non-ASCII" if ref else f"{warm:,.0f}",
                  None)]
    return Section("Tokenizer throughput", "\n".join(lines), goals, {"captions_per_s": warm})


NOTES = ("Pure-Python BPE with a per-word cache and an ASCII fast path that skips ftfy/html clean-up when it cannot "
         "change the text. Captions are short and repetitive, so after warm-up nearly every word is a cache hit; "
         "the non-ASCII row pays ftfy on every caption and is the realistic floor for multilingual web text.")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 captions, 1,000 merges (a smoke run)")
    print(section(parser.parse_args().quick).markdown())


if __name__ == "__main__":
    main()
