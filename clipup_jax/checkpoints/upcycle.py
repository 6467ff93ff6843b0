"""Sparse upcycling: a dense CLIP becomes a sparse MoE CLIP whose experts start as copies of its MLPs.

The mapping is a rule per sparse parameter key of the per-block view (`checkpoints/params.py`: the dense
checkpoint's stacks are split into blocks, the sparse ones stacked again, as the two models' runs of repeated
blocks differ):

    <tower>/encoder/blocks/<i>/mlp/router_kernel      new: normal(plan.router_init_std), keyed by the seed, or
                                                       (router_init="kmeans") the centroids of that layer's
                                                       inputs on a calibration batch (router_init.py)
    <tower>/encoder/blocks/<i>/mlp/fc{1,2}_{kernel,bias}  in a MoE block: the dense tensor tiled on a new
                                                       leading expert axis (+ optional noise / drop-upcycling)
    anything else                                      copied unchanged

Multiplet upcycling (CLIP-MoE, arXiv 2409.19291) takes the experts from several dense checkpoints of one
architecture: expert e's MLP from checkpoint e mod n, everything else from the first or averaged over all
(`shared_from`). Experts that differ make the start no longer function-preserving, and the Adam moments of one
checkpoint fit none of the others, so none are carried over.

Every dense key must be consumed and every sparse key produced; anything else is a
`CheckpointError` that lists the keys, so a model change that the rules do not cover
cannot pass silently.

Experts are `LazyStack`s: expert e is computed from the dense tensor when asked for,
with random streams keyed by (seed, key, e). The writer therefore streams experts to
disk one at a time, and a mesh placement (`jax.make_array_from_callback(x.shape,
sharding, x.__getitem__)`) builds only each device's experts, with the same values.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from clipup_jax.checkpoints.errors import CheckpointError, key_list
from clipup_jax.checkpoints.format import (TOKENIZER_DIR, AdamMoments, check_output, load_checkpoint, read_metadata,
                                           save_checkpoint)
from clipup_jax.checkpoints.lazy import LazyStack
from clipup_jax.checkpoints.params import check_params, from_blocks, to_blocks
from clipup_jax.checkpoints.router_init import Calibration, cluster_routers
from clipup_jax.models.layers import mlp_init_stds
from clipup_jax.models.param_tree import abstract_block_params
from clipup_jax.config import TOWERS, ConfigError, ModelConfig, MoEPlan
from clipup_jax.storage import PathLike, absolute, as_path

TILED = ("fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias")
_MLP_KEY = re.compile(r"^(?P<block>(?P<prefix>visual|text)/encoder/blocks/\d+/mlp)/(?P<leaf>\w+)$")
_ROUTER, _DROP_SELECT, _DROP_INIT, _NOISE = range(4)  # independent random streams
ROUTER_INITS = ("normal", "kmeans")
SHARED_FROM = ("first", "average")  # multiplet: where the parameters outside the experts come from


@dataclasses.dataclass(frozen=True)
class UpcycleOptions:
    plan: MoEPlan = MoEPlan()
    towers: tuple[str, ...] = tuple(TOWERS)
    expert_noise: float = 0.0  # std of normal noise added to each expert's kernels (absolute)
    drop_upcycling: float = 0.0  # fraction of each expert's hidden units re-initialised (Drop-Upcycling)
    seed: int = 0
    optimizer_state: bool = True  # tile the dense Adam moments, when the checkpoint has them
    router_init: str = "normal"  # or "kmeans": centroids of each layer's inputs on a calibration batch
    shared_from: str = "first"  # multiplet upcycling: non-expert parameters from the first checkpoint or averaged

    def validate(self) -> None:
        if self.router_init not in ROUTER_INITS:
            raise ConfigError(f"router init {self.router_init!r}: expected one of {', '.join(ROUTER_INITS)}")
        if self.shared_from not in SHARED_FROM:
            raise ConfigError(f"shared-from {self.shared_from!r}: expected one of {', '.join(SHARED_FROM)}")
        if self.router_init == "kmeans" and not self.plan.router_init_std > 0:
            raise ConfigError("router_init='kmeans' scales the centroids by router_init_std: it must be > 0")
        if not 0.0 <= self.drop_upcycling <= 1.0:
            raise ConfigError(f"drop-upcycling ratio {self.drop_upcycling} must be in [0, 1]")
        if not self.expert_noise >= 0.0:
            raise ConfigError(f"expert noise std {self.expert_noise} must be >= 0")
        if self.seed < 0:
            raise ConfigError(f"seed {self.seed} must be >= 0")
        if self.plan.router_init_std == 0 and self.plan.router_noise_std == 0:
            raise ConfigError("router_init_std=0 without router noise makes every gate tie and sends all tokens to "
                              "the same experts; use a small std (default 0.02)")


@dataclasses.dataclass(frozen=True)
class Upcycled:
    config: ModelConfig
    params: dict[str, np.ndarray | LazyStack]
    opt_state: AdamMoments | None

    def host_params(self) -> dict[str, np.ndarray]:
        """Every leaf as a numpy array (materialises all experts: for small models and tests)."""
        return {k: v.materialize() if isinstance(v, LazyStack) else v for k, v in self.params.items()}


def sparse_config(dense: ModelConfig, opts: UpcycleOptions, source: str = "dense model") -> ModelConfig:
    """The dense config with `opts.plan` on the chosen towers; refuses an input that is already sparse."""
    if dense.is_sparse:
        raise CheckpointError(f"{source}: is already sparse (MoE in the {' and '.join(dense.moe_towers)} tower); "
                              "upcycling takes a dense checkpoint")
    opts.validate()
    if dense.shared_backbone and set(opts.towers) != set(TOWERS):
        raise ConfigError("a shared backbone serves both modalities: upcycle towers vision,text together")
    return dense.with_moe(opts.plan, opts.towers)


def key_rules(dense: ModelConfig, sparse: ModelConfig,
              source: str = "dense model") -> dict[str, tuple[str, str | None]]:
    """sparse key -> (rule, dense key) in the per-block view: 'router' (new), 'tile' or 'copy'. Lists every key
    the rules leave out."""
    have, want = abstract_block_params(dense), abstract_block_params(sparse)
    rules: dict[str, tuple[str, str | None]] = {}
    for key in want:
        m = _MLP_KEY.match(key)
        moe = m is not None and f"{m['block']}/router_kernel" in want
        if moe and m["leaf"] == "router_kernel":
            rules[key] = ("router", None)
        else:
            rules[key] = ("tile" if moe and m["leaf"] in TILED else "copy", key)
    consumed = {src for _, src in rules.values() if src is not None}
    unproduced = [k for k, (_, src) in rules.items() if src is not None and src not in have]
    misshaped = [
        f"{k} {tuple(want[k].shape)} from {tuple(have[src].shape)}" for k, (rule, src) in rules.items()
        if src in have and tuple(want[k].shape) != ((want[k].shape[0],) if rule == "tile" else ()) + have[src].shape
    ]
    problems = []
    if unproduced:
        problems.append(f"sparse keys no rule produces: {key_list(unproduced)}")
    if set(have) - consumed:
        problems.append(f"dense keys no rule consumes: {key_list(set(have) - consumed)}")
    if misshaped:
        problems.append(f"shapes the rules cannot map: {key_list(misshaped)}")
    if problems:
        raise CheckpointError(f"{source}: upcycling rules do not cover the model: " + "; ".join(problems))
    return rules


def upcycle(config: ModelConfig, params: Mapping[str, np.ndarray], opts: UpcycleOptions,
            opt_state: AdamMoments | None = None, source: str = "dense model", *,
            calibration: Calibration | None = None,
            multiplet: Sequence[Mapping[str, np.ndarray]] = ()) -> Upcycled:
    """The sparse config, params and (when given and `opts.optimizer_state`) Adam moments; experts stay lazy.

    `calibration` feeds `opts.router_init="kmeans"`; `multiplet` are further dense checkpoints of `config`'s
    architecture (`params` is the first): expert e's MLP comes from checkpoint e mod (1 + len(multiplet)).
    """
    sparse = sparse_config(config, opts, source)
    check_params(params, config, source)
    for i, other in enumerate(multiplet, 1):
        same_architecture(params, other, f"{source}: multiplet checkpoint {i}")
    rules = key_rules(config, sparse, source)
    stacked = params  # the input as the model holds it: what the k-means calibration runs unless averaged
    params, multiplet = to_blocks(params, config, source), [to_blocks(m, config, source) for m in multiplet]
    checkpoints = [params, *multiplet]
    # The dense model the sparse one starts nearest: the copied parameters, and the first checkpoint's MLPs
    # where experts come from all of them (what the k-means calibration runs).
    shared = params
    if multiplet and opts.shared_from == "average":
        tiled = {src for rule, src in rules.values() if rule == "tile"}
        mean = lambda key: np.mean([np.asarray(c[key], np.float32) for c in checkpoints], axis=0)  # noqa: E731
        shared = {key: params[key] if key in tiled else mean(key) for key in params}
    routers = None
    if opts.router_init == "kmeans":
        if calibration is None:
            raise CheckpointError(f"{source}: router init 'kmeans' needs a calibration batch")
        calibrated = stacked if shared is params else from_blocks(shared, config)
        routers = cluster_routers(config, calibrated, sparse, calibration, opts.seed)
    experts = _Experts(sparse, opts, routers)
    out = {key: experts.param(key, rule, [c[src] for c in checkpoints] if rule == "tile"
                              else shared[src] if src else None) for key, (rule, src) in rules.items()}
    moments = None
    if opt_state is not None and opts.optimizer_state and not multiplet:
        moments = AdamMoments(opt_state.count, *(
            from_blocks({key: experts.moment(key, rule, tree[src] if src else None)
                         for key, (rule, src) in rules.items()}, sparse, f"{source} (Adam {what})")
            for what, tree in (("mu", to_blocks(opt_state.mu, config, f"{source} (Adam mu)")),
                               ("nu", to_blocks(opt_state.nu, config, f"{source} (Adam nu)")))))
    return Upcycled(sparse, from_blocks(out, sparse, source), moments)


def same_architecture(first: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], what: str) -> None:
    """Multiplet checkpoints must hold the same keys with the same shapes; names the first that differs."""
    for key in sorted(set(first) | set(other)):
        if key not in other:
            raise CheckpointError(f"{what}: lacks {key}, which the first checkpoint has")
        if key not in first:
            raise CheckpointError(f"{what}: has {key}, which the first checkpoint lacks")
        if tuple(first[key].shape) != tuple(other[key].shape):
            raise CheckpointError(f"{what}: {key} has shape {tuple(other[key].shape)}, the first checkpoint's "
                                  f"{tuple(first[key].shape)}")


def upcycle_checkpoint(src: PathLike, out: PathLike, opts: UpcycleOptions,
                       force: bool = False, *, calibration: Calibration | None = None,
                       multiplet: Sequence[PathLike] = ()) -> Upcycled:
    """Reads the dense checkpoint `src` (and the `multiplet` ones whose MLPs become further experts), writes the
    sparse one at `out` (streamed, atomic, tokenizer copied). Every check runs before any weight is read."""
    src, out = as_path(src), as_path(out)  # local or gs://
    check_output(out, force)
    metadata, dense_config = read_metadata(src)
    sparse_config(dense_config, opts, str(src))  # refuse bad plans before reading any weights
    multiplet = [as_path(p) for p in multiplet]
    for i, path in enumerate(multiplet, 1):
        check_multiplet(dense_config, read_metadata(path)[1], f"{path}: multiplet checkpoint {i}")
    dense = load_checkpoint(src, opt_state=opts.optimizer_state and not multiplet)
    up = upcycle(dense.config, dense.params, opts, dense.opt_state, str(src), calibration=calibration,
                 multiplet=[load_checkpoint(p, opt_state=False).params for p in multiplet])
    tokenizer_files, entry = None, None
    if dense.tokenizer_path is not None:
        tokenizer_files = sorted((src / TOKENIZER_DIR).iterdir())
        rel = pathlib.PurePosixPath(metadata["tokenizer"]).relative_to(TOKENIZER_DIR)
        entry = None if rel == pathlib.PurePosixPath(".") else str(rel)
    upcycling = {"towers": list(opts.towers), "expert_noise": opts.expert_noise,
                 "drop_upcycling": opts.drop_upcycling, "seed": opts.seed, "router_init": opts.router_init,
                 "optimizer_state": up.opt_state is not None}
    if multiplet:
        upcycling.update(multiplet=[str(absolute(p)) for p in multiplet], shared_from=opts.shared_from)
    save_checkpoint(out, up.config, up.params, force=force, tokenizer_files=tokenizer_files, tokenizer_entry=entry,
                    opt_state=up.opt_state, source={
                        "format": "upcycled", "path": str(absolute(src)), "dense_source": metadata.get("source"),
                        "upcycling": upcycling})
    return up


def check_multiplet(first: ModelConfig, other: ModelConfig, what: str) -> None:
    """A multiplet checkpoint has the first one's architecture: else names the first parameter key, or failing
    that the first config field, that differs. Reads no weights."""
    same_architecture(abstract_block_params(first), abstract_block_params(other), what)
    field = _first_difference(first.to_dict(), other.to_dict())
    if field is not None:
        raise CheckpointError(f"{what}: its model config differs from the first checkpoint's at {field}")


def _first_difference(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> str | None:
    """The first dotted field where two config dicts differ, with both values; None when equal."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            inner = _first_difference(x, y, f"{prefix}{key}.")
            if inner is not None:
                return inner
        elif x != y:
            return f"{prefix}{key} ({x!r} vs {y!r})"
    return None


