"""The decoder: one NNX module covering GPT-2, the Llama family and Gemma-3.

Call it with token ids and get float32 logits plus the hidden states a KD loss needs:

    out = model(input_ids, attention_mask)          # ids, mask: [batch, seq]
    out.logits                                      # [batch, seq, vocab] float32
    out.hidden_states[0], out.hidden_states[-1]     # embedding output, final normed state

`hidden_states` follows Hugging Face: index 0 is the embedding output (token embedding, times
the Gemma scale, plus GPT-2's position embedding), index -1 the final state after the last norm.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cot2align_jax.models.config import ModelConfig
from cot2align_jax.models.layers import (F32, MLP, Attention, LayerCache, Norm, param, read,
                                         rope_tables)
from cot2align_jax.models.layers import attention_mask as build_mask


class KVCache(NamedTuple):
  """Per-layer keys/values for `slots` positions and the next slot to write (int32 scalar)."""
  layers: tuple[LayerCache, ...]
  index: jax.Array

  @property
  def num_slots(self) -> int:
    return self.layers[0].k.shape[1]


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=None) -> KVCache:
  """An empty cache: every layer [batch, slots, kv_heads, head_dim], index 0."""
  dtype = dtype or cfg.compute_dtype
  shape = (batch, slots, cfg.num_kv_heads, cfg.head_dim)
  layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                 for _ in range(cfg.num_layers))
  return KVCache(layers, jnp.zeros((), jnp.int32))


class ModelOutput(NamedTuple):
  logits: jax.Array | None                 # [batch, seq (or 1), vocab] float32
  hidden_states: tuple[jax.Array, ...]     # each [batch, seq, embed]
  cache: KVCache | None


class Block(nnx.Module):
  """Pre-norm residual block: x + [post_norm](attn(norm x)); then the same with the MLP."""

  def __init__(self, cfg: ModelConfig, layer_idx: int, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.attn_norm = Norm(d, cfg, rngs)
    self.attn = Attention(cfg, layer_idx, rngs)
    self.mlp_norm = Norm(d, cfg, rngs)
    self.mlp = MLP(cfg, rngs)
    self.sandwich = cfg.sandwich_norm
    if cfg.sandwich_norm:
      self.post_attn_norm = Norm(d, cfg, rngs)
      self.post_mlp_norm = Norm(d, cfg, rngs)

  def __call__(self, x, rope, mask, cache=None, cache_index=None):
    h, cache = self.attn(self.attn_norm(x), rope, mask, cache, cache_index)
    if self.sandwich:
      h = self.post_attn_norm(h)
    x = x + h
    h = self.mlp(self.mlp_norm(x))
    if self.sandwich:
      h = self.post_mlp_norm(h)
    return x + h, cache


def _positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position ids [batch, seq] counting real tokens only (0 at the first real token)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


class Transformer(nnx.Module):
  """A decoder-only LM described by a `ModelConfig`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    wd = cfg.weight_dtype
    self.embed = param(rngs, "normal", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), wd)
    if cfg.learned_positions:
      self.pos_embed = param(rngs, "normal", (cfg.max_position_embeddings, cfg.hidden_size),
                             ("position", "embed"), wd)
    self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.num_layers)])
    self.final_norm = Norm(cfg.hidden_size, cfg, rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = param(rngs, "normal", (cfg.hidden_size, cfg.vocab_size),
                           ("embed", "vocab"), wd)
    # LoRA factors last, so the base weights equal those of the same seed without LoRA.
    if cfg.lora_rank:
      for block in self.layers:
        block.attn.add_lora(rngs)
        block.mlp.add_lora(rngs)

  def embed_tokens(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """Embedding output (HF hidden_states[0]): [batch, seq] ids -> [batch, seq, embed]."""
    cfg = self.config
    dt = cfg.compute_dtype
    frozen = cfg.lora_rank > 0
    x = jnp.take(read(self.embed, frozen), input_ids, axis=0).astype(dt)
    if cfg.embed_scale is not None:
      x = x * jnp.asarray(cfg.embed_scale, F32).astype(dt)
    if cfg.learned_positions:
      x = x + jnp.take(read(self.pos_embed, frozen), positions, axis=0).astype(dt)
    return x

  def output_matrix(self) -> jax.Array:
    """The LM head as [embed, vocab] (the embedding transposed when tied)."""
    frozen = self.config.lora_rank > 0
    if self.config.tie_word_embeddings:
      return read(self.embed, frozen).T
    return read(self.lm_head, frozen)

  def logits(self, h: jax.Array) -> jax.Array:
    """Final normed states [batch, seq, embed] -> float32 logits [batch, seq, vocab]."""
    cfg = self.config
    w = self.output_matrix().astype(h.dtype)
    logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=F32)
    if cfg.final_logit_softcapping:
      cap = cfg.final_logit_softcapping
      logits = jnp.tanh(logits / cap) * cap
    if cfg.valid_vocab_size is not None and cfg.valid_vocab_size < cfg.vocab_size:
      keep = jnp.arange(cfg.vocab_size) < cfg.valid_vocab_size
      logits = jnp.where(keep, logits, -jnp.inf)
    return logits

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None, *, cache: KVCache | None = None,
               hidden_states: str | Sequence[int] = "ends",
               logits: str = "all") -> ModelOutput:
    """Runs the decoder.

    Args:
      input_ids: [batch, seq] int token ids (padding anywhere the mask is 0).
      attention_mask: [batch, seq] (1 = real token), or [batch, slots] over the whole cache when
        `cache` is given. Default: all ones.
      position_ids: [batch, seq]; default: count of real tokens before each position, so left-
        and right-padded rows get the positions their unpadded version would.
      cache: a `KVCache`; the tokens are written at slots [cache.index, cache.index + seq).
      hidden_states: "ends" -> (embedding output, final normed state); "all" -> all
        num_layers + 1 states as in HF (the last one normed); "none" -> (); or a sequence of
        HF hidden-state indices (0 .. num_layers).
      logits: "all" (every position), "last" (only the last position, for generation) or
        "none" (skip the LM head).

    Returns:
      ModelOutput(logits float32, hidden_states, cache with index advanced by seq).
    """
    cfg = self.config
    b, t = input_ids.shape
    if cache is None:
      key_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
      cache_index = jnp.zeros((), jnp.int32)
    else:
      slots = cache.num_slots
      key_mask = (jnp.ones((b, slots), bool) if attention_mask is None
                  else attention_mask.astype(bool))
      cache_index = cache.index
    if position_ids is None:
      all_pos = _positions_from_mask(key_mask)
      position_ids = jax.lax.dynamic_slice_in_dim(all_pos, cache_index, t, axis=1)
    q_slots = cache_index + jnp.arange(t)

    masks = {w: build_mask(key_mask, q_slots, w)
             for w in {cfg.window_for(i) for i in range(cfg.num_layers)}}
    ropes = {}
    if not cfg.learned_positions:
      for i in range(cfg.num_layers):
        spec = cfg.rope_for(cfg.layer_type(i))
        if spec not in ropes:
          ropes[spec] = rope_tables(position_ids, spec, cfg.head_dim, cfg.compute_dtype)

    x = self.embed_tokens(input_ids, position_ids)
    want = self._wanted_states(hidden_states)
    states = {0: x} if 0 in want else {}
    new_layers = []
    for i, layer in enumerate(self.layers):
      rope = None if cfg.learned_positions else ropes[cfg.rope_for(cfg.layer_type(i))]
      layer_cache = None if cache is None else cache.layers[i]
      call = _remat_block if cfg.remat else _call_block
      x, layer_cache = call(layer, x, rope, masks[cfg.window_for(i)], layer_cache, cache_index)
      new_layers.append(layer_cache)
      if i + 1 in want and i + 1 < cfg.num_layers:
        states[i + 1] = x
    h = self.final_norm(x)
    if cfg.num_layers in want:
      states[cfg.num_layers] = h
    new_cache = None if cache is None else KVCache(tuple(new_layers), cache.index + t)
    if logits == "all":
      out_logits = self.logits(h)
    elif logits == "last":
      out_logits = self.logits(h[:, -1:])
    elif logits == "none":
      out_logits = None
    else:
      raise ValueError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
    return ModelOutput(out_logits, tuple(states[k] for k in sorted(states)), new_cache)

  def _wanted_states(self, spec) -> tuple[int, ...]:
    n = self.config.num_layers
    if isinstance(spec, str):
      table = {"ends": (0, n), "all": tuple(range(n + 1)), "none": ()}
      if spec not in table:
        raise ValueError(f"hidden_states must be 'ends', 'all', 'none' or indices, got {spec!r}")
      return table[spec]
    idx = tuple(sorted({int(i) % (n + 1) for i in spec}))
    return idx


def _call_block(layer, x, rope, mask, cache, cache_index):
  return layer(x, rope, mask, cache, cache_index)


@nnx.remat
def _remat_block(layer, x, rope, mask, cache, cache_index):
  return layer(x, rope, mask, cache, cache_index)
