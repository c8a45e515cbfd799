"""KD divergences, cross-tokenizer KD, optimal transport (ott-jax), the CoT2Align objective."""
