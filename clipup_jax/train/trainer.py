"""The training loop, top to bottom in `train`: mesh, state (restore or init), step, loop, periodic actions."""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from clipup_jax.checkpoints.format import FORMAT_VERSION, TOKENIZER_DIR, load_checkpoint, metadata_dict, read_metadata, write_metadata
from clipup_jax.checkpoints.train_workdir import CHECKPOINTS_DIR, SAVED_CONFIG
from clipup_jax.checkpoints.params import assign_params, check_params
from clipup_jax.config import ModelConfig, model_config
from clipup_jax.data.image_ops import check_resize_mode
from clipup_jax.data.tokenizer import source_files
from clipup_jax.models import CLIP
from clipup_jax.models.dispatcher import describe_dispatchers, model_dispatchers
from clipup_jax.parallel import distributed
from clipup_jax.parallel.layout import report_layout
from clipup_jax.parallel.mesh import make_mesh
from clipup_jax.parallel.sharding import batch_spec, data_parallel_size, param_shardings, state_shardings
from clipup_jax.storage import Path, PathLike, as_path
from clipup_jax.train import lease
from clipup_jax.train.checkpointing import SaveFailed, TrainCheckpoints, abstract_like
from clipup_jax.train.metrics_log import MetricsLog, scalar_metrics
from clipup_jax.train.losses import make_contrastive_loss
from clipup_jax.train.optimizer import make_optimizer, schedule as make_schedule, warmup_note
from clipup_jax.train.recipes import SAVE_TIMEOUT_S
from clipup_jax.train.health import NONFINITE_POLICIES, NonFiniteGuard
from clipup_jax.train.step import TrainState, flops_per_step, init_state, make_train_step
from clipup_jax.workarounds import apply as apply_workarounds, release_free_memory

DataFactory = Callable[[ModelConfig, int, int], Iterator[dict[str, np.ndarray]]]
EvalFn = Callable[[CLIP, int], dict[str, float]]


def _dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if config.compute_dtype not in dtypes:
        raise ValueError(f"config.compute_dtype={config.compute_dtype!r}: expected one of {', '.join(dtypes)}")
    return dtypes[config.compute_dtype]


def fresh_model(config: ml_collections.ConfigDict, cfg: ModelConfig) -> CLIP:
    return CLIP(cfg, nnx.Rngs(config.seed, router=config.seed + 1), _dtype(config), remat=config.remat,
                scan=config.scan_layers)


def _init_params(config: ml_collections.ConfigDict, cfg: ModelConfig,
                 upcycle: Callable | None) -> dict[str, np.ndarray] | None:
    """The weights of `config.init.checkpoint` (upcycled when it is dense and the model sparse), checked against
    the model; None for a fresh init."""
    if not config.init.checkpoint:
        return None
    ckpt = load_checkpoint(config.init.checkpoint)
    params = ckpt.params
    _check_init(config, cfg, ckpt.config)
    if cfg.is_sparse and not ckpt.config.is_sparse:
        if upcycle is None:
            raise ValueError("config.init.checkpoint is dense but the model is sparse, and no upcycler was given")
        params = upcycle(params, ckpt.config, cfg, config.seed)
    check_params(params, cfg, str(config.init.checkpoint))
    return params


def _init_train_state(config: ml_collections.ConfigDict, cfg: ModelConfig, tx, mesh, shardings: TrainState,
                      params: dict[str, np.ndarray] | None) -> TrainState:
    """The step-0 state made where it lives: one jit with `out_shardings`, so each device computes only its own
    shards and no host holds the whole state. Given `params`, the random init they replace is dead code that
    XLA drops; they enter as global arrays built shard by shard from the host copy."""

    def init(params: dict[str, jax.Array] | None) -> TrainState:
        model = fresh_model(config, cfg)
        if params is not None:
            assign_params(model, params, cfg, str(config.init.checkpoint))
        return init_state(model, tx)[1]

    if params is not None:
        by_name = param_shardings(cfg, mesh)
        params = {name: jax.make_array_from_callback(value.shape, by_name[name], lambda index, v=value: v[index])
                  for name, value in params.items()}
    return jax.jit(init, out_shardings=shardings)(params)


