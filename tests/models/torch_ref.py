"""Tiny random PyTorch `transformers` models used as the reference in parity tests.

Every family gets configs that exercise its switches (GQA, tied/untied heads, biases, sliding
windows, RoPE scaling, Gemma's norms). Weights are re-drawn with a larger scale than HF's
init so that the comparisons are not between near-zero numbers.
"""

from __future__ import annotations

import numpy as np

TINY = {
    "gpt2": dict(model_type="gpt2", vocab_size=101, n_embd=32, n_layer=2, n_head=4,
                 n_positions=64, bos_token_id=0, eos_token_id=1),
    "gpt2_inv_scale": dict(model_type="gpt2", vocab_size=61, n_embd=24, n_layer=2, n_head=2,
                           n_positions=32, n_inner=40, scale_attn_by_inverse_layer_idx=True,
                           activation_function="gelu", bos_token_id=0, eos_token_id=1),
    "llama_gqa_untied": dict(model_type="llama", vocab_size=97, hidden_size=32,
                             intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64,
                             rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                             eos_token_id=2, rms_norm_eps=1e-5),
    "smollm2_like_tied_llama3_rope": dict(
        model_type="llama", vocab_size=89, hidden_size=48, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
        rope_parameters=dict(rope_type="llama3", rope_theta=100000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16)),
    "mistral_sliding": dict(model_type="mistral", vocab_size=83, hidden_size=32,
                            intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=1, max_position_embeddings=64,
                            sliding_window=4, tie_word_embeddings=False, bos_token_id=1,
                            eos_token_id=2),
    "qwen2_bias_padded_vocab": dict(model_type="qwen2", vocab_size=128, hidden_size=32,
                                    intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64, rope_theta=1000000.0,
                                    tie_word_embeddings=False, bos_token_id=None,
                                    eos_token_id=100, rms_norm_eps=1e-6),
    "gemma3": dict(model_type="gemma3_text", vocab_size=96, hidden_size=32,
                   intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                   sliding_window=4, max_position_embeddings=64,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                "full_attention"],
                   rope_parameters={"full_attention": {"rope_type": "default",
                                                       "rope_theta": 1000000.0},
                                    "sliding_attention": {"rope_type": "default",
                                                          "rope_theta": 10000.0}},
                   bos_token_id=2, eos_token_id=1, pad_token_id=0),
    "gemma3_softcap": dict(model_type="gemma3_text", vocab_size=64, hidden_size=32,
                           intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=24,
                           sliding_window=3, final_logit_softcapping=5.0,
                           attn_logit_softcapping=8.0, max_position_embeddings=64,
                           bos_token_id=2, eos_token_id=1, pad_token_id=0),
}


def torch_model(name: str, seed: int = 0):
  """A randomly initialised transformers model for TINY[name] (float32, eval mode, eager)."""
  # optional test dependency: the PyTorch reference
  import torch
  import transformers

  spec = dict(TINY[name])
  model_type = spec.pop("model_type")
  cfg = transformers.AutoConfig.for_model(model_type, **spec)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in pname or pname.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        base = 0.0 if model_type == "gemma3_text" else 1.0
        p.copy_(base + 0.2 * noise)
      else:
        p.copy_(0.3 * noise)
  return model.float().eval()


def padded_batch(vocab: int, seed: int = 0, length: int = 12):
  """ids, mask [3, length]: a full row, a right-padded row (7 real) and a left-padded row
  (9 real); pad ids are arbitrary tokens so that masking, not the pad id, must do the work."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(3, length)).astype(np.int32)
  mask = np.ones((3, length), np.int32)
  mask[1, 7:] = 0
  mask[2, :length - 9] = 0
  return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
  return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)


def torch_forward(model, ids, mask, pos=None):
  """(logits, hidden_states) as numpy from a transformers model on a padded batch."""
  # optional test dependency: the PyTorch reference
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long),
                position_ids=torch.as_tensor(positions(mask) if pos is None else pos,
                                             dtype=torch.long),
                output_hidden_states=True)
  return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]
