"""FLOP and parameter counts against open_clip's published model profile (docs/model_profile.csv)."""

import pytest

from clipup_jax.checkpoints.params import abstract_params, count_params
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
