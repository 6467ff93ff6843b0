"""clipup-demo: CLIP-UP end to end on the embedded synthetic data set, on CPU, in a few minutes.

1. pre-train a tiny dense CLIP (the parent) on generated image-caption pairs, with a BPE tokenizer
   trained on their captions;
2. from the parent's checkpoint, continue two arms for the same number of steps: dense, and
   CLIP-UP (every other block upcycled into a Mixture-of-Experts: experts = copies of the MLP);
3. evaluate the parent and both arms (retrieval R@1/5/10 both ways, zero-shot shape classification);
4. print a table, write `results.json` and `results.png` (loss curves, per-layer expert load).
Whichever arm wins is reported as measured.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import time
from typing import Any

from clipup_jax.cli.errors import Parser, quiet_libraries, run_cli

ARMS = ("dense", "clip-up")
METRICS = ("text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "image_to_text_R@1",
           "image_to_text_R@5", "image_to_text_R@10", "zero_shot_top1")


def _step(message: str) -> None:
    print(f"\n=== {message}", flush=True)


def _arm_config(model, parent: pathlib.Path, tokenizer: pathlib.Path, steps: int):
    from clipup_jax.train.recipes import demo_config

    config = demo_config(model)
    config.seed = 1  # a fresh slice of the data stream for the continuation
    config.init.checkpoint = str(parent)
    config.data.tokenizer = str(tokenizer)
    config.total_steps = steps
    config.optim.lr = 5e-4  # continued training: reduced LR, as upcycling recipes do
    config.optim.warmup_steps = 20
    config.eval_every = steps
    config.checkpoint_every = steps
    config.log_every = 10
    return config


def _summary(config) -> dict[str, Any]:
    from clipup_jax.checkpoints.summary import active_params
    from clipup_jax.models.flops import image_flops, text_flops
    from clipup_jax.models.param_tree import abstract_params, count_params
    from clipup_jax.train.trainer import model_config

    cfg = model_config(config)
    params = abstract_params(cfg)
    return {"total_params": count_params(params), "active_params": active_params(cfg, params),
            "image_mflops": image_flops(cfg) / 1e6, "text_mflops": text_flops(cfg) / 1e6}


def _last_eval(history: dict[str, Any]) -> dict[str, float]:
    return history["eval"][-1] if history["eval"] else {}


def _table(results: dict[str, dict[str, Any]]) -> str:
    columns = [("T->I R@1", "text_to_image_R@1"), ("R@5", "text_to_image_R@5"), ("R@10", "text_to_image_R@10"),
               ("I->T R@1", "image_to_text_R@1"), ("R@5", "image_to_text_R@5"), ("R@10", "image_to_text_R@10"),
               ("0-shot", "zero_shot_top1")]
    lines = [f"{'model':<26}" + "".join(f"{h:>9}" for h, _ in columns)
             + f"{'params':>10}{'active':>10}{'img MFLOPs':>12}{'txt MFLOPs':>12}"]
    for name, r in results.items():
        cells = "".join(f"{100 * r['eval'].get(k, float('nan')):>9.1f}" for _, k in columns)
        lines.append(f"{name:<26}{cells}{r['total_params'] / 1e6:>9.2f}M{r['active_params'] / 1e6:>9.2f}M"
                     f"{r['image_mflops']:>12.2f}{r['text_mflops']:>12.2f}")
    return "\n".join(lines)


def _figure(histories: dict[str, dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, history in histories.items():
        steps = [h["step"] for h in history["train"]]
        ax_loss.plot(steps, [h["contrastive_loss"] for h in history["train"]], label=name)
    ax_loss.set(title="contrastive loss (continued training)", xlabel="step", ylabel="loss")
    ax_loss.legend()
    last = histories["clip-up"]["train"][-1]
    layers = sorted({k.rsplit("/expert_load/", 1)[0] for k in last if "/expert_load/" in k})
    width = 0.8 / max(len(layers), 1)
    for j, layer in enumerate(layers):
        loads = [last[k] for k in sorted((k for k in last if k.startswith(layer + "/expert_load/")),
                                         key=lambda k: int(k.rsplit("/", 1)[1]))]
        ax_load.bar([e + j * width for e in range(len(loads))], loads, width,
                    label=layer.removeprefix("moe/").replace("/encoder/blocks/", " block ").removesuffix("/mlp"))
    ax_load.set(title="CLIP-UP expert load at the last step", xlabel="expert", ylabel="fraction of assignments",
                        xticks=[e + width * (len(layers) - 1) / 2 for e in range(len(loads))], xticklabels=range(len(loads)))
    ax_load.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _demo(workdir: pathlib.Path, force: bool, pretrain_steps: int, arm_steps: int) -> None:
    t0 = time.perf_counter()
    if pretrain_steps < 1 or arm_steps < 1:
        raise ValueError(f"--pretrain-steps {pretrain_steps} / --arm-steps {arm_steps}: both must be >= 1")
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir}: exists and is not a directory")
    if workdir.exists():
        if not force and any(workdir.iterdir()):
            raise ValueError(f"{workdir}: exists and is not empty (pass --force to start over)")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    from clipup_jax.train.recipes import DEMO_MODEL, DEMO_PLAN, demo_config, sparse
    from clipup_jax.train.run import run_experiment

    _step(f"1/3 pre-train the dense parent for {pretrain_steps} steps on generated image-caption pairs")
    parent_config = demo_config()
    parent_config.total_steps = pretrain_steps
    parent_config.eval_every = pretrain_steps
    parent_config.checkpoint_every = pretrain_steps
    parent = run_experiment(parent_config, workdir / "parent")
    tokenizer = workdir / "parent" / "tokenizer"

    histories, results = {}, {"parent (dense)": {"eval": _last_eval(parent), **_summary(parent_config)}}
    arms = {"dense": DEMO_MODEL, "clip-up": sparse(DEMO_MODEL, DEMO_PLAN)}
    for i, (name, model) in enumerate(arms.items()):
        _step(f"2/3 arm {i + 1} of 2: continue {name} for {arm_steps} steps from the parent")
        config = _arm_config(model, workdir / "parent", tokenizer, arm_steps)
        histories[name] = run_experiment(config, workdir / name)
        results[f"{name} (+{arm_steps} steps)"] = {"eval": _last_eval(histories[name]), **_summary(config)}

    _step("3/3 results (retrieval and zero-shot in %, on held-out generated scenes)")
    print(_table(results))
    serialisable = {k: {f: v for f, v in r.items()} for k, r in results.items()}
    (workdir / "results.json").write_text(json.dumps(serialisable, indent=2) + "\n")
    _figure(histories, workdir / "results.png")
    dense_r1 = results[f"dense (+{arm_steps} steps)"]["eval"].get("text_to_image_R@1", 0.0)
    sparse_r1 = results[f"clip-up (+{arm_steps} steps)"]["eval"].get("text_to_image_R@1", 0.0)
    verdict = "CLIP-UP" if sparse_r1 > dense_r1 else "dense" if dense_r1 > sparse_r1 else "neither"
    print(f"\ntext->image R@1: CLIP-UP {100 * sparse_r1:.1f} vs dense {100 * dense_r1:.1f} -> {verdict} wins here")
    print(f"wrote {workdir / 'results.json'} and {workdir / 'results.png'} in {time.perf_counter() - t0:.0f}s")


def main(argv: list[str] | None = None) -> None:
    quiet_libraries()
    parser = Parser(prog="clipup-demo", description=__doc__)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("out/demo"))
    parser.add_argument("--force", action="store_true", help="replace a non-empty --workdir")
    parser.add_argument("--pretrain-steps", type=int, default=500)
    parser.add_argument("--arm-steps", type=int, default=300)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run_cli("clipup-demo", lambda: _demo(args.workdir, args.force, args.pretrain_steps, args.arm_steps))


if __name__ == "__main__":
    main()
