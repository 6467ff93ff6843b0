"""Dense ViT-B/16 CLIP, continued for the same steps as CLIP-UP: the baseline it is compared with."""

import ml_collections

from clipup_jax.train.recipes import continued_training


def get_config() -> ml_collections.ConfigDict:
    config = continued_training("ViT-B-16")
    config.mesh.fsdp = 8
    return config
