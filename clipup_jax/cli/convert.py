"""clipup-convert: import dense CLIPs from other ecosystems, and inspect checkpoints."""

from __future__ import annotations

import argparse
import pathlib
import sys

from clipup_jax.checkpoints import format as ckpt_format
from clipup_jax.checkpoints.importing import SOURCES, ImportOptions, import_checkpoint
from clipup_jax.checkpoints.params import count_params
from clipup_jax.checkpoints.summary import describe
from clipup_jax.cli.errors import Parser, run_cli
from clipup_jax.config import ACTIVATIONS, PRESETS


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="clipup-convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import a dense CLIP into a clipup checkpoint directory")
    imp.add_argument("--from", dest="source", required=True, choices=SOURCES, help="layout of SRC")
    imp.add_argument("src", type=pathlib.Path, help="weights file (openai/open_clip/big_vision) or HF model directory")
    imp.add_argument("--out", type=pathlib.Path, required=True, help="checkpoint directory to create")
    imp.add_argument("--model", choices=sorted(PRESETS), help="preset whose sizes the file must match (gives head counts)")
    imp.add_argument("--tokenizer", type=pathlib.Path,
                     help="bpe_simple_vocab_16e6.txt.gz or an HF tokenizer directory, stored in the checkpoint")
    imp.add_argument("--activation", choices=ACTIVATIONS, help="MLP activation when the source cannot say")
    imp.add_argument("--ln-eps", type=float, help="LayerNorm epsilon when the source cannot say")
    imp.add_argument("--force", action="store_true", help="replace an existing --out")
    ins = sub.add_parser("inspect", help="print a checkpoint's config, parameter counts and FLOPs")
    ins.add_argument("checkpoint", type=pathlib.Path)
    return parser


def _import(args: argparse.Namespace) -> None:
    opts = ImportOptions(model=args.model, tokenizer=args.tokenizer, activation=args.activation, ln_eps=args.ln_eps)
    imported = import_checkpoint(args.source, args.src, args.out, opts, force=args.force)
    for note in imported.notes:
        print(f"note: {note}")
    print(f"wrote {args.out} ({count_params(imported.params) / 1e6:.2f}M params, "
          f"activation {imported.config.activation}, ln_eps {imported.config.ln_eps:g}, "
          f"tokenizer {'stored' if imported.tokenizer else 'none'})")


def _inspect(args: argparse.Namespace) -> None:
    print(describe(ckpt_format.load_checkpoint(args.checkpoint)))


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    run_cli("clipup-convert", lambda: _import(args) if args.command == "import" else _inspect(args))


if __name__ == "__main__":
    main()
