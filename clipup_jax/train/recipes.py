"""Building blocks for experiment configs (`experiments/*.py`), so recipes state only what differs."""

from __future__ import annotations

import ml_collections

from clipup_jax.config import TOWERS, ModelConfig, MoEPlan, TextConfig, VisionConfig, preset
from clipup_jax.train.optimizer import DEFAULT_NO_DECAY

SAVE_TIMEOUT_S = 1200  # config.checkpoint_timeout_s's default, and the value for configs saved before it existed

# CLIP-UP's most plausible plan (shared/reference/paper.md): 8 experts, top-2, every other block of both towers.
# Dropless at inference: no token is dropped and none pays for capacity it does not use.
CLIPUP_PLAN = MoEPlan(layers="every_2", num_experts=8, top_k=2, capacity_factor=2.0, eval_capacity_factor=None,
                      load_balancing_weight=0.01, z_loss_weight=0.001)


def sparse(model: ModelConfig, plan: MoEPlan = CLIPUP_PLAN, towers: tuple[str, ...] = tuple(TOWERS)) -> ModelConfig:
    return model.with_moe(plan, towers)


def base_config(model: ModelConfig | str) -> ml_collections.ConfigDict:
    """Every field the trainer reads, with defaults; a recipe overrides what it needs."""
    model = preset(model) if isinstance(model, str) else model
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model.to_dict()
    config.init = ml_collections.ConfigDict({"checkpoint": ""})  # dense or sparse clipup checkpoint; dense+sparse model = upcycle
    config.data = ml_collections.ConfigDict({
        "train": "synthetic:train",  # see clipup_jax/data/sources: tfds:, wds:, arrayrecord:, csv:, synthetic:
        "eval": "synthetic:eval",
        "eval_size": 1000,  # examples of the eval source used (synthetic: generated)
        "zero_shot": "synthetic",  # class names/labels of the eval source, or "" for none
        "eval_resize": "shortest",  # how eval images become square: data.image_ops.RESIZE_MODES (CLIP: shortest)
        "tokenizer": "",  # bpe_simple_vocab_16e6.txt.gz or HF dir; "" = train one on the synthetic captions
        "num_workers": 0,
        "synthetic_size": 100_000,
        # Which generated data set (train and eval splits): fixed across runs, so `seed` (data order, init, router
        # noise) varies a run without changing the data it trains and is evaluated on.
        "synthetic_seed": 0,
        # The embedded set's world (data/synthetic.py): "scenes" (compositional captions; `synthetic_species` adds
        # a long tail of glyph species) or "catalogue" (`synthetic_species` named species to memorise, the demo's).
        "synthetic_world": "scenes",
        "synthetic_species": 0,
    })
    config.batch_size = 256  # global
    config.total_steps = 1000
    config.loss = "clip"  # or "siglip"
    config.loss_impl = "global"  # or "sharded": shard_map, each device only its B_local x B logits (train/losses.py)
    # A step whose loss, input pixels, gradients or updated params hold NaN/Inf is never applied. "stop": raise,
    # keeping the last good checkpoint; "skip": drop that step's update, warn and count it (more than
    # max_nonfinite_skips such steps in a row stops the run).
    config.nonfinite = "stop"
    config.max_nonfinite_skips = 10
    config.compute_dtype = "float32"  # or "bfloat16" (params stay float32)
    # Recompute block activations in the backward pass: "none", "full" (keep only each block's input; less
    # memory, ~1/3 more compute) or "dots" (keep matmul outputs, recompute the elementwise rest).
    config.remat = "none"
    config.scan_layers = False  # run repeated blocks with one lax.scan: compile time flat in depth, same params
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1})
    # Multi-slice TPU: each axis' cross-slice (DCN) factor, e.g. data=2 for two slices (parallel/mesh.py).
    config.dcn_mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "expert": 1})
    config.optim = ml_collections.ConfigDict({
        "lr": 5e-4, "warmup_steps": 100, "schedule": "cosine", "end_lr_fraction": 0.0,
        "b1": 0.9, "b2": 0.98, "eps": 1e-6, "weight_decay": 0.2, "grad_clip_norm": 1.0,
        "no_decay_regex": DEFAULT_NO_DECAY,
        "freeze": [], "lr_mults": [], "accum_steps": 1,
    })
    # When a dense init checkpoint meets a sparse model (router init std is the MoE plan's router_init_std).
    # router_init "kmeans": routers from clusters of the first `calibration_size` training examples;
    # multiplet: further dense checkpoints (comma-separated) whose MLPs become experts e mod n
    # (checkpoints/upcycle.py), the rest from the first or averaged (`shared_from`).
    config.upcycle = ml_collections.ConfigDict({"expert_noise": 0.0, "drop_upcycling": 0.0, "router_init": "normal",
                                                "calibration_size": 64, "multiplet": "", "shared_from": "first"})
    config.log_every = 50
    config.eval_every = 1000
    config.eval_batch_size = 256
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.checkpoint_timeout_s = SAVE_TIMEOUT_S  # a save not done by then fails the run: a dead store is no hang
    config.peak_tflops_per_device = 0.0  # e.g. 989 (H100/H200 bf16 dense), 459 (TPU v5p); 0 = MFU not logged
    return config


