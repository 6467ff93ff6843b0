"""Device meshes and expert parallelism (shard_map transports) for the MoE layers."""
