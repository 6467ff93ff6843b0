"""big_vision two-tower `.npz` checkpoints (LiT and CLIP-style models trained with big_vision).

The file is a flat `np.savez` whose keys are `/`-joined Flax paths, optionally
under a top-level `params/`. The architecture is read from tensor shapes only
(big_vision keeps head counts visible as `[D, H, Dh]` attention kernels).

Supported, and how it maps onto `ModelConfig`:

* `img`: `models/vit.py` with a learned `pos_embedding` and pool type `tok`
  (an `img/cls` token is present) or `gap` (no `img/cls`).
  Patch conv with bias (`patch_bias`), no `ln_pre`, pos-emb added before the cls
  token (`pos_embed_covers_cls=False`), `encoder_norm` -> `ln_post`, `head`
  Dense with bias (`proj_bias`). Pre-2022 layouts that `vit.load` fixes are
  accepted too: a `grid**2 + 1`-row pos-emb that covers the cls token
  (`pos_embed_covers_cls=True`) and a pos-emb stored under `Transformer/`.
* `txt`: `models/proj/image_text/text_transformer.py`, bidirectional
  (`causal=False`), pooling the last token (`pool='last'`, its default),
  `Encoder_0/encoder_norm` -> `ln_final`, `head` with bias. A stray
  `Encoder_0/pos_embedding` (old checkpoints that added it twice) is summed into
  `pos_embedding`, as `text_transformer.load` does.
* Encoder blocks either unrolled (`encoderblock_{i}`) or scanned
  (`encoderblock` with a leading layer axis).
* `t` (log temperature) -> `logit_scale`; `b` (SigLIP bias) -> `logit_bias`.
* Activation `gelu_tanh` and LayerNorm eps 1e-6 (Flax's `nn.gelu` and
  `nn.LayerNorm` defaults) unless overridden.

Refused, with the offending key named:

* MAP pooling (`*/MAPHead_0`, SigLIP's image tower): no attention-pooling head here.
* `img/pre_logits` (ViT `rep_size`, a tanh layer before the head).
* A tower without `head`: its features would not live in the joint space.
* Heads of different output sizes (big_vision's tuple `out_dim`).
* An unstored (`sincos2d`) image pos-emb: the image size it was computed for
  cannot be recovered from the file.
* Any key left unconsumed, and any tensor whose shape disagrees with the others.

Not detectable (files do not record pool types): a cls-less image tower is
imported as `gap` (big_vision's `0` pool would need `tok` without a cls token),
and text pools other than `last` (`first`, `mean`, `max`) are imported as `last`.
"""

from __future__ import annotations

import math
import pathlib
import re

import numpy as np

from clipup_jax.checkpoints.errors import CheckpointError, key_list
from clipup_jax.checkpoints.source_keys import SourceKeys
from clipup_jax.checkpoints.params import from_blocks
from clipup_jax.checkpoints.tensor_files import read_tensors
from clipup_jax.config import ConfigError, ModelConfig, TextConfig, VisionConfig

DEFAULT_ACTIVATION = "gelu_tanh"  # flax nn.gelu is the tanh approximation
DEFAULT_LN_EPS = 1e-6  # flax nn.LayerNorm default
_ATTN = "MultiHeadDotProductAttention_0"
_BLOCK_KEYS = (
    "LayerNorm_0/scale", "LayerNorm_0/bias", "LayerNorm_1/scale", "LayerNorm_1/bias",
    f"{_ATTN}/query/kernel", f"{_ATTN}/query/bias", f"{_ATTN}/key/kernel", f"{_ATTN}/key/bias",
    f"{_ATTN}/value/kernel", f"{_ATTN}/value/bias", f"{_ATTN}/out/kernel", f"{_ATTN}/out/bias",
    "MlpBlock_0/Dense_0/kernel", "MlpBlock_0/Dense_0/bias", "MlpBlock_0/Dense_1/kernel", "MlpBlock_0/Dense_1/bias",
)


def _shape(x: np.ndarray | None) -> tuple[int, ...]:
    return () if x is None else tuple(x.shape)


