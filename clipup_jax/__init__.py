"""clipup_jax: sparse upcycling of CLIP into Mixture-of-Experts, in JAX/Flax."""

__version__ = "0.1.0"
