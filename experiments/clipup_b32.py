"""CLIP-UP ViT-B-32: the dense ViT-B-32 upcycled into 8 experts, top-2, every other block of both towers.

    clipup-train --config experiments/clipup_b32.py --workdir runs/clipup_b32 --config.init.checkpoint=ckpt/b32
"""

import ml_collections

from clipup_jax.config import preset
from clipup_jax.train.recipes import continued_training, sparse


def get_config() -> ml_collections.ConfigDict:
    return continued_training(sparse(preset("ViT-B-32")), expert_axis=8)
