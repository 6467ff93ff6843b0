"""Reports over seeds: every (arm, seed) run read back from its workdir, aggregated over seeds, arms compared by
seed (a sweep's arms against its baseline; the demo's CLIP-UP against both dense arms), written as `report.md`,
`report.json` and `report.png`.

Only finished runs (their last eval at their last step) enter the statistics; every other run is listed with its
state, never dropped. Arms evaluated on different data cannot be compared: that is an error, before anything is
written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import ml_collections

from clipup_jax.evaluate.stats import CONFIDENCE, Interval, mean_interval, paired_interval, summarize
from clipup_jax.models.flops import train_flops
from clipup_jax.storage import Path
from clipup_jax.train.metrics_log import read_history
from clipup_jax.config import model_config

METRICS = ("text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "image_to_text_R@1",
           "image_to_text_R@5", "image_to_text_R@10", "zero_shot_top1")
HEADLINE = ("text_to_image_R@1", "image_to_text_R@1")
INTERVAL = f"{100 * CONFIDENCE:.0f} % Student t interval (over seeds; differences paired by seed)"


@dataclasses.dataclass(frozen=True)
class Run:
    """One (arm, seed) of a sweep: where it trains and the config it trains with."""

    arm: str
    seed: int
    workdir: Path
    config: ml_collections.ConfigDict


def eval_set(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a run is evaluated on: runs compared in one report must agree on it."""
    spec = str(config.data.eval)
    return {"eval": spec, "eval_size": int(config.data.eval_size),
            **({"synthetic_seed": int(config.data.synthetic_seed),
                "synthetic_species": int(config.data.get("synthetic_species", 0)),
                "synthetic_world": str(config.data.get("synthetic_world", "scenes"))} if spec.startswith("synthetic")
               else {})}


def _train_time_s(train: list[dict[str, float]]) -> float:
    """Seconds of training from the logged step times (compile and the first log interval excluded)."""
    total, previous = 0.0, None
    for record in train:
        if previous is not None and "step_time_s" in record:
            total += (record["step"] - previous) * record["step_time_s"]
        previous = record["step"]
    return total


def read_run(run: Run) -> dict[str, Any]:
    """The run's record: its state ("finished", "unfinished at step N", "not started") and, when finished, its
    final eval metrics (fractions), training FLOPs and time."""
    record = {"arm": run.arm, "seed": run.seed, "workdir": str(run.workdir), "steps": int(run.config.total_steps),
              "train_flops": train_flops(model_config(run.config), run.config.batch_size, run.config.total_steps)}
    if not (run.workdir / "metrics.jsonl").is_file():
        return {**record, "state": "not started"}
    history = read_history(run.workdir)
    last_step = max((r["step"] for r in history["train"]), default=0)
    evals = [e for e in history["eval"] if e["step"] == run.config.total_steps]
    if last_step < run.config.total_steps:
        return {**record, "state": f"unfinished at step {last_step}"}
    if not evals:
        return {**record, "state": "trained, but no eval at its last step (config.data.eval / eval_every)"}
    return {**record, "state": "finished", "train_time_s": _train_time_s(history["train"]),
            **{k: evals[-1][k] for k in METRICS if k in evals[-1]}}


def _interval(i: Interval) -> dict[str, float]:
    return {"mean": i.mean, "low": i.low, "high": i.high, "n": i.n}


def _spread(values: list[float], what: str) -> dict[str, float]:
    """Mean, std over seeds and the mean's t interval."""
    return {**_interval(mean_interval(values, what=what)), "std": summarize(values, what).std}


