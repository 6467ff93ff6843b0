"""clipup-demo: CLIP-UP end to end on the embedded synthetic data set, on CPU (RESULTS.md: how long it takes).

1. pre-train a tiny dense CLIP (the parent) on generated image-caption pairs (by default the catalogue of
   named species, data/synthetic.py), with a BPE tokenizer trained on their captions, evaluating it as it goes
   and saying whether its held-out retrieval has stopped improving (`PLATEAU_POINTS`);
2. from the parent's checkpoint, continue three arms, each once per seed (`--seeds`): dense for the same steps,
   dense for the same training FLOPs, and CLIP-UP (every other block upcycled into a Mixture-of-Experts:
   experts = copies of the MLP); a seed sets data order, router init and noise, never the data set;
3. evaluate the parent and every run on the same held-out pictures (retrieval R@1/5/10 both ways, zero-shot);
4. print each arm's mean +- std over seeds and the paired difference CLIP-UP - dense with its 95 % t interval,
   write `results.json` (with one record per run) and `results.png`.
Whichever arm wins is reported as measured.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time
from typing import Any

from clipup_jax.cli.errors import Parser, run_cli
from clipup_jax.data.synthetic import WORLDS, make_source

# Continued from the one parent, each once per seed; paired by seed in the comparisons.
ARMS = ("dense", "dense-equal-flops", "clip-up")
COMPARISONS = (("clip-up", "dense"), ("clip-up", "dense-equal-flops"))
PARENT_EVALS = 4  # held-out evaluations during pre-training, the last at its end
# The parent has stopped improving when its last evaluation interval adds less than this to T->I R@1 (points).
PLATEAU_POINTS = 1.0


def _step(message: str) -> None:
    print(f"\n=== {message}", flush=True)


def _arm_config(model, parent: pathlib.Path, steps: int, seed: int, args: argparse.Namespace):
    from clipup_jax.train.configs import apply_override
    from clipup_jax.train.recipes import DEMO_CONTINUED, demo_config

    config = demo_config(model)
    _set_world(config, args)
    config.seed = seed  # data order, router init and noise; the data set itself is config.data.synthetic_seed
    config.init.checkpoint = str(parent)  # its model and its tokenizer
    config.total_steps = steps
    for field, value in DEMO_CONTINUED.items():
        apply_override(config, f"{field}={value}")
    config.eval_every = steps
    config.checkpoint_every = steps
    config.log_every = 25
    return config


def _set_world(config, args: argparse.Namespace) -> None:
    """The one data set every run trains and is evaluated on."""
    config.data.synthetic_world = args.world
    config.data.synthetic_species = args.species
    config.data.eval_size = args.eval_size


def _parent_curve(history: dict[str, Any]) -> dict[str, Any]:
    """The parent's held-out R@1 by step, and whether its last interval added under `PLATEAU_POINTS`."""
    curve = [{"step": e["step"], **{k: e[k] for k in ("text_to_image_R@1", "image_to_text_R@1")}}
             for e in history["eval"]]
    gain = None if len(curve) < 2 else curve[-1]["text_to_image_R@1"] - curve[-2]["text_to_image_R@1"]
    return {"curve": curve, "last_steps": None if gain is None else curve[-1]["step"] - curve[-2]["step"],
            "last_gain": gain, "plateaued": gain is not None and 100 * gain < PLATEAU_POINTS}


def _parent_line(parent: dict[str, Any]) -> str:
    curve = " | ".join(f"{e['step']}: {100 * e['text_to_image_R@1']:.1f}" for e in parent["curve"])
    if parent["last_gain"] is None:
        return f"parent held-out T->I R@1 by step: {curve} (one evaluation: no plateau test)"
    verdict = "plateaued" if parent["plateaued"] else "still improving: the arms fork mid-curve"
    return (f"parent held-out T->I R@1 by step: {curve}; {100 * parent['last_gain']:+.1f} points over its last "
            f"{parent['last_steps']} steps: {verdict} (plateau: under {PLATEAU_POINTS:g} point)")