class _Experts:
    """Makes each sparse leaf from its dense source; one expert at a time for tiled leaves."""

    def __init__(self, sparse: ModelConfig, opts: UpcycleOptions, routers: Mapping[str, np.ndarray] | None):
        self.cfg, self.opts, self.routers = sparse, opts, routers

    def _rng(self, stream: int, key: str, expert: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.opts.seed, stream, zlib.crc32(key.encode()), expert])

    def _tower(self, key: str) -> Any:
        prefix = _MLP_KEY.match(key)["prefix"]
        return getattr(self.cfg, next(field for p, field in TOWERS.values() if p == prefix))

    def param(self, key: str, rule: str, dense: np.ndarray | list[np.ndarray] | None) -> np.ndarray | LazyStack:
        """`dense`: the tensor to copy, or for a tiled leaf one per source checkpoint (expert e takes e mod n)."""
        if rule == "copy":
            return dense
        tower = self._tower(key)
        plan = tower.moe
        if rule == "router":
            if self.routers is not None:
                return self.routers[key]
            shape = (tower.width, plan.num_experts)
            return (plan.router_init_std * self._rng(_ROUTER, key).standard_normal(shape)).astype(np.float32)
        return LazyStack((plan.num_experts, *dense[0].shape), functools.partial(self._expert_of, key, tuple(dense)))

    def _expert_of(self, key: str, sources: tuple[np.ndarray, ...], expert: int) -> np.ndarray:
        return self._expert(key, sources[expert % len(sources)], expert)

    def moment(self, key: str, rule: str, dense: np.ndarray | None) -> np.ndarray | LazyStack:
        if rule == "copy":
            return dense
        plan = self._tower(key).moe
        if rule == "router":  # a new parameter has no history
            return np.zeros((self._tower(key).width, plan.num_experts), np.float32)
        return LazyStack((plan.num_experts, *dense.shape), functools.partial(self._expert_moment, key, dense))

    def _dropped(self, key: str, expert: int) -> np.ndarray:
        """Hidden units expert `expert` re-initialises: the same for all four tensors of its block."""
        n = round(self.opts.drop_upcycling * self._tower(key).mlp_dim)
        if n == 0:
            return np.zeros((0,), np.int64)
        block = _MLP_KEY.match(key)["block"]
        return np.sort(self._rng(_DROP_SELECT, block, expert).permutation(self._tower(key).mlp_dim)[:n])

    def _expert(self, key: str, dense: np.ndarray, expert: int) -> np.ndarray:
        leaf = key.rsplit("/", 1)[1]
        drop = self._dropped(key, expert)
        noisy = self.opts.expert_noise > 0 and leaf.endswith("kernel")
        if not drop.size and not noisy:
            return dense  # every expert is the dense tensor itself: no copy
        w = np.array(dense, np.float32)
        if drop.size:
            tower = self._tower(key)
            rng = self._rng(_DROP_INIT, key, expert)
            fc1_std, fc2_std = mlp_init_stds(tower.width, tower.depth)  # the model's own init
            if leaf == "fc1_kernel":
                w[:, drop] = fc1_std * rng.standard_normal((w.shape[0], drop.size))
            elif leaf == "fc1_bias":
                w[drop] = 0.0
            elif leaf == "fc2_kernel":
                w[drop, :] = fc2_std * rng.standard_normal((drop.size, w.shape[1]))
        if noisy:
            w += self.opts.expert_noise * self._rng(_NOISE, key, expert).standard_normal(w.shape, np.float32)
        return w

    def _expert_moment(self, key: str, dense: np.ndarray, expert: int) -> np.ndarray:
        """Moments are tiled; re-initialised hidden units start with none."""
        drop = self._dropped(key, expert)
        if not drop.size:
            return dense
        m = np.array(dense, np.float32)
        leaf = key.rsplit("/", 1)[1]
        if leaf == "fc1_kernel":
            m[:, drop] = 0.0
        elif leaf in ("fc1_bias", "fc2_kernel"):
            m[drop] = 0.0
        return m

