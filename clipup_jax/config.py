"""The typed description of a CLIP model, shared by every layer of the package.

A checkpoint stores this config as JSON beside its weights, so everything that
changes the function a checkpoint computes (activation, LayerNorm epsilon,
pooling, optional biases) is a field here rather than a guess made from a name.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Literal, Sequence

Activation = Literal["quick_gelu", "gelu", "gelu_tanh"]
ACTIVATIONS: tuple[str, ...] = ("quick_gelu", "gelu", "gelu_tanh")


class ConfigError(ValueError):
    """A model config that cannot describe a valid CLIP; the message names the field."""


ROUTERS: tuple[str, ...] = ("top_k", "expert_choice")
# How an MoE layer moves tokens to its experts (`clipup_jax.models.dispatcher` decides what "auto" means and
# which choices a mesh or a mode refuses).
DISPATCHES: tuple[str, ...] = ("auto", "einsum", "padded", "ragged_dot", "pallas", "expert_loop", "dense_reference")
EP_TRANSPORTS: tuple[str, ...] = ("all_to_all", "allgather")


@dataclasses.dataclass(frozen=True)
class MoEPlan:
    """Which blocks of a tower are Mixture-of-Experts layers, and how they route and dispatch.

    `layers` is `every_2` (blocks 1, 3, 5, ... as in sparse upcycling),
    `last_N` (the last N blocks) or an explicit tuple of block indices.
    Routing groups are single samples (one image or one caption), so capacity
    and batch-prioritised routing act within a sample, as in V-MoE.
    """

    layers: str | tuple[int, ...] = "every_2"
    num_experts: int = 8
    top_k: int = 2
    router: str = "top_k"  # or "expert_choice" (each expert takes its top-C tokens; image tower only)
    renormalize_gates: bool = True  # gates sum to 1 over the chosen k: upcycled models then start function-preserving
    batch_priority: bool = False  # V-MoE BPR: high-confidence tokens claim buffer slots first
    router_noise_std: float = 0.0  # added to router logits in training only
    router_init_std: float = 0.02
    capacity_factor: float | None = 1.25  # training; None = dropless
    eval_capacity_factor: float | None = 2.0
    dispatch: str = "auto"  # training; one of DISPATCHES
    eval_dispatch: str = "auto"  # inference and periodic eval
    ep_transport: str = "all_to_all"  # how tokens reach experts when the mesh has an `expert` axis > 1
    load_balancing_weight: float = 0.01  # Switch
    z_loss_weight: float = 0.001  # ST-MoE
    importance_weight: float = 0.0  # V-MoE
    load_weight: float = 0.0  # V-MoE (needs router noise)
    local_entropy_weight: float = 0.0  # LIMoE
    global_entropy_weight: float = 0.0  # LIMoE
    global_entropy_threshold: float | None = None

    def layer_indices(self, depth: int) -> tuple[int, ...]:
        if isinstance(self.layers, str):
            if self.layers == "every_2":
                return tuple(range(1, depth, 2))
            match = re.fullmatch(r"last_(\d+)", self.layers)
            if match is None:
                raise ConfigError(
                    f"moe.layers={self.layers!r}: expected 'every_2', 'last_N' or a list of block indices"
                )
            n = int(match.group(1))
            if not 0 < n <= depth:
                raise ConfigError(f"moe.layers={self.layers!r}: N must be in 1..{depth} (tower depth)")
            return tuple(range(depth - n, depth))
        indices = tuple(sorted(set(int(i) for i in self.layers)))
        bad = [i for i in indices if not 0 <= i < depth]
        if bad:
            raise ConfigError(f"moe.layers: block indices {bad} are outside 0..{depth - 1} (tower depth {depth})")
        return indices

    def validate(self, depth: int) -> None:
        if self.num_experts < 1:
            raise ConfigError(f"moe.num_experts={self.num_experts}: must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"moe.top_k={self.top_k}: must be in 1..num_experts ({self.num_experts})")
        for name, value, allowed in (("router", self.router, ROUTERS), ("dispatch", self.dispatch, DISPATCHES),
                                     ("eval_dispatch", self.eval_dispatch, DISPATCHES),
                                     ("ep_transport", self.ep_transport, EP_TRANSPORTS)):
            if value not in allowed:
                raise ConfigError(f"moe.{name}={value!r}: expected one of {', '.join(allowed)}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"moe.{name}={value}: must be > 0 (or None for dropless)")
        if self.router == "expert_choice" and (self.capacity_factor is None or self.eval_capacity_factor is None):
            raise ConfigError("moe.router='expert_choice' needs capacity factors: each expert takes a fixed count")
        weights = [f.name for f in dataclasses.fields(self) if f.name.endswith("_weight")]
        negative = [w for w in weights if getattr(self, w) < 0]
        if negative:
            raise ConfigError(f"moe: aux-loss weights {negative} must be >= 0")
        if self.router_noise_std < 0 or self.router_init_std < 0:
            raise ConfigError("moe.router_noise_std and moe.router_init_std must be >= 0")
        if self.load_weight > 0 and self.router_noise_std == 0:
            raise ConfigError("moe.load_weight > 0 needs moe.router_noise_std > 0 (the load estimator is noise-based)")
        self.layer_indices(depth)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A ViT image tower. Defaults are OpenAI/open_clip CLIP; the flags cover big_vision and open_clip variants."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    pool: Literal["tok", "gap"] = "tok"  # class token, or mean over patch tokens (big_vision 'gap')
    class_token: bool = True
    pos_embed_covers_cls: bool = True  # OpenAI: grid**2 + 1 rows; big_vision: the cls token gets none
    ln_pre: bool = True
    # open_clip's final_ln_after_pool (CLIPA): with pool 'gap', ln_post normalises the mean, not each token.
    ln_post_after_pool: bool = False
    patch_bias: bool = False
    proj_bias: bool = False
    moe: MoEPlan | None = None

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid**2 + int(self.class_token and self.pos_embed_covers_cls)

    def validate(self) -> None:
        _check_positive(self, "vision", ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim"))
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size={self.image_size} is not a multiple of vision.patch_size={self.patch_size}"
            )
        if self.width % self.heads:
            raise ConfigError(f"vision.width={self.width} is not divisible by vision.heads={self.heads}")
        if self.pool not in ("tok", "gap"):
            raise ConfigError(f"vision.pool={self.pool!r}: expected 'tok' or 'gap'")
        if self.pool == "tok" and not self.class_token:
            raise ConfigError("vision.pool='tok' needs vision.class_token=True")
        if self.ln_post_after_pool and self.pool != "gap":
            raise ConfigError("vision.ln_post_after_pool=True needs vision.pool='gap' (one pooled token is the same "
                              "normalised before or after)")
        if self.moe is not None:
            self.moe.validate(self.depth)


TEXT_POOLS: tuple[str, ...] = ("argmax", "eos", "first", "last")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """A causal text transformer. Defaults are OpenAI/open_clip CLIP."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    causal: bool = True
    # argmax(token_ids) is the EOT token for the CLIP BPE; 'eos' is the first `eos_id` (other tokenizers' end
    # token, open_clip's -worldwide models), position 0 in a row without one; 'first'/'last' are positions.
    pool: Literal["argmax", "eos", "first", "last"] = "argmax"
    eos_id: int | None = None  # with pool 'eos' only
    proj_bias: bool = False
    moe: MoEPlan | None = None

    def validate(self) -> None:
        _check_positive(self, "text", ("vocab_size", "context_length", "width", "depth", "heads", "mlp_dim"))
        if self.width % self.heads:
            raise ConfigError(f"text.width={self.width} is not divisible by text.heads={self.heads}")
        if self.pool not in TEXT_POOLS:
            raise ConfigError(f"text.pool={self.pool!r}: expected one of {', '.join(map(repr, TEXT_POOLS))}")
        if (self.pool == "eos") != (self.eos_id is not None):
            raise ConfigError(f"text.eos_id={self.eos_id!r} with text.pool={self.pool!r}: an eos_id is given "
                              "exactly when pooling at it ('eos')")
        if self.eos_id is not None and not 0 <= self.eos_id < self.vocab_size:
            raise ConfigError(f"text.eos_id={self.eos_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self.moe is not None:
            self.moe.validate(self.depth)
            if self.causal and self.moe.router == "expert_choice":
                raise ConfigError("text.moe.router='expert_choice' would let a token's routing depend on later "
                                  "tokens, breaking the causal mask; use 'top_k' for text")


# A tower's name (as users write it: `--towers vision,text`, the config's field) -> (its parameters' prefix, its
# ModelConfig field).
TOWERS: dict[str, tuple[str, str]] = {"vision": ("visual", "vision"), "text": ("text", "text")}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A two-tower CLIP."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    embed_dim: int = 512
    activation: Activation = "quick_gelu"
    ln_eps: float = 1e-5
    logit_bias: bool = False  # SigLIP-style learnable bias on the logits
    shared_backbone: bool = False  # LIMoE: one transformer (and its MoE layers) serves both modalities

    def validate(self) -> "ModelConfig":
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        if not self.ln_eps > 0:
            raise ConfigError(f"ln_eps={self.ln_eps}: must be > 0")
        _check_positive(self, "model", ("embed_dim",))
        self.vision.validate()
        self.text.validate()
        if self.shared_backbone:
            fields = ("width", "depth", "heads", "mlp_dim", "moe")
            differ = [f for f in fields if getattr(self.vision, f) != getattr(self.text, f)]
            if differ:
                raise ConfigError(f"shared_backbone=True needs equal vision/text {', '.join(differ)}")
        return self

    @property
    def is_sparse(self) -> bool:
        return self.vision.moe is not None or self.text.moe is not None

    @property
    def moe_towers(self) -> tuple[str, ...]:
        """Names of the towers (`TOWERS`) that have MoE layers."""
        return tuple(name for name, (_, field) in TOWERS.items() if getattr(self, field).moe is not None)

    def with_moe(self, plan: "MoEPlan", towers: Sequence[str] = tuple(TOWERS)) -> "ModelConfig":
        """This model with `plan` in `towers` (names in `TOWERS`), checked against each tower's depth."""
        unknown = [t for t in towers if t not in TOWERS]
        if unknown or not towers:
            raise ConfigError(f"towers {list(towers)}: expected a non-empty subset of {', '.join(TOWERS)}")
        changes = {}
        for name in towers:
            field = TOWERS[name][1]
            tower = getattr(self, field)
            try:
                plan.validate(tower.depth)
            except ConfigError as e:
                raise ConfigError(f"{name} tower: {e}") from e
            changes[field] = dataclasses.replace(tower, moe=plan)
        return self.replace(**changes).validate()

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def differences(self, other: "ModelConfig") -> list[str]:
        """'field: this -> other' for every leaf field that differs (dotted, e.g. 'vision.moe.top_k: 2 -> 1')."""
        return [f"{name}: {a!r} -> {b!r}" for name, a, b in _diff(self.to_dict(), other.to_dict(), "")]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data, "model").validate()

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


