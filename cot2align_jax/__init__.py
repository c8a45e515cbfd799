"""cot2align_jax: cross-tokenizer knowledge distillation (CoT2Align and baselines) in JAX/Flax."""

__version__ = "0.1.0"
