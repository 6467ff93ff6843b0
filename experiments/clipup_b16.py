"""CLIP-UP ViT-B-16: the dense ViT-B-16 upcycled into 8 experts, top-2, every other block of both towers.

    clipup-train --config experiments/clipup_b16.py --workdir runs/clipup_b16 --config.init.checkpoint=ckpt/b16
"""

import ml_collections

from clipup_jax.config import preset
from clipup_jax.train.recipes import continued_training, sparse


def get_config() -> ml_collections.ConfigDict:
    return continued_training(sparse(preset("ViT-B-16")), expert_axis=8)
