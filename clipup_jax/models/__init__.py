"""Flax NNX modules of the CLIP towers."""

from clipup_jax.models.clip import CLIP, CLIPOutput

__all__ = ["CLIP", "CLIPOutput"]