def _model_summary(config) -> dict[str, Any]:
    from clipup_jax.checkpoints.summary import active_params
    from clipup_jax.models.flops import image_flops, text_flops
    from clipup_jax.models.param_tree import abstract_params, count_params
    from clipup_jax.config import model_config

    cfg = model_config(config)
    params = abstract_params(cfg)
    return {"total_params": count_params(params), "active_params": active_params(cfg, params),
            "image_mflops": image_flops(cfg) / 1e6, "text_mflops": text_flops(cfg) / 1e6}


def _pm(metrics: dict[str, Any], key: str) -> str:
    m = metrics.get(key)
    return "n/a" if m is None else f"{100 * m['mean']:.1f} +-{100 * m['std']:4.1f}"


def _table(report: dict[str, Any]) -> str:
    from clipup_jax.train.sweep_report import HEADLINE

    columns = [("T->I R@1", "text_to_image_R@1"), ("I->T R@1", "image_to_text_R@1"), ("T->I R@5", "text_to_image_R@5"),
               ("0-shot", "zero_shot_top1")]
    lines = [f"{'arm':<19}{'seeds':>6}{'steps':>7}" + "".join(f"{h:>14}" for h, _ in columns)
             + f"{'params':>9}{'active':>9}{'train TFLOP':>13}"]
    for name, arm in report["arms"].items():
        cells = "".join(f"{_pm(arm.get('metrics', {}), k):>14}" for _, k in columns)
        lines.append(f"{name:<19}{len(arm['seeds_finished']):>6}{arm['steps']:>7}{cells}"
                     f"{arm['total_params'] / 1e6:>8.2f}M{arm['active_params'] / 1e6:>8.2f}M"
                     f"{arm['train_flops'] / 1e12:>13.2f}")
    lines.append("")
    for name, diff in report["differences"].items():
        cells = []
        for key in HEADLINE:
            d = diff["metrics"][key]
            ci = "(one seed: no interval)" if d["n"] < 2 else f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
            cells.append(f"{'T->I' if key.startswith('text') else 'I->T'} R@1 {100 * d['mean']:+.1f} {ci}")
        lines.append(f"{name:<29}" + "    ".join(cells))
    lines.append(f"(points; {report['interval']})")
    return "\n".join(lines)


def _verdict(report: dict[str, Any]) -> str:
    d = report["differences"]["clip-up - dense"]["metrics"]["text_to_image_R@1"]
    if d["n"] >= 2 and d["low"] > 0:
        return f"CLIP-UP ahead of dense by {100 * d['mean']:.1f} points T->I R@1: the interval excludes zero"
    if d["n"] >= 2 and d["high"] < 0:
        return f"dense ahead of CLIP-UP by {-100 * d['mean']:.1f} points T->I R@1: the interval excludes zero"
    return f"CLIP-UP - dense = {100 * d['mean']:+.1f} points T->I R@1: inside seed noise (the interval holds zero)"


