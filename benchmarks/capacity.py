"""Is the miniature capacity-bound? The demo's dense model against the same model with 4x the MLP width (about the
MLP parameters CLIP-UP's 4 experts hold), both trained from scratch for the same steps on the embedded set with a
long tail of `--species` glyph species. If the wide model is no better, extra expert parameters have nothing to
add at this budget, whatever the routing.

    python -m benchmarks.capacity --species 64 --steps 800 [--workdir /tmp/capacity]
    python -m benchmarks.capacity --world catalogue --species 256 --steps 2000

Prints held-out R@1 both ways and zero-shot top-1 of each model at half and full steps, side by side.
Hand-run (one run of each model, minutes on a 2-core CPU); its figures are in RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import time

from clipup_jax.data.synthetic import WORLDS
from clipup_jax.train.recipes import DEMO_MODEL, demo_config
from clipup_jax.train.run import run_experiment

KEYS = ("text_to_image_R@1", "image_to_text_R@1", "zero_shot_top1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=WORLDS, default="scenes")
    parser.add_argument("--species", type=int, default=64)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/capacity"))
    args = parser.parse_args()
    wide = DEMO_MODEL.replace(vision=dataclasses.replace(DEMO_MODEL.vision, mlp_dim=4 * DEMO_MODEL.vision.mlp_dim),
                              text=dataclasses.replace(DEMO_MODEL.text, mlp_dim=4 * DEMO_MODEL.text.mlp_dim))
    shutil.rmtree(args.workdir, ignore_errors=True)
    rows = []
    for name, model in (("dense", DEMO_MODEL), ("dense, 4x MLP", wide)):
        config = demo_config(model)
        config.data.synthetic_world = args.world
        config.data.synthetic_species = args.species
        if args.world == "catalogue":  # each held-out picture another species
            config.data.eval_size = min(config.data.eval_size, args.species)
        config.total_steps, config.checkpoint_every = args.steps, args.steps
        config.eval_every = args.steps // 2
        start = time.perf_counter()
        evals = run_experiment(config, args.workdir / name.replace(" ", "_").replace(",", ""))["eval"]
        rows.append((name, evals, time.perf_counter() - start))
    print(f"\n{args.world} world, species {args.species}, {args.steps} steps from scratch (held-out, %)")
    print(f"{'model':<16}" + "".join(f"{k + ' @' + str(e['step']):>28}" for k in KEYS for e in rows[0][1]) + "  time")
    for name, evals, seconds in rows:
        print(f"{name:<16}" + "".join(f"{100 * e[k]:>28.1f}" for k in KEYS for e in evals) + f"  {seconds:.0f}s")


if __name__ == "__main__":
    main()
