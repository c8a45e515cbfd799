"""The embedded demo: a complete cross-tokenizer distillation, offline, on a CPU
(`python -m cot2align_jax.demo`; stages.py: the stages, plots.py: the pictures, cli.py: flags)."""
