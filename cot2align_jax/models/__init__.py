"""Flax NNX decoders (GPT-2, Llama family, Gemma-3), HF/GGUF loading, HF export, generation."""

from cot2align_jax.models.config import FULL, SLIDING, ModelConfig, ModelError, RopeSpec
from cot2align_jax.models.hf import (config_from_hf, config_to_hf, create_model, from_pretrained,
                                     load_tokenizer, params_of, save_pretrained)
from cot2align_jax.models.transformer import KVCache, ModelOutput, Transformer, init_cache

__all__ = [
    "FULL", "SLIDING", "KVCache", "ModelConfig", "ModelError", "ModelOutput", "RopeSpec",
    "Transformer", "config_from_hf", "config_to_hf", "create_model", "from_pretrained",
    "init_cache", "load_tokenizer", "params_of", "save_pretrained",
]
