"""CLIP-UP ViT-L-14: the dense ViT-L-14 upcycled into 8 experts, top-2, every other block of both towers.

    clipup-train --config experiments/clipup_l14.py --workdir runs/clipup_l14 --config.init.checkpoint=ckpt/l14
"""

import ml_collections

from clipup_jax.config import preset
from clipup_jax.train.recipes import continued_training, sparse


def get_config() -> ml_collections.ConfigDict:
    return continued_training(sparse(preset("ViT-L-14")), expert_axis=8)
