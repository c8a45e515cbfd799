"""Mesh and sharding rules, train state, pure train/eval steps, Orbax checkpoints, the loop."""
