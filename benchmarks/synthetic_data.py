"""Generation speed of the embedded data set, one core, one process.

Run from the repo root: ``python -m benchmarks.synthetic_data``. The demo's input pipeline must not be the
bottleneck of a tiny CLIP on CPU, so each row is examples/s for one way of drawing examples: full examples
(image + captions + labels) per split and image size, captions alone (the tokenizer corpus), and full examples
plus tokenising all their captions with a BPE vocab trained on this data.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

from clipup_jax.data.synthetic import NUM_CAPTIONS, SyntheticCaptions, build_tokenizer
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


def main() -> None:
    train64, eval64 = SyntheticCaptions("train", N), SyntheticCaptions("eval", N)
    train224 = SyntheticCaptions("train", N, image_size=224)
    train64[0], train224[0]  # build the noise-texture banks outside the timing
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tok = Tokenizer.from_path(build_tokenizer(tmp, train64, num_texts=N))
        build_s = time.perf_counter() - start
    tok(list(train64.captions(0)), CONTEXT_LENGTH)

    rows = [
        ("train, 64x64", _rate(train64.__getitem__, N)),
        ("eval, 64x64 (rejection-sampled reserve)", _rate(eval64.__getitem__, N)),
        ("train, 224x224", _rate(train224.__getitem__, N // 4)),
        ("train captions only (no image)", _rate(train64.captions, N)),
        (f"train, 64x64 + tokenise {NUM_CAPTIONS} captions", _rate(lambda i: tok(train64[i]["captions"]), N)),
    ]
    print(f"{N} examples per row, best of 3, one core; tokenizer ({tok.vocab_size} ids) built in {build_s:.1f}s "
          f"from {N * NUM_CAPTIONS} captions")
    print(f"{'generation':<44}{'examples/s':>12}{'us/example':>12}")
    for name, rate in rows:
        print(f"{name:<44}{rate:>12,.0f}{1e6 / rate:>12.0f}")


if __name__ == "__main__":
    main()
