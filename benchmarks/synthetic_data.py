"""Generation speed of the embedded data set, one core, one process.

Run from the repo root: ``python -m benchmarks.synthetic_data [--quick]``. The demo's input pipeline must not be the
bottleneck of a tiny CLIP on CPU, so each row is examples/s for one way of drawing examples: full examples
(image + captions + labels) per split and image size, captions alone (the tokenizer corpus), and full examples
plus tokenising all their captions with a BPE vocab trained on this data.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

from clipup_jax.data.bpe_trainer import build_tokenizer
from clipup_jax.data.pipeline import caption_corpus
from clipup_jax.data.synthetic import NUM_CAPTIONS, SyntheticCaptions
from clipup_jax.data.tokenizer import Tokenizer

N = 4000
CONTEXT_LENGTH = 77


def _rate(fn: Callable[[int], object], n: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` examples/s of ``fn(i)`` over ``i < n`` (nothing is cached between examples)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, time.perf_counter() - start)
    return n / best


def measure(n: int = N) -> tuple[list[tuple[str, float]], dict]:
    """[(row, examples/s)], and the tokenizer's size and build time."""
    train64, eval64 = SyntheticCaptions("train", n), SyntheticCaptions("eval", n)
    train224 = SyntheticCaptions("train", n, image_size=224)
    train64[0], train224[0]  # build the noise-texture banks outside the timing
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tok = Tokenizer.from_path(build_tokenizer(tmp, caption_corpus(train64, n), num_merges=1000))
        build_s = time.perf_counter() - start
    tok(list(train64.captions(0)), CONTEXT_LENGTH)

    rows = [
        ("train, 64x64", _rate(train64.__getitem__, n)),
        ("eval, 64x64 (redraws until a reserved caption)", _rate(eval64.__getitem__, n)),
        ("train, 224x224", _rate(train224.__getitem__, n // 4)),
        ("train captions only (no image)", _rate(train64.captions, n)),
        (f"train, 64x64 + tokenise all {NUM_CAPTIONS} captions", _rate(lambda i: tok(train64[i]["captions"]), n)),
    ]
    return rows, {"vocab": tok.vocab_size, "build_s": build_s}


def section(quick: bool = False):
    from benchmarks.run import Goal, Section

    n = 400 if quick else N
    rows, info = measure(n)
    lines = [f"Command: `python -m benchmarks.synthetic_data{' --quick' if quick else ''}` (one core, best of 3, "
             f"{n:,} examples per row; 224x224: {n // 4:,}).", "",
             "| generation | examples/s | µs/example |", "|---|---:|---:|"]
    lines += [f"| {name} | {rate:,.0f} | {1e6 / rate:.0f} |" for name, rate in rows]
    rate = dict(rows)["train, 64x64"]
    return Section("Embedded synthetic data set: generation speed", "\n".join(lines),
                   [Goal("synthetic train examples/s, 64x64, one core (reported)", f"{rate:,.0f}", None)],
                   {"examples_per_s": rate})


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="400 examples per row (a smoke run)")
    print(section(parser.parse_args().quick).markdown())


if __name__ == "__main__":
    main()