def _check_init(config: ml_collections.ConfigDict, cfg: ModelConfig, init: ModelConfig) -> None:
    """The init checkpoint's model must be config.model, or its dense parent (then it is upcycled)."""
    dense = cfg.replace(vision=dataclasses.replace(cfg.vision, moe=None), text=dataclasses.replace(cfg.text, moe=None))
    if init != cfg and init != dense:
        if init.is_sparse and not cfg.is_sparse:
            what = "a sparse checkpoint, but config.model is dense"
        else:  # a dense checkpoint must match config.model without its MoE plans; a sparse one, config.model
            differ = (dense if not init.is_sparse else cfg).differences(init)
            what = (f"its model differs from config.model{' without its MoE layers' if not init.is_sparse else ''} "
                    f"in {len(differ)} field(s) (config -> checkpoint): {'; '.join(differ)}")
        raise ValueError(f"config.init.checkpoint={config.init.checkpoint}: {what}; set those config.model fields "
                         "or start from a compatible checkpoint")


def check_config(config: ml_collections.ConfigDict, workdir: PathLike | None = None) -> None:
    """Every check that needs no compile and writes nothing, so a bad config fails at once with one line naming
    the field or file (the CLIs call it before `run_experiment` creates the workdir)."""
    for field in ("total_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        if not isinstance(config[field], int) or config[field] < 1:
            raise ValueError(f"config.{field}={config[field]!r}: must be an integer >= 1")
    if config.get("checkpoint_timeout_s", SAVE_TIMEOUT_S) < 1:
        raise ValueError(f"config.checkpoint_timeout_s={config.checkpoint_timeout_s}: must be >= 1")
    if config.eval_every < 0:
        raise ValueError(f"config.eval_every={config.eval_every}: must be >= 0 (0 = never)")
    if config.nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"config.nonfinite={config.nonfinite!r}: expected one of {', '.join(NONFINITE_POLICIES)}")
    if config.max_nonfinite_skips < 0:
        raise ValueError(f"config.max_nonfinite_skips={config.max_nonfinite_skips}: must be >= 0")
    make_contrastive_loss(config.loss, config.loss_impl)  # validates both names
    make_schedule(config.optim, config.total_steps)  # validates the schedule name
    check_resize_mode(config.data.get("eval_resize", "shortest"))
    _dtype(config)
    cfg = model_config(config)
    mesh = config_mesh(config)
    model_dispatchers(cfg, dict(mesh.shape))  # experts vs the mesh, each dispatch vs its mode
    if config.data.tokenizer and not as_path(config.data.tokenizer).exists():
        raise FileNotFoundError(f"config.data.tokenizer={config.data.tokenizer}: no such file or directory")
    if workdir is not None:
        workdir = as_path(workdir)
        if workdir.exists() and not workdir.is_dir():
            raise ValueError(f"workdir {workdir}: exists and is not a directory")
        if (workdir / CHECKPOINTS_DIR).is_dir():  # resuming: the init checkpoint is not read again
            version = read_metadata(workdir)[0]["format_version"]
            if version != FORMAT_VERSION:
                raise ValueError(f"{workdir}: written in checkpoint format {version}, which this version reads but "
                                 f"does not resume (format {FORMAT_VERSION}); continue from it in a new workdir "
                                 f"with --config.init.checkpoint={workdir}")
            return
    if config.init.checkpoint:
        _check_init(config, cfg, read_metadata(config.init.checkpoint)[1])


def config_mesh(config: ml_collections.ConfigDict):
    mesh = make_mesh(dict(config.mesh), dcn=dict(config.get("dcn_mesh") or {}))  # dcn: multi-slice factors
    data_axes = data_parallel_size(dict(mesh.shape))
    if config.batch_size % data_axes:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the data-parallel devices "
                         f"({data_axes}: mesh {dict(mesh.shape)})")
    return mesh