def _lead_one(keys: SourceKeys, key: str, x: np.ndarray | None, ndim: int) -> np.ndarray | None:
    """Drops big_vision's leading batch-of-one axis (`[1, N, D]` pos-embs, `[1, 1, D]` cls)."""
    if x is None:
        return None
    if x.ndim != ndim or x.shape[0] != 1:
        raise keys.fail(f"{key} has shape {tuple(x.shape)}; expected {ndim} axes with a leading 1")
    return x[0]


def _refuse(keys: SourceKeys, prefix: str, why: str) -> None:
    found = [k for k in keys.tensors if k.startswith(prefix + "/")]
    if found:
        raise keys.fail(f"{prefix} ({key_list(found, limit=3)}): {why}")


def _blocks(keys: SourceKeys, enc: str) -> list[dict[str, np.ndarray | None]]:
    """Per-block tensors from an unrolled (`encoderblock_{i}`) or scanned (`encoderblock`) encoder."""
    scanned = [k for k in keys.tensors if k.startswith(f"{enc}/encoderblock/")]
    pattern = re.compile(re.escape(enc) + r"/encoderblock_(\d+)/")
    indices = {int(m.group(1)) for k in keys.tensors if (m := pattern.match(k))}
    if scanned and indices:
        raise keys.fail(f"{enc} has both scanned (encoderblock/) and unrolled (encoderblock_N/) blocks")
    if not scanned:
        depth = max(indices) + 1 if indices else 1  # with no blocks, block 0's keys are reported missing
        return [{n: keys.take(f"{enc}/encoderblock_{i}/{n}") for n in _BLOCK_KEYS} for i in range(depth)]
    stacked = {n: keys.take(f"{enc}/encoderblock/{n}") for n in _BLOCK_KEYS}
    depths = {n: v.shape[0] if v.ndim else 0 for n, v in stacked.items() if v is not None}
    if len(set(depths.values())) > 1 or 0 in depths.values():
        raise keys.fail(f"{enc}/encoderblock: scanned tensors disagree on the layer axis ({depths})")
    depth = next(iter(depths.values()), 0)
    return [{n: None if v is None else v[i] for n, v in stacked.items()} for i in range(depth)]


def _encoder(keys: SourceKeys, enc: str, dst: str, out: dict[str, np.ndarray]) -> tuple[int, int, int]:
    """Maps the blocks of one tower into `out`; returns (depth, heads, mlp_dim) from block 0."""
    blocks = _blocks(keys, enc)
    for i, b in enumerate(blocks):
        o = f"{dst}/encoder/blocks/{i}"
        q, k, v = (b[f"{_ATTN}/{n}/kernel"] for n in ("query", "key", "value"))
        qb, kb, vb = (b[f"{_ATTN}/{n}/bias"] for n in ("query", "key", "value"))
        if all(x is not None for x in (q, k, v, qb, kb, vb)):
            if not (q.ndim == 3 and q.shape == k.shape == v.shape and qb.shape == kb.shape == vb.shape):
                raise keys.fail(f"{enc} block {i}: query/key/value shapes {q.shape}, {k.shape}, {v.shape} "
                                f"(biases {qb.shape}, {kb.shape}, {vb.shape}) are not three equal [D, H, Dh]")
            out[f"{o}/attn/qkv_kernel"] = np.stack([q, k, v], axis=1)  # (D, 3, H, Dh)
            out[f"{o}/attn/qkv_bias"] = np.stack([qb, kb, vb], axis=0)  # (3, H, Dh)
        names = {
            f"{_ATTN}/out/kernel": "attn/out_kernel", f"{_ATTN}/out/bias": "attn/out_bias",
            "LayerNorm_0/scale": "ln_1/scale", "LayerNorm_0/bias": "ln_1/bias",
            "LayerNorm_1/scale": "ln_2/scale", "LayerNorm_1/bias": "ln_2/bias",
            "MlpBlock_0/Dense_0/kernel": "mlp/fc1_kernel", "MlpBlock_0/Dense_0/bias": "mlp/fc1_bias",
            "MlpBlock_0/Dense_1/kernel": "mlp/fc2_kernel", "MlpBlock_0/Dense_1/bias": "mlp/fc2_bias",
        }
        for src_name, dst_name in names.items():
            if b[src_name] is not None:
                out[f"{o}/{dst_name}"] = b[src_name]
    first = blocks[0] if blocks else {}
    heads = _shape(first.get(f"{_ATTN}/query/kernel"))[1:2] or (0,)
    mlp = _shape(first.get("MlpBlock_0/Dense_0/kernel"))[1:2] or (0,)
    return len(blocks), heads[0], mlp[0]


