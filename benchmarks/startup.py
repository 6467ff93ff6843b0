"""Start-up of a CLIP-UP run: time to the first step and peak host memory, fresh / upcycle on the fly / resume.

    python -m benchmarks.startup [--blocks 4] [--image-size 224]

Each path is one `clipup-train` child on 8 simulated CPU devices with an expert axis of 8: CLIP-UP at ViT-B/16
widths (8 experts, top-2, every other block of both towers; `--blocks` blocks per tower, what this machine's
memory and minutes allow), batch 8, the embedded data set, no eval:
  fresh    a random init, one step
  upcycle  from a dense checkpoint of the same widths (a dense one-step run, made first and not timed), one step
  resume   the fresh run relaunched to step 2 (restores step 1 straight into the shardings)
The parent samples the child's resident memory (/proc/PID/status VmRSS, every 20 ms) and stamps each line it
prints. On simulated devices the device buffers live in host memory too, so start-up is judged by its
transient: the peak RSS up to the first step's log line against the RSS right after it (1.0 = start-up holds
no copy the run does not keep; the redesign's goal is <= 1.1), and the seconds from launch to that line
(imports and compile included, as a user waits for them). Not part of CI (minutes at 4 blocks).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import soak

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPARSE, DENSE = ROOT / "experiments" / "clipup_b16.py", ROOT / "experiments" / "clip_b16_dense.py"


def _overrides(blocks: int, image_size: int) -> list[str]:
    return [f"--config.model.vision.depth={blocks}", f"--config.model.text.depth={blocks}",
           f"--config.model.vision.image_size={image_size}", "--config.batch_size=8",
           "--config.data.train=synthetic:train", "--config.data.eval=", "--config.data.tokenizer=",
           "--config.data.synthetic_size=64", "--config.data.num_workers=0", "--config.eval_every=0",
           "--config.log_every=1", "--config.checkpoint_every=1", "--config.optim.warmup_steps=1",
           "--config.compute_dtype=float32", "--config.remat=none"]


def run_child(config: pathlib.Path, workdir: pathlib.Path, overrides: list[str], steps: int,
              log: pathlib.Path) -> dict[str, float]:
    """Launches one child; returns seconds to the first step line, peak RSS until then and RSS just after (MiB)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "clipup_jax.cli.train", "--config", str(config), *overrides,
           f"--config.total_steps={steps}", "--workdir", str(workdir)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = soak.rss_mib(proc.pid)
            if rss is not None:
                samples.append((time.perf_counter() - start, rss))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    first = None
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        for line in proc.stdout:
            out.write(line)
            if first is None and line.startswith("[step "):  # this launch's first step (2 on a resume)
                first = time.perf_counter() - start
    code = proc.wait()
    done.set()
    sampler.join()
    if code != 0 or first is None:
        raise RuntimeError(f"child exited {code} {'before its first step ' if first is None else ''}(log: {log})")
    before = [rss for t, rss in samples if t <= first]
    after = [rss for t, rss in samples if t > first]
    return {"first_step_s": first, "peak_mib": max(before), "after_mib": after[0] if after else before[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4, help="blocks per tower (ViT-B/16 has 12)")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    root = pathlib.Path(tempfile.mkdtemp(prefix="clipup-startup-"))
    log = root / "children.log"
    try:
        common = _overrides(args.blocks, args.image_size)
        sparse = [*common, "--config.mesh.expert=8"]
        run_child(DENSE, root / "dense", common, 1, log)  # the dense parent of the upcycle path, same widths
        rows = {
            "fresh": run_child(SPARSE, root / "fresh", sparse, 1, log),
            "upcycle": run_child(SPARSE, root / "upcycle", [*sparse, f"--config.init.checkpoint={root / 'dense'}"], 1,
                                 log),
            "resume": run_child(SPARSE, root / "fresh", sparse, 2, log),
        }
    except RuntimeError as e:
        print(f"{e}\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        kept = ROOT / "out" / "startup_children.log"
        if log.exists():
            kept.parent.mkdir(exist_ok=True)
            shutil.copy(log, kept)
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nCLIP-UP at ViT-B/16 widths, {args.blocks} blocks per tower, {args.image_size} px, 8 simulated devices "
          f"(expert=8), batch 8; children's output in out/startup_children.log")
    print(f"{'path':<10}{'first step (s)':>16}{'peak RSS to it (MiB)':>22}{'RSS after it (MiB)':>20}{'peak / after':>14}")
    for name, r in rows.items():
        print(f"{name:<10}{r['first_step_s']:>16.1f}{r['peak_mib']:>22.0f}{r['after_mib']:>20.0f}"
              f"{r['peak_mib'] / r['after_mib']:>14.2f}")


if __name__ == "__main__":
    main()
