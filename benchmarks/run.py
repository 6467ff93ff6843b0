"""Runs every benchmark and rewrites benchmarks/RESULTS.md: a header (machine, versions, date, command),
a summary of every goal (measured, met or not, why), then one section per benchmark.

    python -m benchmarks.run [--quick] [--only NAME ...] [--out PATH]

A benchmark joins by exposing `section(quick: bool = False) -> Section` in `benchmarks/NAME.py`.
Each runs in its own child process (`python -m benchmarks.run --child NAME`), so one benchmark's
memory, thread pools and compiled programs cannot tilt the next one's figures, and a failure
costs only its own section. Sections of RESULTS.md that this run did not produce (benchmarks not
selected or failed, opt-in ones, hand-written ones such as the demo) are kept as they are, read
from the file just before it is rewritten, so sections appended meanwhile survive too.

`--quick` runs every benchmark at smoke sizes (minutes, numbers meaningless) and writes to a copy
of RESULTS.md in the temp directory unless `--out` is given: it proves the suite works without
overwriting real figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
# Run by default, in this order (cheap first). Modules that do not exist yet are left out.
DEFAULT = ("tokenizer", "synthetic_data", "data_pipeline", "moe_layer", "expert_loop", "train_step", "peer",
           "scaling", "contrastive_loss", "compile_time", "upcycle", "inference", "storage")
# Only with --only: soak runs ~20 min, host_memory ~15; accelerator is for GPU/TPU hosts (on CPU: smoke mode).
OPT_IN = ("soak", "host_memory", "accelerator")
SUMMARY = "Summary: goals of issue 7"
RESULT_PREFIX = "@@section-json@@ "


@dataclasses.dataclass
class Goal:
    """One target and how this run measured against it; `met` is None for a figure reported without a target,
    and `cause` says why a goal is missed."""

    goal: str
    measured: str
    met: bool | None
    cause: str = ""


@dataclasses.dataclass
class Section:
    """A benchmark's `## title` section of RESULTS.md, its goals, and values other goals need (`cross_goals`)."""

    title: str
    body: str
    goals: list[Goal] = dataclasses.field(default_factory=list)
    values: dict[str, float] = dataclasses.field(default_factory=dict)

    def markdown(self) -> str:
        return f"## {self.title}\n\n{self.body.strip()}\n"

    @classmethod
    def from_json(cls, text: str) -> "Section":
        data = json.loads(text)
        return cls(data["title"], data["body"], [Goal(**g) for g in data["goals"]], data["values"])


def has_section(name: str) -> bool:
    """`benchmarks/NAME.py` exists and defines `section` (read, not imported: imports cost seconds)."""
    spec = importlib.util.find_spec(f"benchmarks.{name}")
    return spec is not None and re.search(r"^def section\(", pathlib.Path(spec.origin).read_text(), re.M) is not None


def _child(name: str, quick: bool) -> None:
    """In the child process: run one benchmark, print its Section as one JSON line."""
    module = importlib.import_module(f"benchmarks.{name}")
    section = module.section(quick=quick)
    print(section.markdown(), flush=True)
    print(RESULT_PREFIX + json.dumps(dataclasses.asdict(section)), flush=True)


@dataclasses.dataclass
class Outcome:
    name: str
    seconds: float
    section: Section | None
    error: str = ""


def run_one(name: str, quick: bool) -> Outcome:
    """One benchmark in a child process; its output streams through, its Section comes back as JSON."""
    if not has_section(name):
        return Outcome(name, 0.0, None, f"benchmarks/{name}.py is missing or has no `section(quick)`")
    argv = [sys.executable, "-m", "benchmarks.run", "--child", name] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=pathlib.Path(__file__).resolve().parents[1])
    section, tail = None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(RESULT_PREFIX):
            section = Section.from_json(line[len(RESULT_PREFIX):])
            continue
        sys.stdout.write(f"  [{name}] {line}")
        tail = (tail + [line.rstrip()])[-5:]
    code = proc.wait()
    seconds = time.perf_counter() - t0
    if code != 0 or section is None:
        return Outcome(name, seconds, None, f"exit code {code}: {' / '.join(tail)[-400:]}")
    return Outcome(name, seconds, section)


def cross_goals(sections: dict[str, Section]) -> dict[str, list[Goal]]:
    """Goals that compare two benchmarks: the input pipeline against the train step's consumption."""
    pipe, step = sections.get("data_pipeline"), sections.get("train_step")
    if pipe is None or step is None:
        return {}
    supply, demand = pipe.values["train_examples_per_s"], step.values["dense_examples_per_s"]
    cause = "" if supply >= demand else "the pipeline and the step share this machine's cores"
    return {"data_pipeline": [Goal("input pipeline (decode, augment, tokenise) >= the dense train step's consumption",
                                   f"{supply:,.0f} vs {demand:,.1f} examples/s ({supply / demand:,.0f}x)",
                                   supply >= demand, cause)]}


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", pathlib.Path("/proc/cpuinfo").read_text(), re.M)
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        mem = int(re.search(r"MemTotal:\s+(\d+)", pathlib.Path("/proc/meminfo").read_text()).group(1)) / 2**20
        memory = f"{mem:.0f} GiB"
    except (OSError, AttributeError):
        memory = "?"
    versions = []
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "torch", "transformers", "tokenizers"):
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": f"{cpu}, {len(os.sched_getaffinity(0))} cores usable ({os.cpu_count()} online), {memory} RAM",
            "os": platform.platform(), "python": platform.python_version(), "versions": ", ".join(versions)}


