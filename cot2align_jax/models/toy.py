"""Small randomly initialised decoders for the toy problems (the tiny test problem, the demo).

    s_cfg = tiny_student_config(len(student_tok))      # 2-layer Qwen2-like, d 32
    t_cfg = tiny_teacher_config(len(teacher_tok))      # 2-layer Llama-like, d 48
    cfg = toy_config("llama", vocab_size=400, hidden_size=128, num_layers=4, num_heads=4,
                     num_kv_heads=2, intermediate_size=384)

"qwen2" = RMSNorm, SwiGLU, RoPE, q/k/v biases (so the weight-decay mask has biases to exclude),
tied embeddings; "llama" = no biases, untied LM head. Vocabularies are rounded up to a multiple
of 8; head_dim = hidden_size // num_heads.
"""

from __future__ import annotations

from typing import Literal

from cot2align_jax.models.config import ModelConfig


def round8(n: int) -> int:
  """`n` rounded up to a multiple of 8."""
  return (n + 7) // 8 * 8


def toy_config(model_type: Literal["llama", "qwen2"], *, vocab_size: int, hidden_size: int,
               num_layers: int, num_heads: int, num_kv_heads: int, intermediate_size: int,
               eos_token_id: int = 1, pad_token_id: int = 0,
               valid_vocab_size: int | None = None) -> ModelConfig:
  """A Llama-family ModelConfig ("llama" or "qwen2", see the module doc) over `vocab_size`
  tokens (rounded up to a multiple of 8), 256 positions."""
  qwen2 = model_type == "qwen2"
  return ModelConfig(family="llama", model_type=model_type, vocab_size=round8(vocab_size),
                     hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads,
                     intermediate_size=intermediate_size, max_position_embeddings=256,
                     qkv_bias=qwen2, tie_word_embeddings=qwen2, eos_token_id=eos_token_id,
                     pad_token_id=pad_token_id, valid_vocab_size=valid_vocab_size)


def tiny_student_config(vocab_size: int, d: int = 32, layers: int = 2) -> ModelConfig:
  """The tiny problem's Qwen2-like student: 2 heads (2 KV heads), MLP width 2·d."""
  return toy_config("qwen2", vocab_size=vocab_size, hidden_size=d, num_layers=layers,
                    num_heads=2, num_kv_heads=2, intermediate_size=2 * d)


def tiny_teacher_config(vocab_size: int, d: int = 48, layers: int = 2) -> ModelConfig:
  """The tiny problem's Llama-like teacher: 4 query heads over 2 KV heads, MLP width 2·d."""
  return toy_config("llama", vocab_size=vocab_size, hidden_size=d, num_layers=layers,
                    num_heads=4, num_kv_heads=2, intermediate_size=2 * d)
