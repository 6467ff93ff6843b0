"""Is the miniature capacity-bound? The demo's dense model against the same model with 8x the MLP width (the MLP
parameters CLIP-UP's 8 experts hold) and with a 16x narrower text MLP, all trained from scratch for the same steps
on one embedded world. If the wide model is no better, extra expert parameters have nothing to add at this budget,
whatever the routing; if the narrow one is no worse, the MLPs are not where the world is stored.

    python -m benchmarks.capacity --steps 3000 [--workdir /tmp/capacity]        # the demo's catalogue
    python -m benchmarks.capacity --world scenes --species 64 --steps 800

Prints held-out R@1 both ways and zero-shot top-1 of each model at each quarter of the steps, side by side.
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
    parser.add_argument("--world", choices=WORLDS, default=demo_config().data.synthetic_world)
    parser.add_argument("--species", type=int, default=demo_config().data.synthetic_species)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/capacity"))
    args = parser.parse_args()
    vision, text = DEMO_MODEL.vision, DEMO_MODEL.text
    wide = DEMO_MODEL.replace(vision=dataclasses.replace(vision, mlp_dim=8 * vision.mlp_dim),
                              text=dataclasses.replace(text, mlp_dim=8 * text.mlp_dim))
    narrow = DEMO_MODEL.replace(text=dataclasses.replace(text, mlp_dim=text.mlp_dim // 16))
    shutil.rmtree(args.workdir, ignore_errors=True)
    rows = []
    for i, (name, model) in enumerate((("dense", DEMO_MODEL), ("dense, 8x MLP", wide), ("text MLP / 16", narrow))):
        config = demo_config(model)
        config.data.synthetic_world = args.world
        config.data.synthetic_species = args.species
        if args.world == "catalogue":  # each held-out picture another species
            config.data.eval_size = min(config.data.eval_size, args.species)
        config.total_steps, config.checkpoint_every = args.steps, args.steps
        config.eval_every = max(1, args.steps // 4)
        start = time.perf_counter()
        evals = run_experiment(config, args.workdir / f"model_{i}")["eval"]
        rows.append((name, evals, time.perf_counter() - start))
    print(f"\n{args.world} world, species {args.species}, {args.steps} steps from scratch (held-out, %)")
    print(f"{'model':<16}" + "".join(f"{k + ' @' + str(e['step']):>28}" for k in KEYS for e in rows[0][1]) + "  time")
    for name, evals, seconds in rows:
        print(f"{name:<16}" + "".join(f"{100 * e[k]:>28.1f}" for k in KEYS for e in evals) + f"  {seconds:.0f}s")


if __name__ == "__main__":
    main()
