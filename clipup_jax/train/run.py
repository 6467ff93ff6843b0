"""An experiment config -> data, tokenizer, evaluation and upcycler -> the training loop."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from clipup_jax.checkpoints.format import check_tokenizer_fits, load_checkpoint, read_metadata, tokenizer_path
from clipup_jax.checkpoints.router_init import Calibration
from clipup_jax.checkpoints.upcycle import UpcycleOptions, check_multiplet
from clipup_jax.checkpoints.upcycle import upcycle as upcycle_params
from clipup_jax.config import ModelConfig, model_config
from clipup_jax.data.bpe_trainer import build_tokenizer
from clipup_jax.data.pipeline import caption_corpus, calibration_batch, train_pipeline
from clipup_jax.data.sources import make_source
from clipup_jax.data.tokenizer import Tokenizer
from clipup_jax.evaluate.run import EvalData, eval_data, evaluate
from clipup_jax.storage import Path, PathLike, as_path, is_remote
from clipup_jax.train import lease
from clipup_jax.train.trainer import train

SYNTHETIC_IMAGE_SIZE = 64  # generated resolution; the pipeline resizes to the model's
TOKENIZER_TEXTS = 5000  # records whose captions train the tokenizer when config.data.tokenizer is ""


def use_compile_cache(directory: Path) -> None:
    """Runs of one program (an arm's seeds) compile it once: XLA's cache in `directory`, unless the user
    configured a cache of their own or `directory` is on a bucket (a per-run object store is no place for it)."""
    if not jax.config.jax_compilation_cache_dir and not is_remote(directory):
        jax.config.update("jax_compilation_cache_dir", str(directory / "xla_cache"))


def tokenizer_for(config: ml_collections.ConfigDict, workdir: Path, train_source: Any) -> Path:
    """The configured tokenizer; else the init checkpoint's (the ids its token embeddings were trained on); else
    one trained on the captions of the run's own training data (kept in the workdir, reused on resume)."""
    if config.data.tokenizer:
        return as_path(config.data.tokenizer)
    if config.init.checkpoint:
        checkpoint = as_path(config.init.checkpoint)
        own = tokenizer_path(checkpoint, read_metadata(checkpoint)[0])
        if own is not None:
            return own
    directory = workdir / "tokenizer_trained"
    if jax.process_index() == 0 and not (directory / "merges.txt").exists():
        corpus = caption_corpus(train_source, TOKENIZER_TEXTS)
        build_tokenizer(directory, corpus, num_merges=config.model.text.vocab_size - 514)  # 512 bytes + SOT/EOT
    if jax.process_count() > 1:  # the others read what process 0 wrote (a shared workdir)
        multihost_utils.sync_global_devices("clipup tokenizer trained")
    return directory


def _source(spec: str, config: ml_collections.ConfigDict, size: int):
    return make_source(spec, synthetic_size=size, synthetic_image_size=SYNTHETIC_IMAGE_SIZE,
                       synthetic_seed=config.data.synthetic_seed, synthetic_species=config.data.synthetic_species,
                       synthetic_world=config.data.synthetic_world)


def train_source(config: ml_collections.ConfigDict) -> Any:
    """The training data a config names (opened: a bad path fails here)."""
    return _source(config.data.train, config, config.data.synthetic_size)


def eval_data_for(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> EvalData:
    """The eval data a config names (the synthetic eval split is generated at `config.data.eval_size`)."""
    return eval_data(_source(config.data.eval, config, config.data.eval_size), tokenizer, config.data.eval_size,
                     config.data.zero_shot, config.data.get("eval_resize", "shortest"))  # configs saved before it


def run_experiment(config: ml_collections.ConfigDict, workdir: PathLike) -> dict[str, Any]:
    workdir = as_path(workdir)
    cfg = model_config(config)
    source = train_source(config)  # a bad path fails here:
    workdir.mkdir(parents=True, exist_ok=True)  # before anything is written
    with lease.hold(workdir, enabled=jax.process_index() == 0):  # before anything is written in it
        return _run(config, workdir, cfg, source)


def _run(config: ml_collections.ConfigDict, workdir: Path, cfg: ModelConfig, source: Any) -> dict[str, Any]:
    tokenizer_file = tokenizer_for(config, workdir, source)
    tokenizer = Tokenizer.from_path(tokenizer_file)
    check_tokenizer_fits(tokenizer_file, tokenizer.vocab_size, cfg)

    def data(model_cfg: ModelConfig, process_index: int, process_count: int):
        pipeline = train_pipeline(
            source, tokenizer=tokenizer, image_size=model_cfg.vision.image_size,
            context_length=model_cfg.text.context_length, batch_size=config.batch_size // process_count,
            seed=config.seed, process_index=process_index, process_count=process_count,
            num_workers=config.data.num_workers)
        return iter(pipeline)

    evaluate_fn = None
    if config.data.eval and config.eval_every:
        eval_data = eval_data_for(config, tokenizer)
        evaluate_fn = lambda model, step: evaluate(model, eval_data, config.eval_batch_size)  # noqa: E731

    def upcycle(params: dict[str, np.ndarray], dense: ModelConfig, sparse: ModelConfig, seed: int):
        """Experts = copies of the dense MLPs (optionally noised / drop-upcycled, or from a multiplet of
        checkpoints), routers random or from clusters of the training data (config.upcycle)."""
        towers = sparse.moe_towers
        plans = {getattr(sparse, field).moe for field in ("vision", "text")} - {None}
        if len(plans) != 1:
            raise ValueError("upcycling from config.init.checkpoint needs one MoE plan shared by the sparse towers")
        settings = config.upcycle
        opts = UpcycleOptions(plan=plans.pop(), towers=towers, expert_noise=settings.expert_noise,
                              drop_upcycling=settings.drop_upcycling, seed=seed, router_init=settings.router_init,
                              shared_from=settings.shared_from)
        opts.validate()  # a bad name fails before any data is read
        calibration = None
        if opts.router_init == "kmeans":
            calibration = Calibration(*calibration_batch(
                source, tokenizer=tokenizer, image_size=dense.vision.image_size,
                context_length=dense.text.context_length, size=settings.calibration_size))
        multiplet = []
        for path in (p.strip() for p in settings.multiplet.split(",") if p.strip()):
            check_multiplet(dense, read_metadata(path)[1], f"config.upcycle.multiplet: {path}")
            multiplet.append(load_checkpoint(path, opt_state=False).params)
        up = upcycle_params(dense, params, opts, source=str(config.init.checkpoint), calibration=calibration,
                            multiplet=multiplet)
        if jax.process_index() == 0:
            how = f"router init {opts.router_init}" + (f" on {len(calibration.pixels)} calibration examples"
                                                       if calibration is not None else "")
            if multiplet:
                how += f", experts from {1 + len(multiplet)} checkpoints (the rest: {opts.shared_from})"
            print(f"upcycled {config.init.checkpoint}: {opts.plan.num_experts} experts top-{opts.plan.top_k} in "
                  f"{' and '.join(towers)}, {how}", flush=True)
        if up.config != sparse:
            raise ValueError(f"{config.init.checkpoint}: upcycling it gives a model config other than config.model")
        return up.host_params()

    return train(config, workdir, data=data, tokenizer=tokenizer_file, evaluate=evaluate_fn, upcycle=upcycle)
