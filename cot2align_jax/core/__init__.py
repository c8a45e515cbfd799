"""The lowest layer: the batch contract, shared numerics, paths and the command-line helpers."""