def _diff(a: Any, b: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in a for d in _diff(a[key], b[key], f"{prefix}{key}.")]
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def model_config(experiment: Any) -> ModelConfig:
    """The typed model of an experiment config (its `model` field, an ml_collections ConfigDict)."""
    return ModelConfig.from_dict(experiment.model.to_dict())


def _check_positive(cfg: Any, prefix: str, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{prefix}.{name}={value!r}: must be a positive integer")


# Checkpoints written before the dispatch names were made honest (one `dispatch` for both modes, with
# `grouped_matmul` naming the sorted path's backend) still load, meaning what they meant.
_LEGACY_DISPATCH = {("einsum", "padded"): "einsum", ("sorted", "padded"): "padded",
                    ("sorted", "ragged_dot"): "ragged_dot", ("sorted", "pallas"): "pallas",
                    ("dense_reference", "padded"): "dense_reference"}


def _upgrade_dispatch(data: dict[str, Any]) -> dict[str, Any]:
    if "grouped_matmul" not in data:
        return data
    data = dict(data)
    old = (data.get("dispatch", "einsum"), data.pop("grouped_matmul"))
    if old not in _LEGACY_DISPATCH:
        raise ConfigError(f"moe: dispatch={old[0]!r} with grouped_matmul={old[1]!r} has no current equivalent; "
                          f"expected dispatch one of {', '.join(DISPATCHES)}")
    data["dispatch"] = _LEGACY_DISPATCH[old]
    return data


def _from_dict(cls: type, data: Any, where: str) -> Any:
    """Builds a nested config dataclass, refusing unknown fields so typos never pass silently."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    if cls is MoEPlan:
        data = _upgrade_dispatch(data)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        nested = {"vision": VisionConfig, "text": TextConfig, "moe": MoEPlan}.get(name)
        if nested is not None and value is not None:
            value = _from_dict(nested, value, f"{where}.{name}")
        elif name == "layers" and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _openai(image_size: int, patch: int, vw: int, vd: int, tw: int, embed: int) -> ModelConfig:
    """OpenAI's ViT CLIPs: heads = width / 64, MLP = 4 x width, text depth 12."""
    return ModelConfig(
        vision=VisionConfig(image_size=image_size, patch_size=patch, width=vw, depth=vd, heads=vw // 64, mlp_dim=4 * vw),
        text=TextConfig(width=tw, depth=12, heads=tw // 64, mlp_dim=4 * tw),
        embed_dim=embed,
    )


PRESETS: dict[str, ModelConfig] = {
    "ViT-B-32": _openai(224, 32, 768, 12, 512, 512),
    "ViT-B-16": _openai(224, 16, 768, 12, 512, 512),
    "ViT-L-14": _openai(224, 14, 1024, 24, 768, 768),
    "ViT-L-14-336": _openai(336, 14, 1024, 24, 768, 768),
    # Small enough for CPU tests; odd sizes on purpose so shape bugs cannot hide behind squares.
    "tiny": ModelConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=48, depth=2, heads=3, mlp_dim=96),
        text=TextConfig(vocab_size=512, context_length=16, width=40, depth=2, heads=2, mlp_dim=80),
        embed_dim=24,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