def batch_shardings(mesh) -> dict[str, NamedSharding]:
    return {"pixels": NamedSharding(mesh, batch_spec(mesh, 4)), "tokens": NamedSharding(mesh, batch_spec(mesh, 2))}


def _jit_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, tx, schedule, shardings, mesh):
    return jax.jit(make_train_step(graphdef, tx, config.loss, schedule, config.loss_impl),
                   in_shardings=(shardings, batch_shardings(mesh)), out_shardings=(shardings, None, None),
                   donate_argnums=0)


def abstract_train_state(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, Any, Any, TrainState]:
    """(graphdef, optimizer, schedule, train state as ShapeDtypeStructs) of `config`, allocating nothing."""
    cfg = model_config(config)
    graphdef, params, _ = nnx.split(nnx.eval_shape(lambda: fresh_model(config, cfg)), nnx.Param, ...)
    tx, schedule = make_optimizer(config.optim, params, config.total_steps)
    return graphdef, tx, schedule, jax.eval_shape(lambda: init_state(fresh_model(config, cfg), tx)[1])


def lower_train_step(config: ml_collections.ConfigDict) -> jax.stages.Lowered:
    """The config's train step traced and lowered on its mesh with abstract state and batch: checks shapes,
    shardings and collectives of a full-size recipe without allocating the model."""
    cfg = model_config(config)
    mesh = config_mesh(config)
    with jax.set_mesh(mesh):
        graphdef, tx, schedule, state = abstract_train_state(config)
        shardings = state_shardings(state, mesh, cfg)
        v, t = cfg.vision, cfg.text
        batch = {"pixels": jax.ShapeDtypeStruct((config.batch_size, v.image_size, v.image_size, 3), jnp.float32),
                 "tokens": jax.ShapeDtypeStruct((config.batch_size, t.context_length), jnp.int32)}
        batch = {k: jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=batch_shardings(mesh)[k]) for k, b in batch.items()}
        return _jit_step(config, graphdef, tx, schedule, shardings, mesh).lower(abstract_like(state, shardings), batch)


def _write_workdir_metadata(workdir: Path, cfg: ModelConfig, tokenizer: PathLike | None,
                            config: ml_collections.ConfigDict) -> None:
    """Makes the workdir self-describing, like a converted checkpoint: config, tokenizer, experiment config."""
    entry = None
    if tokenizer is not None:
        files, tokenizer = source_files(tokenizer), as_path(tokenizer)
        (workdir / TOKENIZER_DIR).mkdir(exist_ok=True)
        for f in files:  # bytes, not a copy: the tokenizer and the workdir may be on different stores
            (workdir / TOKENIZER_DIR / f.name).write_bytes(f.read_bytes())
        entry = TOKENIZER_DIR if tokenizer.is_dir() else f"{TOKENIZER_DIR}/{tokenizer.name}"
    source = {"format": "clipup-train", "init": str(config.init.checkpoint or "")}
    write_metadata(workdir, metadata_dict(cfg, source, entry, "adam"))
    (workdir / SAVED_CONFIG).write_text(config.to_json_best_effort(indent=2) + "\n")


