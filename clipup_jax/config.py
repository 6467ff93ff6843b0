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


@dataclasses.dataclass(frozen=True)
class MoEPlan:
    """Which blocks of a tower are Mixture-of-Experts layers, and how many experts.

    `layers` is `every_2` (blocks 1, 3, 5, ... as in sparse upcycling),
    `last_N` (the last N blocks) or an explicit tuple of block indices.
    """

    layers: str | tuple[int, ...] = "every_2"
    num_experts: int = 8
    top_k: int = 2

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
        self.layer_indices(depth)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A ViT image tower. Defaults are OpenAI/open_clip CLIP; the flags cover big_vision towers."""

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
        if self.moe is not None:
            self.moe.validate(self.depth)


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
    pool: Literal["argmax", "last"] = "argmax"  # argmax(token_ids) is the EOT token for the CLIP BPE
    proj_bias: bool = False
    moe: MoEPlan | None = None

    def validate(self) -> None:
        _check_positive(self, "text", ("vocab_size", "context_length", "width", "depth", "heads", "mlp_dim"))
        if self.width % self.heads:
            raise ConfigError(f"text.width={self.width} is not divisible by text.heads={self.heads}")
        if self.pool not in ("argmax", "last"):
            raise ConfigError(f"text.pool={self.pool!r}: expected 'argmax' or 'last'")
        if self.moe is not None:
            self.moe.validate(self.depth)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A two-tower CLIP."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    embed_dim: int = 512
    activation: Activation = "quick_gelu"
    ln_eps: float = 1e-5
    logit_bias: bool = False  # SigLIP-style learnable bias on the logits

    def validate(self) -> "ModelConfig":
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        if not self.ln_eps > 0:
            raise ConfigError(f"ln_eps={self.ln_eps}: must be > 0")
        _check_positive(self, "model", ("embed_dim",))
        self.vision.validate()
        self.text.validate()
        return self

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

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


def _check_positive(cfg: Any, prefix: str, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{prefix}.{name}={value!r}: must be a positive integer")


def _from_dict(cls: type, data: Any, where: str) -> Any:
    """Builds a nested config dataclass, refusing unknown fields so typos never pass silently."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
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
