"""Every native ViT config of open_clip 3.3.0 through `clipup-convert import` and `export`, against open_clip.

    python -m benchmarks.open_clip_configs [--only NAME ...]

Each architecture (no timm or HF towers, not CoCa) is built by open_clip's own code from its bundled config with
random weights, depth 2 and a 1,000-token vocabulary (widths, head widths, MLP ratios, image sizes and every flag
kept), saved in the hub layout, imported with `clipup-convert import --from open_clip`, and its features compared
with open_clip's `encode_image` / `encode_text`; then exported with `--to open_clip`, reloaded by open_clip
(`local-dir:`) and compared again. Prints one line per config and the counts. Needs open_clip installed as
`make test` installs it (tests/open_clip_reference.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import tempfile

import jax.numpy as jnp
import numpy as np

from clipup_jax.checkpoints.format import load_checkpoint
from clipup_jax.checkpoints.params import model_from_params
from clipup_jax.cli.convert import main as convert
from tests import open_clip_reference as ref
from tests.numerics import scaled_error

TOLERANCE = 1e-5


def _cli(argv: list[str]) -> str | None:
    """Runs clipup-convert; None on success, else its one-line error."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            convert([str(a) for a in argv])
        except SystemExit as e:
            if e.code:
                return err.getvalue().strip()
    return None


def _worst(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> float:
    return max(scaled_error(g, w) for g, w in zip(got, want))


def check(name: str, cfg: dict, root: pathlib.Path) -> tuple[str, str]:
    """(outcome, detail): 'match' with the feature errors, 'refused' with the message, or 'MISMATCH'."""
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = 2
    cfg["text_cfg"]["vocab_size"] = 1000
    model = ref.build(cfg)
    weights = ref.save_hub(model, cfg, root / "hub", "open_clip_model.safetensors")
    error = _cli(["import", "--from", "open_clip", weights, "--out", root / "ckpt"])
    if error:
        return "refused", error
    pixels, tokens = ref.inputs(cfg, n=3)
    want = ref.features(model, pixels, tokens)
    ckpt = load_checkpoint(root / "ckpt")
    imported = model_from_params(ckpt.config, ckpt.params)
    got = np.asarray(imported.encode_image(jnp.asarray(pixels))), np.asarray(imported.encode_text(jnp.asarray(tokens)))
    error = _cli(["export", "--to", "open_clip", root / "ckpt", "--out", root / "oc"])
    if error:
        return "MISMATCH", f"import {_worst(got, want):.1e}; export refused: {error}"
    back = ref.features(ref.load().create_model(f"local-dir:{root / 'oc'}").eval(), pixels, tokens)
    errors = _worst(got, want), _worst(back, want)
    return ("match" if max(errors) < TOLERANCE else "MISMATCH"), f"import {errors[0]:.1e}, export {errors[1]:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="config names (default: every native ViT config)")
    args = parser.parse_args()
    configs = ref.native_vit_configs()
    names = args.only or sorted(configs)
    counts: dict[str, int] = {}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            outcome, detail = check(name, configs[name], pathlib.Path(tmp))
        counts[outcome] = counts.get(outcome, 0) + 1
        print(f"{name:32s} {outcome:8s} {detail}", flush=True)
    print(f"{len(names)} native ViT configs of open_clip {ref.VERSION}: "
          + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
