"""Tiny dense CLIP on the embedded synthetic data set: the parent model of `clipup-demo`."""

import ml_collections

from clipup_jax.train.recipes import demo_config


def get_config() -> ml_collections.ConfigDict:
    return demo_config()