def _leaves(keys: SourceKeys, src: str, dst: str, leaves: tuple[str, ...], out: dict[str, np.ndarray],
            join: str = "/") -> None:
    for leaf in leaves:
        x = keys.take(f"{src}/{leaf}")
        if x is not None:
            out[f"{dst}{join}{leaf}"] = x


def _require_head(keys: SourceKeys, tower: str, other: str) -> None:
    if not any(k.startswith(f"{tower}/head/") for k in keys.tensors):
        raise keys.fail(f"{tower}/head is missing: without a projection head the {tower} features are not in "
                        f"a joint space with the {other} features")


def _out_dim(out: dict[str, np.ndarray], key: str) -> int:
    return out[key].shape[-1] if key in out and out[key].ndim else 0


def _strip_params_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`params/img/...` -> `img/...`; keys outside `params/` are kept, so they show up as unexpected."""
    if not any(k.startswith("params/") for k in tensors):
        return tensors
    return {k.removeprefix("params/"): v for k, v in tensors.items()}


def _image_tower(keys: SourceKeys, out: dict[str, np.ndarray]) -> tuple[VisionConfig, int]:
    _refuse(keys, "img/MAPHead_0", "MAP (attention-pooling) heads, as in SigLIP image towers, are not supported")
    _refuse(keys, "img/pre_logits", "a pre_logits (rep_size) layer before the head is not supported")
    _require_head(keys, "img", "txt")
    kernel = keys.tensors.get("img/embedding/kernel")
    if kernel is not None and not (kernel.ndim == 4 and kernel.shape[0] == kernel.shape[1] and kernel.shape[2] == 3):
        raise keys.fail(f"img/embedding/kernel has shape {kernel.shape}; expected a square HWIO [P, P, 3, D] conv")
    patch, width = (kernel.shape[0], kernel.shape[3]) if kernel is not None else (1, 1)
    _leaves(keys, "img/embedding", "visual/patch", ("kernel", "bias"), out, join="_")

    cls = _lead_one(keys, "img/cls", keys.pop_optional("img/cls"), 3)
    if cls is not None:
        out["visual/class_embedding"] = cls.reshape(-1)
    for old in ("img/Transformer/pos_embedding", "img/Transformer/posembed_input/pos_embedding"):
        if old in keys.tensors and "img/pos_embedding" not in keys.tensors:  # pre-2022 locations (vit.load)
            keys.tensors["img/pos_embedding"] = keys.tensors.pop(old)
    if "img/pos_embedding" not in keys.tensors:
        raise keys.fail("img/pos_embedding is missing: a 'sincos2d' (unstored) position embedding is not "
                        "supported, since the image size it was computed for is not in the file")
    pos = _lead_one(keys, "img/pos_embedding", keys.take("img/pos_embedding"), 3)
    rows = pos.shape[0]
    grid, covers_cls = math.isqrt(rows), False
    if grid * grid != rows and cls is not None and rows > 1 and math.isqrt(rows - 1) ** 2 == rows - 1:
        grid, covers_cls = math.isqrt(rows - 1), True  # old layout: cls concatenated before the pos-emb add
    if grid * grid + int(covers_cls) != rows:
        raise keys.fail(f"img/pos_embedding has {rows} rows, not a square patch grid")
    out["visual/pos_embed"] = pos

    depth, heads, mlp = _encoder(keys, "img/Transformer", "visual", out)
    _leaves(keys, "img/Transformer/encoder_norm", "visual/ln_post", ("scale", "bias"), out)
    _leaves(keys, "img/head", "visual/proj", ("kernel", "bias"), out)
    vision = VisionConfig(
        image_size=grid * patch, patch_size=patch, width=width, depth=depth, heads=heads, mlp_dim=mlp,
        pool="tok" if cls is not None else "gap", class_token=cls is not None, pos_embed_covers_cls=covers_cls,
        ln_pre=False, patch_bias=True, proj_bias=True,
    )
    return vision, _out_dim(out, "visual/proj/kernel")


def _text_tower(keys: SourceKeys, out: dict[str, np.ndarray]) -> tuple[TextConfig, int]:
    _refuse(keys, "txt/MAPHead_0", "MAP (attention-pooling) text heads are not supported")
    _require_head(keys, "txt", "img")
    embed = keys.take("txt/Embed_0/embedding")
    if embed is not None:
        out["text/token_embed"] = embed
    pos = _lead_one(keys, "txt/pos_embedding", keys.take("txt/pos_embedding"), 3)
    extra = _lead_one(keys, "txt/Encoder_0/pos_embedding", keys.pop_optional("txt/Encoder_0/pos_embedding"), 3)
    if pos is not None and extra is not None:
        if extra.shape != pos.shape:
            raise keys.fail(f"txt/Encoder_0/pos_embedding {extra.shape} does not match txt/pos_embedding {pos.shape}")
        pos = pos + extra  # old checkpoints added the pos-emb twice; text_transformer.load merges them
    if pos is not None:
        out["text/pos_embed"] = pos
    depth, heads, mlp = _encoder(keys, "txt/Encoder_0", "text", out)
    _leaves(keys, "txt/Encoder_0/encoder_norm", "text/ln_final", ("scale", "bias"), out)
    _leaves(keys, "txt/head", "text/proj", ("kernel", "bias"), out)
    vocab, width = _shape(embed) if embed is not None and embed.ndim == 2 else (1, 1)
    text = TextConfig(
        vocab_size=vocab, context_length=_shape(pos)[0] if pos is not None else 1, width=width, depth=depth,
        heads=heads, mlp_dim=mlp, causal=False, pool="last", proj_bias=True,
    )
    return text, _out_dim(out, "text/proj/kernel")


def _scalar(keys: SourceKeys, key: str, x: np.ndarray | None) -> np.ndarray | None:
    if x is not None and x.size != 1:
        raise keys.fail(f"{key} has shape {tuple(x.shape)}; expected a single value")
    return None if x is None else x.reshape(())


def convert(src: pathlib.Path, activation: str | None = None,
            ln_eps: float | None = None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Reads a big_vision two-tower `.npz` and returns its config and canonical flat params."""
    src = pathlib.Path(src)
    source = str(src)
    tensors = _strip_params_prefix(read_tensors(src))
    if not any(k.startswith(("img/", "txt/")) for k in tensors):  # another layout altogether: say so, not a key
        raise CheckpointError(f"{source}: not a big_vision two-tower checkpoint (no img/ or txt/ parameters; its "
                              f"keys start {key_list(sorted(tensors)[:3])}): give the two-tower .npz big_vision "
                              "saves, or --from hf / open_clip / openai for those layouts")
    keys = SourceKeys(tensors, source, "a supported big_vision two-tower checkpoint")
    out: dict[str, np.ndarray] = {}
    vision, img_dim = _image_tower(keys, out)
    text, txt_dim = _text_tower(keys, out)
    out["logit_scale"] = _scalar(keys, "t", keys.take("t"))
    bias = _scalar(keys, "b", keys.pop_optional("b"))
    if bias is not None:
        out["logit_bias"] = bias
    keys.finish()  # from here on every expected key was present
    if img_dim != txt_dim:
        raise keys.fail(f"img/head outputs {img_dim} features but txt/head outputs {txt_dim}: the towers do not "
                        "share an embedding space")
    try:
        cfg = ModelConfig(vision=vision, text=text, embed_dim=img_dim,
                          activation=activation or DEFAULT_ACTIVATION,
                          ln_eps=DEFAULT_LN_EPS if ln_eps is None else ln_eps,
                          logit_bias=bias is not None).validate()
    except ConfigError as e:
        raise keys.fail(f"inferred architecture is invalid: {e}") from e
    return cfg, from_blocks(out, cfg, source)
