"""Shared tiny setup for the evaluation tests: a random tiny Llama over the GPT-2 vocabulary
and the GPT-2 tokenizer from ../shared, cached per process so compiled code is reused."""

import functools

from cot2align_jax.evaluation.protocol import SamplingSettings
from cot2align_jax.models import config_from_hf, create_model, load_tokenizer

# Prompt cut to its last 32 tokens, 6 new tokens: one width bucket, one compile per batch size.
TINY_SETTINGS = SamplingSettings(max_length=38, max_prompt_length=32, prompt_bucket=32)

TINY_LLAMA = dict(model_type="llama", vocab_size=50257, hidden_size=16, intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=50256,
                  eos_token_id=50256)


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0):
  return create_model(config_from_hf(TINY_LLAMA), seed)


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer(shared_path: str):
  return load_tokenizer(f"{shared_path}/tokenizers/gpt2")