def train(config: ml_collections.ConfigDict, workdir: PathLike, *, data: DataFactory,
          tokenizer: PathLike | None = None, evaluate: EvalFn | None = None,
          upcycle: Callable | None = None) -> dict[str, Any]:
    """Runs (or resumes) `config` in `workdir`; returns this run's logged metrics and evaluations (read back from
    metrics.jsonl: a long run keeps none of them in memory) and the final params.

    To follow one step, hold six things: the mesh (`config.mesh`, set for the whole run); the abstract train
    state and its shardings, from which a fresh init, a restore and the layout table are all made; the data
    iterator (this process's rows of each global batch, its position saved with the state); the jitted step,
    `(state, batch) -> (state, metrics, health)`; the non-finite guard reading `health` one step late; and the
    periodic actions after each step (log, eval, save; SIGTERM saves and stops).
    """
    apply_workarounds()  # for programs that call the library, not a CLI
    workdir = as_path(workdir)  # local, or gs:// for a pod's shared run directory (clipup_jax/storage.py)
    check_config(config, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with lease.hold(workdir, enabled=jax.process_index() == 0):  # a second run on this workdir fails here, at once
        return _train(config, workdir, data, tokenizer, evaluate, upcycle)


def _train(config: ml_collections.ConfigDict, workdir: Path, data: DataFactory, tokenizer: PathLike | None,
           evaluate: EvalFn | None, upcycle: Callable | None) -> dict[str, Any]:
    cfg = model_config(config)
    main_process = jax.process_index() == 0
    held = lease.current(workdir)
    log = MetricsLog(workdir, config.total_steps, enabled=main_process)
    note = warmup_note(config.optim, config.total_steps)
    if note and main_process:
        print(note, flush=True)

    # ---------------------------------------------------------------- mesh
    mesh = config_mesh(config)
    with jax.set_mesh(mesh):
        # ------------------------------------------------------------ state: restore or init, never both
        distributed.align("train-state")  # every process at the first collective (Orbax's) together
        checkpoints = TrainCheckpoints(workdir, keep=config.keep_checkpoints, every=config.checkpoint_every,
                                       timeout_s=config.get("checkpoint_timeout_s", SAVE_TIMEOUT_S))
        graphdef, tx, schedule, abstract = abstract_train_state(config)
        shardings = state_shardings(abstract, mesh, cfg)
        if main_process:  # printed, and the full table in layout.txt
            report_layout(abstract, shardings, workdir, describe_dispatchers(model_dispatchers(cfg, dict(mesh.shape))))
        data_iter = data(cfg, jax.process_index(), jax.process_count())
        started = time.perf_counter()
        if checkpoints.latest_step() is not None:  # straight into the shardings; the init checkpoint is not read
            try:
                state, _ = checkpoints.restore(abstract_like(abstract, shardings), data_iter)
            except ValueError as e:
                raise ValueError(f"{workdir}: its checkpoint does not fit this config's train state (model or "
                                 f"optimizer changed since it was written?): {str(e).splitlines()[0]}") from e
            print(f"resumed from {workdir / 'checkpoints'} at step {int(state.step)} "
                  f"(restored in {time.perf_counter() - started:.1f}s)", flush=True)
        else:
            state = _init_train_state(config, cfg, tx, mesh, shardings, _init_params(config, cfg, upcycle))
            if main_process:
                _write_workdir_metadata(workdir, cfg, tokenizer, config)
                source = config.init.checkpoint or f"a random init (config.seed={config.seed})"
                print(f"train state from {source} in {time.perf_counter() - started:.1f}s", flush=True)

        # ------------------------------------------------------------ step
        step_fn = _jit_step(config, graphdef, tx, schedule, shardings, mesh)
        batch_sharding = batch_shardings(mesh)

        def global_batch(local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
            return {k: jax.make_array_from_process_local_data(batch_sharding[k], local[k]) for k in batch_sharding}

        # ------------------------------------------------------------ loop
        preempted = []
        previous = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
        guard = NonFiniteGuard(config, checkpoints.latest_step, main_process)
        flops = None
        skipped = 0  # examples the pipeline dropped (corrupt images, empty captions), summed over this run
        start_step = int(state.step)
        if start_step >= config.total_steps and main_process:
            print(f"{workdir}: finished, at step {start_step} of config.total_steps={config.total_steps}: nothing to "
                  f"train (raise config.total_steps to continue)", flush=True)
        failed = False
        try:
            for step in range(start_step + 1, config.total_steps + 1):
                if held is not None:
                    held.check()  # stops a run whose lease another run took over (it stalled past the timeout)
                local = next(data_iter)
                skipped += int(local.get("num_skipped", 0))
                batch = global_batch(local)
                if flops is None:
                    flops = _compile(step_fn, state, batch, main_process)
                state, metrics, health = step_fn(state, batch)

                # ---------------------------------------------------- periodic actions
                last = step == config.total_steps
                stopping = bool(preempted)  # read once: the save below and the break agree
                log_now = step % config.log_every == 0 or last
                eval_now = evaluate is not None and config.eval_every and (step % config.eval_every == 0 or last)
                guard.check(step, health, now=log_now or eval_now or last or stopping
                            or checkpoints.manager.should_save(step))
                if log_now:
                    counters = {"data/skipped_examples": float(skipped),
                                "train/skipped_nonfinite_steps": float(guard.skipped)}
                    _log_step(log, config, step, metrics, counters, flops)
                if eval_now:
                    _evaluate(log, evaluate, nnx.merge(graphdef, state.params, state.rest), step, main_process)
                saved = checkpoints.save(step, state, data_iter, force=last or stopping)
                if saved:
                    log.flush()  # on an object store the metrics file is written at checkpoints
                if saved or eval_now:
                    release_free_memory()  # what the save's and eval's host buffers left behind
                if stopping:
                    checkpoints.wait()  # the VM may be gone in seconds: make the save durable before saying so
                    print(f"SIGTERM: {'saved' if saved else 'could not save'} step {step}, stopping", flush=True)
                    break
        except BaseException as e:
            failed = isinstance(e, SaveFailed)  # the store failed: what is left to write would fail too (retries)
            raise
        finally:
            last_save = None
            try:
                checkpoints.close()  # waits for the last save: a SIGTERM meanwhile must not kill it half-written
            except SaveFailed as e:  # reported here unless the loop's own error is on its way
                last_save, failed = e, True
            log.close(flush=not failed)  # unwritten metrics are logged again by the relaunch, from its checkpoint
            signal.signal(signal.SIGTERM, previous)
        if last_save is not None:
            raise last_save
    history: dict[str, Any] = log.this_run()
    if main_process:
        (workdir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    history["final_params"] = state.params
    return history


def _compile(step_fn, state: TrainState, batch: dict[str, jax.Array], verbose: bool) -> float:
    """Compiles the step for this state and batch (the loop's first call then runs it); its FLOPs per step."""
    started = time.perf_counter()
    if verbose:
        print("compiling the train step ...", flush=True)
    flops = flops_per_step(step_fn.lower(state, batch).compile())
    if verbose:
        print(f"compiled the train step in {time.perf_counter() - started:.1f}s ({flops / 1e9:.3g} GFLOP per step)",
              flush=True)
    return flops


def _log_step(log: MetricsLog, config: ml_collections.ConfigDict, step: int, metrics: dict[str, jax.Array],
              counters: dict[str, float], flops: float) -> None:
    scalars = {**scalar_metrics(jax.device_get(metrics)), **counters}
    shown = {k: scalars[k] for k in ("loss", "contrastive_loss", "aux_loss", "lr") if k in scalars}
    rates = log.progress(step, shown, config.batch_size)
    if rates and flops:
        rates["tflops_per_s"] = flops / rates["step_time_s"] / 1e12
        if config.peak_tflops_per_device:
            rates["mfu"] = rates["tflops_per_s"] / (config.peak_tflops_per_device * jax.device_count())
    log.write(step, {**scalars, **rates})


def _evaluate(log: MetricsLog, evaluate: EvalFn, model: CLIP, step: int, verbose: bool) -> None:
    results = evaluate(model, step)
    log.write(step, {f"eval/{k}": v for k, v in results.items()})
    if verbose:
        shown = {k: v for k, v in results.items() if not k.startswith("eval_")}
        print(f"[eval step {step}] " + " ".join(f"{k}={v:.4f}" for k, v in shown.items()), flush=True)
