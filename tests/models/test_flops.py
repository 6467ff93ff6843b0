"""FLOP and parameter counts against open_clip's published model profile (docs/model_profile.csv)."""

import pytest

from clipup_jax.models.param_tree import abstract_params, count_params
from clipup_jax.config import preset
from clipup_jax.models.flops import image_flops, text_flops

# model: (total Mparams, image Mparams, text Mparams, image GFLOPs, text GFLOPs), as open_clip lists them.
OPEN_CLIP_PROFILE = {
    "ViT-B-32": (151.28, 87.85, 63.43, 8.82, 5.96),
    "ViT-B-16": (149.62, 86.19, 63.43, 35.13, 5.96),
    "ViT-L-14": (427.62, 303.97, 123.65, 162.03, 13.3),
    "ViT-L-14-336": (427.94, 304.29, 123.65, 381.92, 13.3),
}


@pytest.mark.parametrize("name", sorted(OPEN_CLIP_PROFILE))
def test_presets_match_open_clip_profile(name):
    total, image, text, image_g, text_g = OPEN_CLIP_PROFILE[name]
    cfg = preset(name)
    params = abstract_params(cfg)
    assert count_params(params) / 1e6 == pytest.approx(total, abs=0.01)
    assert count_params({k: v for k, v in params.items() if k.startswith("visual/")}) / 1e6 == pytest.approx(image, abs=0.01)
    # open_clip counts the text tower with logit_scale and the shared scalars: compare to 0.01 M
    assert count_params({k: v for k, v in params.items() if not k.startswith("visual/")}) / 1e6 == pytest.approx(text, abs=0.01)
    assert image_flops(cfg) / 1e9 == pytest.approx(image_g, abs=0.01)
    assert text_flops(cfg) / 1e9 == pytest.approx(text_g, abs=0.01)


def test_tiny_text_by_hand():
    cfg = preset("tiny")  # text: L=16, W=40, M=80, depth 2; embed 24
    per_block = 2 * 16 * 40 * 160 + 4 * 16 * 16 * 40 + 4 * 16 * 40 * 80
    assert text_flops(cfg) == 2 * per_block + 2 * 40 * 24


def _sparse_tiny(**plan):
    import dataclasses

    from clipup_jax.config import MoEPlan

    cfg = preset("tiny")
    moe = MoEPlan(num_experts=4, top_k=2, layers="every_2", **plan)
    return cfg.replace(vision=dataclasses.replace(cfg.vision, moe=moe), text=dataclasses.replace(cfg.text, moe=moe))


def test_sparse_text_by_hand():
    """Block 1 is MoE: each token pays the router (W x E) and top_k = 2 expert MLPs."""
    from clipup_jax.models.flops import dense_equivalent

    cfg = _sparse_tiny()
    attention = 2 * 16 * 40 * 160 + 4 * 16 * 16 * 40
    mlp = 4 * 16 * 40 * 80
    router = 2 * 16 * 40 * 4
    assert text_flops(cfg) == 2 * attention + mlp + (2 * mlp + router) + 2 * 40 * 24
    assert text_flops(dense_equivalent(cfg)) == text_flops(preset("tiny"))
    assert image_flops(dense_equivalent(cfg)) == image_flops(preset("tiny"))


def test_sparse_image_expert_choice_by_hand():
    """Expert choice: each of the 4 experts takes C = 12 of the 17 tokens (ceil(2.0 * 17 / 4) = 9, rounded up to 12)."""
    cfg = _sparse_tiny(router="expert_choice")
    tokens, w, m = 17, 48, 96
    attention = 2 * tokens * w * 4 * w + 4 * tokens * tokens * w
    mlp_per_token = 4 * w * m
    patchify = 2 * 16 * 8 * 8 * 3 * w
    moe_block = 4 * 12 * mlp_per_token + 2 * tokens * w * 4  # 4 experts x 12 slots, plus the router
    want = patchify + 2 * attention + tokens * mlp_per_token + moe_block + 2 * w * 24
    assert image_flops(cfg) == want


def test_active_params_by_hand():
    from clipup_jax.checkpoints.summary import active_params

    cfg = _sparse_tiny()
    params = abstract_params(cfg)
    dense = count_params(abstract_params(preset("tiny")))
    expert = (48 * 96 + 96 + 96 * 48 + 48) + (40 * 80 + 80 + 80 * 40 + 40)  # one image + one text expert MLP
    routers = 48 * 4 + 40 * 4
    assert count_params(params) == dense + 3 * expert + routers
    assert active_params(cfg, params) == dense + expert + routers  # 2 of 4 experts per token: one more than dense