def split_sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first `## `, [(title, whole section text)]) of a markdown file."""
    parts = re.split(r"(?m)^(?=## )", text)
    head, sections = parts[0], []
    for part in parts[1:]:
        title = part.splitlines()[0][3:].strip()
        sections.append((title, part.rstrip() + "\n"))
    return head, sections


def _summary_rows(section_text: str) -> list[list[str]]:
    rows = []
    for line in section_text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 5 and cells[0] not in ("benchmark", "---"):
            rows.append(cells)
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def render(old: str, outcomes: list[Outcome], extra_goals: dict[str, list[Goal]], header: dict[str, str],
           command: str, quick: bool) -> str:
    """The new RESULTS.md: header, summary (old rows kept for benchmarks not rerun), sections in their old order
    (replaced where rerun), new sections appended."""
    _, old_sections = split_sections(old)
    produced = {o.name: o.section for o in outcomes if o.section is not None}
    rerun = set(produced)
    rows = []
    for o in outcomes:
        if o.section is None:
            continue
        for g in o.section.goals + extra_goals.get(o.name, []):
            status = {True: "met", False: "**not met**", None: "reported"}[g.met]
            rows.append([o.name, _cell(g.goal), _cell(g.measured), status, _cell(g.cause) if g.met is False else ""])
    for title, text in old_sections:
        if title == SUMMARY:
            rows += [r for r in _summary_rows(text) if r[0] not in rerun]
    by_title = {s.title: s for s in produced.values()}
    body, placed = [], set()
    for title, text in old_sections:
        if title == SUMMARY:
            continue
        if title in by_title:
            body.append(by_title[title].markdown())
            placed.add(title)
        else:
            body.append(text)
    body += [s.markdown() for t, s in by_title.items() if t not in placed]
    failed = [o for o in outcomes if o.section is None]
    lines = ["# Benchmark results", "",
             "Figures are ratios measured side by side in one run on the same machine; absolute numbers drift on a "
             "shared box, the ratios hold better. Each section names the command that produced it; "
             "`python -m benchmarks.run` reruns them all and rewrites this file, keeping the sections it did not "
             "produce.", "",
             f"Last run: `{command}` on {header['date']}{' (--quick: smoke sizes, numbers not meaningful)' if quick else ''}"
             f", {header['seconds']}.", "",
             f"- Machine: {header['cpu']}; load average at start {header['load']}", f"- OS: {header['os']}",
             f"- Python {header['python']}; {header['versions']}", "",
             f"## {SUMMARY}", "",
             "Rows from benchmarks not rerun by the last command are kept from the run that produced them.", "",
             "| benchmark | goal | measured | status | cause when missed |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if failed:
        lines += ["", "Not rerun by the last command (their sections below are from earlier runs): "
                  + "; ".join(f"`{o.name}`: {o.error}" for o in failed)]
    return "\n".join(lines) + "\n\n" + "\n".join(body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes; writes to the temp dir unless --out")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"default: {' '.join(DEFAULT)}; opt-in: "
                        f"{' '.join(OPT_IN)}")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="default: benchmarks/RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.quick)
        return 0
    known = DEFAULT + OPT_IN
    unknown = [n for n in args.only or () if n not in known]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(known)}")
    names = list(args.only) if args.only else [n for n in DEFAULT if has_section(n)]
    left_out = [] if args.only else [n for n in DEFAULT if n not in names]
    out = args.out
    if out is None and args.quick:
        out = pathlib.Path(tempfile.gettempdir()) / "clipup-bench-quick" / "RESULTS.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RESULTS, out)
    out = out or RESULTS
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:])
    start, load = time.time(), ", ".join(f"{x:.1f}" for x in os.getloadavg())
    outcomes = []
    for name in names:
        print(f"== {name}", flush=True)
        outcomes.append(run_one(name, args.quick))
        o = outcomes[-1]
        print(f"== {name}: {'ok' if o.section else 'FAILED: ' + o.error} ({o.seconds:.0f} s)", flush=True)
    if left_out:
        print(f"left out (no benchmarks/NAME.py with a `section(quick)`): {', '.join(left_out)}")
    header = dict(machine(), date=datetime.date.today().isoformat(), load=load,
                  seconds=f"{(time.time() - start) / 60:.1f} min in all ("
                  + ", ".join(f"{o.name} {o.seconds:.0f} s" for o in outcomes) + ")")
    sections = {o.name: o.section for o in outcomes if o.section is not None}
    if not sections:
        print(f"nothing measured: {out} left as it was")
        return 1
    old = out.read_text() if out.exists() else ""  # read late: keep sections others appended meanwhile
    out.write_text(render(old, outcomes, cross_goals(sections), header, command, args.quick))
    print(f"wrote {out}")
    return 0 if all(o.section is not None for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