def continued_training(model: ModelConfig | str, expert_axis: int = 1) -> ml_collections.ConfigDict:
    """Continued training from a dense checkpoint on web-scale image-text shards, COCO retrieval eval.

    Set `--config.init.checkpoint=DIR` (a `clipup-convert import` output); a sparse model is upcycled from it.
    """
    config = base_config(model)
    config.data.train = "wds:/data/datacomp/{00000000..00001287}.tar"
    config.data.eval = "tfds:coco_captions/test"
    config.data.eval_size = 5000
    config.data.zero_shot = ""
    config.data.tokenizer = "/data/tokenizers/bpe_simple_vocab_16e6.txt.gz"
    config.data.num_workers = 16
    config.batch_size = 32768
    config.total_steps = 20_000
    # At batch 32768 the global logits are 4 GiB of float32 (B x B) per copy: each device computes only its
    # B_local x B rows, whatever sharding GSPMD would have propagated.
    config.loss_impl = "sharded"
    config.compute_dtype = "bfloat16"
    config.remat = "full"
    config.scan_layers = True
    config.mesh.expert = expert_axis
    config.optim.lr = 1e-4  # reduced relative to pre-training, as upcycling recipes do
    config.optim.warmup_steps = 1000
    config.log_every = 100
    config.eval_every = 2000
    config.checkpoint_every = 1000
    return config


# The demo's tiny CLIP: big enough to learn either embedded world, small enough for 2 CPU cores.
DEMO_MODEL = ModelConfig(
    vision=VisionConfig(image_size=32, patch_size=8, width=64, depth=4, heads=4, mlp_dim=128),
    text=TextConfig(vocab_size=768, context_length=24, width=64, depth=4, heads=4, mlp_dim=128),
    embed_dim=64,
)
DEMO_PLAN = CLIPUP_PLAN  # the demo upcycles with the recipe's own plan


# The demo's parent forks mid-curve, where its held-out retrieval still rises (benchmarks/RESULTS.md, clipup-demo).
DEMO_PARENT_STEPS, DEMO_ARM_STEPS = 1000, 300
# What changes when an arm continues from the demo's parent (clipup-demo, experiments/sweeps/clipup_paper.py): a
# reduced LR and a short warmup, as upcycling recipes do.
DEMO_CONTINUED = {"optim.lr": 5e-4, "optim.warmup_steps": 20}


def demo_config(model: ModelConfig = DEMO_MODEL) -> ml_collections.ConfigDict:
    """Dense pre-training of the tiny CLIP on the embedded catalogue of named species (the `clipup-demo` parent)."""
    config = base_config(model)
    config.data.synthetic_world = "catalogue"
    config.data.synthetic_species = 1024
    config.data.eval_size = 500
    config.batch_size = 64
    config.total_steps = 300
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 30
    config.optim.end_lr_fraction = 0.1
    config.optim.weight_decay = 0.1
    config.log_every = 25
    config.eval_every = 100
    config.eval_batch_size = 128
    config.checkpoint_every = 100
    config.keep_checkpoints = 2
    return config