def _figure(report: dict[str, Any], parent: dict[str, Any], histories: dict[str, list[list[dict[str, Any]]]],
            path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from clipup_jax.train.sweep_report import HEADLINE

    fig, (ax_parent, ax_r1, ax_loss, ax_load) = plt.subplots(1, 4, figsize=(22, 4.8))
    for key in HEADLINE:
        ax_parent.plot([e["step"] for e in parent["curve"]], [100 * e[key] for e in parent["curve"]], marker="o",
                       label=key.replace("_to_", "->").replace("text", "T").replace("image", "I").replace("_", " "))
    ax_parent.set(title="the parent's held-out R@1 while pre-training", xlabel="step", ylabel="R@1 (%)")
    ax_parent.legend(fontsize=8)
    names = list(report["arms"])
    for j, key in enumerate(HEADLINE):
        x = np.arange(len(names)) + (j - 0.5) * 0.38
        metrics = [report["arms"][n].get("metrics", {}).get(key, {"mean": np.nan, "std": 0.0}) for n in names]
        means, stds = [100 * m["mean"] for m in metrics], [100 * m["std"] for m in metrics]
        ax_r1.bar(x, means, 0.36, yerr=stds, capsize=3, label=key.replace("_to_", "->").replace("text", "T")
                  .replace("image", "I").replace("->T_", "->T ").replace("->I_", "->I "))
        for i, n in enumerate(names):
            seeds = [100 * r[key] for r in report["runs"] if r["arm"] == n and key in r]
            ax_r1.scatter([x[i]] * len(seeds), seeds, s=9, color="black", zorder=3)
    ax_r1.set(title="held-out retrieval: mean +- std over seeds (dots: seeds)", ylabel="R@1 (%)",
              xticks=range(len(names)), xticklabels=names)
    ax_r1.legend(fontsize=8)
    for arm, arm_histories in histories.items():
        steps = [h["step"] for h in arm_histories[0]]
        curves = np.array([[h["contrastive_loss"] for h in hist[:len(steps)]] for hist in arm_histories])
        line, = ax_loss.plot(steps, curves.mean(axis=0), label=arm)
        if len(curves) > 1:
            ax_loss.fill_between(steps, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.2)
    ax_loss.set(title="contrastive loss from the parent (band: seeds' range)", xlabel="step", ylabel="loss")
    ax_loss.legend(fontsize=8)
    last = histories["clip-up"][0][-1]
    layers = sorted({k.rsplit("/expert_load/", 1)[0] for k in last if "/expert_load/" in k})
    width = 0.8 / max(len(layers), 1)
    num_experts = 0
    for j, layer in enumerate(layers):
        loads = [last[k] for k in sorted((k for k in last if k.startswith(layer + "/expert_load/")),
                                         key=lambda k: int(k.rsplit("/", 1)[1]))]
        num_experts = len(loads)
        ax_load.bar([e + j * width for e in range(len(loads))], loads, width,
                    label=layer.removeprefix("moe/").replace("/encoder/blocks/", " block ").removesuffix("/mlp"))
    ax_load.set(title="CLIP-UP expert load at the last step (first seed)", xlabel="expert",
                ylabel="fraction of assignments", xticks=[e + width * (len(layers) - 1) / 2 for e in range(num_experts)],
                xticklabels=range(num_experts))
    ax_load.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _demo(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    workdir, pretrain_steps, arm_steps, seeds, seed = args.workdir, args.pretrain_steps, args.arm_steps, args.seeds, \
        args.seed
    if pretrain_steps < 1 or arm_steps < 1:
        raise ValueError(f"--pretrain-steps {pretrain_steps} / --arm-steps {arm_steps}: both must be >= 1")
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: at least 1 (3 or more for a confidence interval worth reading)")
    if seed < 0:
        raise ValueError(f"--seed {seed}: must be >= 0")
    if args.species < 0:
        raise ValueError(f"--species {args.species}: must be >= 0")
    if args.eval_size < 2:
        raise ValueError(f"--eval-size {args.eval_size}: at least 2 held-out pictures")
    try:  # the world's own rule for its options, before anything is written
        make_source("eval", world=args.world, size=args.eval_size, species=args.species)
    except ValueError as e:
        raise ValueError(f"--world {args.world} --species {args.species}: {e}") from None
    if args.world == "catalogue" and args.eval_size > args.species:
        raise ValueError(f"--eval-size {args.eval_size} > --species {args.species}: in the catalogue world each "
                         "held-out picture shows another species, so at most one per species")
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir}: exists and is not a directory")
    if workdir.exists():
        if not args.force and any(workdir.iterdir()):
            raise ValueError(f"{workdir}: exists and is not empty (pass --force to start over)")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    from clipup_jax.models.flops import equal_flops_steps
    from clipup_jax.train.recipes import DEMO_MODEL, DEMO_PLAN, demo_config, sparse
    from clipup_jax.train.run import run_experiment, use_compile_cache
    from clipup_jax.train.sweep_report import Run, build_report

    use_compile_cache(workdir)

    _step(f"1/3 pre-train the dense parent for {pretrain_steps} steps on generated image-caption pairs (seed {seed})")
    parent_config = demo_config()
    parent_config.seed = seed
    _set_world(parent_config, args)
    parent_config.total_steps = pretrain_steps
    parent_config.eval_every = max(1, pretrain_steps // PARENT_EVALS)
    parent_config.checkpoint_every = pretrain_steps
    parent_curve = _parent_curve(run_experiment(parent_config, workdir / "parent"))
    print(_parent_line(parent_curve), flush=True)
    parent = workdir / "parent"
    runs = [Run("parent", seed, parent, parent_config)]

    models = {"dense": DEMO_MODEL, "dense-equal-flops": DEMO_MODEL, "clip-up": sparse(DEMO_MODEL, DEMO_PLAN)}
    steps = {"dense": arm_steps, "dense-equal-flops": equal_flops_steps(models["clip-up"], arm_steps),
             "clip-up": arm_steps}
    plan = [(arm_seed, arm) for arm_seed in range(seed + 1, seed + 1 + seeds) for arm in ARMS]
    histories: dict[str, list[list[dict[str, Any]]]] = {arm: [] for arm in ARMS}
    configs = {"parent": parent_config}
    arms_start = time.perf_counter()
    for i, (arm_seed, arm) in enumerate(plan):
        eta = "" if i == 0 else f", ETA {(time.perf_counter() - arms_start) / i * (len(plan) - i) / 60:.1f} min"
        _step(f"2/3 run {i + 1} of {len(plan)}: continue {arm} for {steps[arm]} steps from the parent, "
              f"seed {arm_seed}{eta}")
        configs[arm] = config = _arm_config(models[arm], parent, steps[arm], arm_seed, args)
        runs.append(Run(arm, arm_seed, workdir / arm / f"seed_{arm_seed}", config))
        histories[arm].append(run_experiment(config, runs[-1].workdir)["train"])

    report = build_report(runs, COMPARISONS)
    for arm, config in configs.items():
        report["arms"][arm].update(_model_summary(config))
    _step(f"3/3 results over {seeds} seed{'s' if seeds > 1 else ''} (held-out generated pictures, in %)")
    print(_table(report))
    results = {"seed": seed, "seeds": seeds, "pretrain_steps": pretrain_steps, "arm_steps": arm_steps,
               "world": args.world, "eval_size": args.eval_size, "species": args.species, "parent": parent_curve,
               **report}
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _figure(report, parent_curve, histories, workdir / "results.png")
    print(f"\n{_parent_line(parent_curve)}\n{_verdict(report)}")
    print(f"wrote {workdir / 'results.json'} and {workdir / 'results.png'} in {time.perf_counter() - t0:.0f}s")


def main(argv: list[str] | None = None) -> None:
    from clipup_jax.train.recipes import DEMO_ARM_STEPS, DEMO_PARENT_STEPS, demo_config

    parser = Parser(prog="clipup-demo", description=__doc__)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("out/demo"))
    parser.add_argument("--force", action="store_true", help="replace a non-empty --workdir")
    parser.add_argument("--pretrain-steps", type=int, default=DEMO_PARENT_STEPS)
    parser.add_argument("--arm-steps", type=int, default=DEMO_ARM_STEPS)
    parser.add_argument("--seeds", type=int, default=3, help="runs of each arm from the one parent (paired by seed)")
    parser.add_argument("--seed", type=int, default=0, help="shifts every seed: the parent's and the arms'")
    parser.add_argument("--eval-size", type=int, default=demo_config().data.eval_size,
                        help="held-out pictures every run is evaluated on (catalogue: at most --species)")
    parser.add_argument("--world", choices=WORLDS, default=demo_config().data.synthetic_world,
                        help="the generated data set: a catalogue of named species, or compositional scenes")
    parser.add_argument("--species", type=int, default=None,
                        help="made-up species: the whole catalogue in the catalogue world (default "
                             f"{demo_config().data.synthetic_species}), a long tail in the scenes (default none)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.species is None:  # the demo's own number of species belongs to its own world
        defaults = demo_config().data
        args.species = defaults.synthetic_species if args.world == defaults.synthetic_world else 0
    run_cli("clipup-demo", lambda: _demo(args))


if __name__ == "__main__":
    main()
