"""The demo's CLIP-UP arm on its own: the tiny CLIP with MoE in every other block of both towers.

Upcycled from a dense parent when `--config.init.checkpoint=DIR` names one (e.g. out/demo/parent), else from scratch.
"""

import ml_collections

from clipup_jax.train.recipes import DEMO_MODEL, DEMO_PLAN, demo_config, sparse


def get_config() -> ml_collections.ConfigDict:
    return demo_config(sparse(DEMO_MODEL, DEMO_PLAN))
