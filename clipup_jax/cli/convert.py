"""clipup-convert: import dense CLIPs from other ecosystems, upcycle them to sparse MoE CLIPs, inspect checkpoints,
export dense ones back to Hugging Face or open_clip."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from typing import Any, Mapping

from clipup_jax.checkpoints import format as ckpt_format
from clipup_jax.checkpoints.export import FORMATS, export
from clipup_jax.checkpoints.importing import SOURCES, ImportOptions, import_checkpoint
from clipup_jax.models.param_tree import count_params
from clipup_jax.checkpoints.summary import active_params, describe
from clipup_jax.checkpoints.router_init import Calibration
from clipup_jax.checkpoints.upcycle import ROUTER_INITS, SHARED_FROM, UpcycleOptions, upcycle_checkpoint
from clipup_jax.cli.errors import Parser, run_cli
from clipup_jax.config import ACTIVATIONS, PRESETS, ConfigError, MoEPlan
from clipup_jax.data.pipeline import calibration_batch
from clipup_jax.data.sources import make_source
from clipup_jax.data.tokenizer import Tokenizer
from clipup_jax.storage import as_path  # sources and outputs local or gs://
from clipup_jax.train.configs import run_entry

# Upcycling settings, by the name a --config file uses; each also has a flag (`_` -> `-`).
REQUIRED = ("num_experts", "top_k", "moe_layers")
SETTINGS = REQUIRED + ("towers", "router_init_std", "capacity_factor", "eval_capacity_factor", "expert_noise",
                       "drop_upcycling", "seed", "optimizer_state", "router_init", "shared_from")
# A --config file may also set any other MoE plan field (dispatch, router, aux-loss weights, ...).
PLAN_FIELDS = tuple(f.name for f in dataclasses.fields(MoEPlan) if f.name != "layers")


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="clipup-convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import a dense CLIP into a clipup checkpoint directory")
    imp.add_argument("--from", dest="source", required=True, choices=SOURCES, help="layout of SRC")
    imp.add_argument("src", type=as_path, help="weights file (openai/open_clip/big_vision) or HF model directory")
    imp.add_argument("--out", type=as_path, required=True, help="checkpoint directory to create")
    imp.add_argument("--model", choices=sorted(PRESETS), help="preset whose sizes the file must match (gives head counts)")
    imp.add_argument("--tokenizer", type=as_path,
                     help="bpe_simple_vocab_16e6.txt.gz or an HF tokenizer directory, stored in the checkpoint")
    imp.add_argument("--activation", choices=ACTIVATIONS, help="MLP activation when the source cannot say")
    imp.add_argument("--ln-eps", type=float, help="LayerNorm epsilon when the source cannot say")
    imp.add_argument("--force", action="store_true", help="replace an existing --out")
    exp = sub.add_parser("export", help="write a dense checkpoint as a Hugging Face or open_clip model directory")
    exp.add_argument("checkpoint", type=as_path, help="a clipup checkpoint dir or training workdir")
    exp.add_argument("--to", choices=FORMATS, required=True,
                     help="the format: hf (transformers CLIPModel) or open_clip (its hub layout)")
    exp.add_argument("--out", type=as_path, required=True)
    exp.add_argument("--force", action="store_true", help="replace an existing --out")
    ins = sub.add_parser("inspect", help="print a checkpoint's config, parameter counts and FLOPs")
    ins.add_argument("checkpoint", type=as_path)
    up = sub.add_parser("upcycle", help="turn a dense checkpoint into a sparse MoE one whose experts copy its MLPs")
    up.add_argument("dense", type=as_path, metavar="DENSE_DIR")
    up.add_argument("--out", type=as_path, required=True, metavar="SPARSE_DIR",
                    help="checkpoint directory to create")
    up.add_argument("--config", type=pathlib.Path, metavar="FILE.py",
                    help="a file whose get_config() returns an ml_collections.ConfigDict of the settings below "
                         "(and any other MoE plan field); replaces the upcycling flags")
    up.add_argument("--num-experts", type=int, metavar="E", help="experts per MoE layer (required unless --config)")
    up.add_argument("--top-k", type=int, metavar="K", help="experts per token (required unless --config)")
    up.add_argument("--moe-layers", metavar="LAYERS",
                    help="every_2, last_N, or block indices i,j,... (required unless --config)")
    up.add_argument("--towers", metavar="TOWERS", help="towers to upcycle: vision,text (default both)")
    up.add_argument("--router-init-std", type=float, metavar="S",
                    help="std of the new routers' normal init (default 0.02)")
    up.add_argument("--capacity-factor", metavar="C", help="training capacity factor, or none (dropless); default 1.25")
    up.add_argument("--eval-capacity-factor", metavar="C", help="eval capacity factor, or none (dropless); default 2")
    up.add_argument("--expert-noise", type=float, metavar="S",
                    help="std of noise added to each expert's kernels (default 0)")
    up.add_argument("--drop-upcycling", type=float, metavar="R",
                    help="fraction of each expert's hidden units re-initialised (default 0)")
    up.add_argument("--seed", type=int, metavar="N",
                    help="seed of the router init, noise and drop-upcycling (default 0)")
    up.add_argument("--no-optimizer-state", dest="optimizer_state", action="store_false", default=None,
                    help="do not carry the dense checkpoint's Adam moments over")
    up.add_argument("--router-init", choices=ROUTER_INITS,
                    help="normal (default), or kmeans: each router from clusters of its layer's inputs on "
                         "--calibration-data")
    up.add_argument("--calibration-data", metavar="SOURCE",
                    help="data source of the calibration batch, as config.data.train names one (e.g. tsv:FILE)")
    up.add_argument("--calibration-size", type=int, default=64, metavar="N",
                    help="examples in the calibration batch (default 64)")
    up.add_argument("--multiplet", metavar="DIR,DIR,...",
                    help="further dense checkpoints of DENSE_DIR's architecture: expert e's MLP from checkpoint "
                         "e mod n (DENSE_DIR first); not function-preserving")
    up.add_argument("--shared-from", choices=SHARED_FROM,
                    help="with --multiplet: the other parameters from the first checkpoint (default) or averaged")
    up.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser


def _import(args: argparse.Namespace) -> None:
    opts = ImportOptions(model=args.model, tokenizer=args.tokenizer, activation=args.activation, ln_eps=args.ln_eps)
    imported = import_checkpoint(args.source, args.src, args.out, opts, force=args.force)
    for note in imported.notes:
        print(f"note: {note}")
    print(f"wrote {args.out} ({count_params(imported.params) / 1e6:.2f}M params, "
          f"activation {imported.config.activation}, ln_eps {imported.config.ln_eps:g}, "
          f"tokenizer {'stored' if imported.tokenizer else 'none'})")


def _export(args: argparse.Namespace) -> None:
    files = export(ckpt_format.load_checkpoint(args.checkpoint, opt_state=False), args.out, args.to,
                   force=args.force)
    how = {"hf": "transformers.CLIPModel.from_pretrained(DIR)", "open_clip": "open_clip.create_model('local-dir:DIR')"}
    print(f"wrote {args.out} ({', '.join(files)}): load it with {how[args.to]}")


def _inspect(args: argparse.Namespace) -> None:
    print(describe(ckpt_format.load_checkpoint(args.checkpoint, opt_state=False)))


def _upcycle(args: argparse.Namespace) -> None:
    flags = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    if args.config is not None:
        if flags:
            raise ValueError(f"--config replaces the upcycling flags; drop {', '.join(_flag(n) for n in flags)}")
        settings = _load_config_file(args.config)
    else:
        settings = flags
    opts = _options(settings, f"{args.config}" if args.config is not None else "flags")
    multiplet = [p.strip() for p in (args.multiplet or "").split(",") if p.strip()]
    if opts.shared_from != "first" and not multiplet:
        raise ValueError("--shared-from applies to --multiplet checkpoints; none given")
    up = upcycle_checkpoint(args.dense, args.out, opts, force=args.force,
                            calibration=_calibration(args, opts), multiplet=multiplet)
    cfg = up.config
    if opts.plan.eval_capacity_factor is not None:
        print(f"note: eval capacity factor {opts.plan.eval_capacity_factor:g} can drop tokens; with "
              "--eval-capacity-factor none the upcycled model computes exactly what the dense one does")
    print(f"wrote {args.out} ({count_params(up.params) / 1e6:.2f}M params, "
          f"{active_params(cfg, up.params) / 1e6:.2f}M active per token; {opts.plan.num_experts} experts "
          f"top-{opts.plan.top_k} in {' and '.join(opts.towers)}; Adam moments "
          f"{'tiled' if up.opt_state is not None else 'none'})")


def _calibration(args: argparse.Namespace, opts: UpcycleOptions) -> Calibration | None:
    """The calibration batch of --router-init kmeans: --calibration-data through the dense checkpoint's own
    tokenizer and eval preprocessing."""
    if opts.router_init != "kmeans":
        if args.calibration_data is not None:
            raise ValueError("--calibration-data is read only with --router-init kmeans")
        return None
    if args.calibration_data is None:
        raise ValueError("--router-init kmeans needs --calibration-data SOURCE (image-text pairs to cluster)")
    metadata, cfg = ckpt_format.read_metadata(args.dense)
    tokenizer = ckpt_format.tokenizer_path(args.dense, metadata)
    if tokenizer is None:
        raise ValueError(f"{args.dense}: has no tokenizer to read --calibration-data with; import it with --tokenizer")
    from clipup_jax.train.run import SYNTHETIC_IMAGE_SIZE  # deferred: the trainer is heavy to import

    source = make_source(args.calibration_data, synthetic_size=args.calibration_size,
                         synthetic_image_size=SYNTHETIC_IMAGE_SIZE)
    pixels, tokens = calibration_batch(source, tokenizer=Tokenizer.from_path(tokenizer),
                                       image_size=cfg.vision.image_size, context_length=cfg.text.context_length,
                                       size=args.calibration_size)
    return Calibration(pixels, tokens)


def _options(settings: Mapping[str, Any], where: str) -> UpcycleOptions:
    """Options from settings named as in SETTINGS / PLAN_FIELDS; capacity factors accept 'none'."""
    unknown = sorted(set(settings) - set(SETTINGS) - set(PLAN_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown upcycling setting(s) {unknown}; "
                          f"known: {sorted(set(SETTINGS + PLAN_FIELDS))}")
    missing = [n for n in REQUIRED if settings.get(n) is None]
    if missing:
        raise ConfigError(f"{where}: {', '.join(_flag(n) for n in missing)} required (or pass --config FILE.py)")
    plan = {k: v for k, v in settings.items() if k in PLAN_FIELDS}
    for name in ("capacity_factor", "eval_capacity_factor"):
        if name in plan:
            plan[name] = _capacity(plan[name], name)
    layers = settings["moe_layers"]
    if isinstance(layers, str) and not layers.startswith(("every_", "last_")):
        layers = layers.split(",")
    if not isinstance(layers, str):
        try:
            layers = tuple(int(i) for i in layers)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: moe_layers={settings['moe_layers']!r}: expected every_2, last_N or "
                              "block indices i,j,...") from None
    extra = {k: settings[k] for k in ("expert_noise", "drop_upcycling", "seed", "optimizer_state", "router_init",
                                      "shared_from") if k in settings}
    if "towers" in settings:
        towers = settings["towers"]
        extra["towers"] = tuple(t.strip() for t in (towers.split(",") if isinstance(towers, str) else towers))
    return UpcycleOptions(plan=MoEPlan(layers=layers, **plan), **extra)


def _capacity(value: Any, name: str) -> float | None:
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{_flag(name)} {value!r}: expected a number or none (dropless)") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _load_config_file(path: pathlib.Path) -> dict[str, Any]:
    """Runs exactly the file the user named and returns its get_config() as a dict."""
    if path.suffix != ".py":
        raise ValueError(f"{path}: --config needs a .py file with get_config()")
    _, config = run_entry(path, "upcycling config", "get_config")
    config = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(config, Mapping):
        raise ValueError(f"{path}: get_config() must return an ml_collections.ConfigDict, got {type(config).__name__}")
    return dict(config)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    commands = {"import": _import, "inspect": _inspect, "upcycle": _upcycle, "export": _export}
    run_cli("clipup-convert", lambda: commands[args.command](args))


if __name__ == "__main__":
    main()
