"""KD divergences, cross-tokenizer KD, optimal transport (ott-jax), projectors, and the methods
registry with the CoT2Align objective (losses/methods/)."""
