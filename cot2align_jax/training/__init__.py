"""Config, building the problem, mesh and sharding rules, train state, pure train/eval steps,
metrics, Orbax checkpoints, the loop, restoring runs."""