def check_comparable(runs: Sequence[Run], comparisons: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The one eval set all arms share (else a one-line error), checked from the configs alone: a sweep asks
    before it trains."""
    arms = list(dict.fromkeys(r.arm for r in runs))
    for pair in comparisons:
        if not set(pair) <= set(arms):
            raise ValueError(f"comparison {pair[0]!r} - {pair[1]!r}: not arms of this report {arms}")
    sets = {arm: eval_set(next(r.config for r in runs if r.arm == arm)) for arm in arms}
    other = next((a for a in arms if sets[a] != sets[arms[0]]), None)
    if other is not None:
        raise ValueError(f"report: arms are evaluated on different eval sets ({arms[0]!r}: {sets[arms[0]]}, "
                         f"{other!r}: {sets[other]}); their metrics cannot be compared")
    return sets[arms[0]]


def build_report(runs: Sequence[Run], comparisons: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Per arm the t interval of each metric's mean; per (treatment, control) the paired t interval of their
    difference over the seeds both finished."""
    arms = list(dict.fromkeys(r.arm for r in runs))
    common_eval_set = check_comparable(runs, comparisons)
    records = [read_run(r) for r in runs]
    finished = {arm: {r["seed"]: r for r in records if r["arm"] == arm and r["state"] == "finished"} for arm in arms}
    summary = {}
    for arm in arms:
        done = [finished[arm][s] for s in sorted(finished[arm])]
        first = next(r for r in records if r["arm"] == arm)
        row: dict[str, Any] = {"seeds": sorted(r.seed for r in runs if r.arm == arm),
                               "seeds_finished": [r["seed"] for r in done], "steps": first["steps"],
                               "train_flops": first["train_flops"]}
        if done:
            row["train_time_s"] = sum(r["train_time_s"] for r in done) / len(done)
            row["metrics"] = {k: _spread([r[k] for r in done], f"{arm} {k}")
                              for k in METRICS if all(k in r for r in done)}
        summary[arm] = row
    differences = {}
    for treatment, control in comparisons:
        common = sorted(set(finished[treatment]) & set(finished[control]))
        a, b = ([finished[arm][s] for s in common] for arm in (treatment, control))
        differences[f"{treatment} - {control}"] = {"seeds": common, "metrics": {
            k: _interval(paired_interval([r[k] for r in a], [r[k] for r in b], what=k))
            for k in METRICS if common and all(k in r for r in a + b)}}
    return {"interval": INTERVAL, "eval_set": common_eval_set, "arms": summary, "differences": differences,
            "not_finished": [{k: r[k] for k in ("arm", "seed", "state", "workdir")} for r in records
                             if r["state"] != "finished"],
            "runs": records}


def _pct(i: dict[str, float] | None, signed: bool = False) -> str:
    if i is None:
        return "n/a"
    mean = f"{100 * i['mean']:+.1f}" if signed else f"{100 * i['mean']:.1f}"
    if math.isnan(i["low"]):
        return f"{mean} (one seed)"
    return f"{mean} [{100 * i['low']:{'+' if signed else ''}.1f}, {100 * i['high']:{'+' if signed else ''}.1f}]"


def markdown(report: dict[str, Any], baseline: str, command: str) -> str:
    lines = ["# Sweep report", "", f"`{command}`", "",
             f"Eval set: `{json.dumps(report['eval_set'])}`. Metrics in %: mean and {report['interval']}; "
             f"differences against the baseline arm `{baseline}`, paired by seed.", "",
             "| arm | seeds | T->I R@1 | I->T R@1 | T->I R@1 vs baseline | I->T R@1 vs baseline | train TFLOP "
             "| train time (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, row in report["arms"].items():
        metrics = row.get("metrics", {})
        diffs = report["differences"].get(f"{arm} - {baseline}", {}).get("metrics", {})
        cells = [_pct(metrics.get(k)) for k in HEADLINE]
        cells += ["baseline" if arm == baseline else _pct(diffs.get(k), signed=True) for k in HEADLINE]
        time_s = f"{row['train_time_s']:.0f}" if "train_time_s" in row else "n/a"
        lines.append(f"| {arm} | {len(row['seeds_finished'])}/{len(row['seeds'])} | " + " | ".join(cells)
                     + f" | {row['train_flops'] / 1e12:.2f} | {time_s} |")
    lines += ["", "## Not finished", ""]
    lines += [f"- `{r['arm']}` seed {r['seed']}: {r['state']} (`{r['workdir']}`)" for r in report["not_finished"]]
    if not report["not_finished"]:
        lines.append("none: every run finished")
    return "\n".join(lines) + "\n"


def figure(report: dict[str, Any], baseline: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(report["arms"])
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(arms) + 4), 4.5))
    for ax, key in zip(axes, HEADLINE):
        for i, arm in enumerate(arms):
            interval = report["arms"][arm].get("metrics", {}).get(key)
            if interval is None:
                continue
            mean = 100 * interval["mean"]
            err = [[mean - 100 * interval["low"]], [100 * interval["high"] - mean]] if interval["n"] > 1 else None
            ax.bar(i, mean, yerr=err, capsize=3, color="tab:orange" if arm == baseline else "tab:blue")
            seeds = [100 * r[key] for r in report["runs"] if r["arm"] == arm and key in r]
            ax.scatter([i] * len(seeds), seeds, s=9, color="black", zorder=3)
        ax.set(title=f"{key} (bars: mean, whiskers: 95 % t interval, dots: seeds)", ylabel="%",
               xticks=range(len(arms)))
        ax.set_xticklabels(arms, rotation=35, ha="right", fontsize=8)
    fig.tight_layout()
    with path.open("wb") as f:  # local or on a bucket
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], baseline: str, workdir: Path, command: str) -> list[Path]:
    paths = [workdir / "report.json", workdir / "report.md", workdir / "report.png"]
    paths[0].write_text(json.dumps({"baseline": baseline, **report}, indent=2) + "\n")
    paths[1].write_text(markdown(report, baseline, command))
    figure(report, baseline, paths[2])
    return paths
