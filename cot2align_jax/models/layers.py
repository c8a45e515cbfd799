"""Building blocks of the decoders: parameters with logical axes, norms, RoPE, attention, MLPs.

Logical axis names (mapped to mesh axes by the training code's sharding rules):
  vocab, embed, heads, kv_heads, head_dim, mlp, position.
Every reduction that matters numerically (norm statistics, attention softmax) runs in float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cot2align_jax.models.config import ModelConfig, RopeSpec

F32 = jnp.float32
NEG_INF = float(np.finfo(np.float32).min)


def param(rngs: nnx.Rngs, init: str, shape: tuple[int, ...], axes: tuple[str, ...],
          dtype, std: float = 0.02) -> nnx.Param:
  """A parameter annotated with logical axis names (sharded later, never eagerly).

  init: "normal" (N(0, std)), "zeros" or "ones".
  """
  if len(shape) != len(axes):
    raise ValueError(f"shape {shape} and axes {axes} differ in rank")
  if init == "normal":
    value = std * jax.random.normal(rngs.params(), shape, F32)
  elif init == "zeros":
    value = jnp.zeros(shape, F32)
  elif init == "ones":
    value = jnp.ones(shape, F32)
  else:
    raise ValueError(f"unknown init {init!r}")
  return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


def activation(name: str):
  """HF `hidden_act` name -> function."""
  table = {
      "silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu,
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
  }
  if name not in table:
    raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(table))}")
  return table[name]


class Norm(nnx.Module):
  """RMSNorm (Llama/Gemma) or LayerNorm (GPT-2) over the last axis, statistics in float32.

  RMSNorm: y = x / sqrt(mean(x^2) + eps) * (offset + scale); Gemma uses offset 1 with scale
  initialised at 0, Llama offset 0 with scale at 1. LayerNorm: (x - mean) / sqrt(var + eps) *
  scale + bias.
  """

  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs, axis_name: str = "embed"):
    self.kind = cfg.norm_type
    self.eps = cfg.norm_eps
    self.offset = cfg.norm_offset
    self.scale = param(rngs, "zeros" if cfg.norm_offset else "ones", (dim,), (axis_name,),
                       cfg.weight_dtype)
    self.bias = (param(rngs, "zeros", (dim,), (axis_name,), cfg.weight_dtype)
                 if cfg.norm_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(F32)
    if self.kind == "layernorm":
      mean = x.mean(-1, keepdims=True)
      var = jnp.square(x - mean).mean(-1, keepdims=True)
      y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    else:
      y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
    y = y * (self.offset + self.scale[...].astype(F32))
    if self.bias is not None:
      y = y + self.bias[...].astype(F32)
    return y.astype(dtype)


def rope_inv_freq(spec: RopeSpec, head_dim: int) -> np.ndarray:
  """Inverse frequencies [rot_dim // 2] in float32, following HF's rope initialisers."""
  rot_dim = int(head_dim * spec.partial_rotary_factor)
  exponent = np.arange(0, rot_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rot_dim)
  inv = (1.0 / (np.float32(spec.theta) ** exponent)).astype(np.float32)
  if spec.rope_type == "linear":
    inv = inv / np.float32(spec.factor)
  elif spec.rope_type == "llama3":
    old = spec.original_max_position_embeddings
    low_wavelen = old / spec.low_freq_factor
    high_wavelen = old / spec.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / spec.factor, inv)
    smooth = (old / wavelen - spec.low_freq_factor) / (spec.high_freq_factor -
                                                      spec.low_freq_factor)
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def rope_tables(positions: jax.Array, spec: RopeSpec, head_dim: int, dtype):
  """cos, sin of shape [batch, seq, rot_dim] for integer positions [batch, seq]."""
  inv = jnp.asarray(rope_inv_freq(spec, head_dim))
  freqs = positions.astype(F32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE on x [batch, seq, heads, head_dim]; cos/sin [batch, seq, rot_dim]."""
  rot = cos.shape[-1]
  x_rot, x_pass = x[..., :rot], x[..., rot:]
  half = rot // 2
  rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  out = x_rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


class LayerCache(NamedTuple):
  """Keys and values of one layer for all cache slots: [batch, slots, kv_heads, head_dim]."""
  k: jax.Array
  v: jax.Array


def attention_mask(key_mask: jax.Array, q_slots: jax.Array, window: int | None) -> jax.Array:
  """Which keys each query may see: [batch, 1, 1, q_len, k_len] booleans.

  key_mask: [batch, k_len] true for real tokens; q_slots: [q_len] the cache slot (= index in the
  padded sequence) of each query. Causal by slot; with `window`, keys less than `window` slots
  back only (HF's sliding window: kv > q - window). Left padding shifts a row's queries and keys
  by the same amount, so slot distance equals position distance for real tokens.
  """
  k_slots = jnp.arange(key_mask.shape[-1])
  allowed = k_slots[None, :] <= q_slots[:, None]
  if window is not None:
    allowed &= (q_slots[:, None] - k_slots[None, :]) < window
  allowed = allowed[None] & key_mask[:, None, :].astype(bool)
  return allowed[:, None, None, :, :]


class Attention(nnx.Module):
  """Multi-head attention with grouped KV heads, optional q/k norms and RoPE."""

  def __init__(self, cfg: ModelConfig, layer_idx: int, rngs: nnx.Rngs):
    d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    wd = cfg.weight_dtype
    self.cfg = cfg
    self.layer_idx = layer_idx
    self.q = param(rngs, "normal", (d, h, hd), ("embed", "heads", "head_dim"), wd)
    self.k = param(rngs, "normal", (d, k, hd), ("embed", "kv_heads", "head_dim"), wd)
    self.v = param(rngs, "normal", (d, k, hd), ("embed", "kv_heads", "head_dim"), wd)
    self.o = param(rngs, "normal", (h, hd, d), ("heads", "head_dim", "embed"), wd)
    if cfg.qkv_bias:
      self.q_bias = param(rngs, "zeros", (h, hd), ("heads", "head_dim"), wd)
      self.k_bias = param(rngs, "zeros", (k, hd), ("kv_heads", "head_dim"), wd)
      self.v_bias = param(rngs, "zeros", (k, hd), ("kv_heads", "head_dim"), wd)
    self.o_bias = param(rngs, "zeros", (d,), ("embed",), wd) if cfg.o_bias else None
    if cfg.qk_norm:
      self.q_norm = Norm(hd, cfg, rngs, axis_name="head_dim")
      self.k_norm = Norm(hd, cfg, rngs, axis_name="head_dim")
    scale = cfg.scale
    if cfg.scale_attn_by_inverse_layer_idx:
      scale /= float(layer_idx + 1)
    self.scale = scale

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None,
               mask: jax.Array, cache: LayerCache | None = None,
               cache_index: jax.Array | None = None):
    """x: [batch, seq, embed]; mask: [batch, 1, 1, seq, keys] from `attention_mask`.

    With a cache, the new keys/values are written at slots [cache_index, cache_index + seq) and
    attention runs over every slot of the cache. Returns (output [batch, seq, embed], cache).
    """
    cfg = self.cfg
    dt = x.dtype
    q = jnp.einsum("btd,dhk->bthk", x, self.q[...].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x, self.k[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x, self.v[...].astype(dt))
    if cfg.qkv_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if cache is not None:
      start = (0, cache_index, 0, 0)
      cache = LayerCache(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
                         jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start))
      k, v = cache.k.astype(dt), cache.v.astype(dt)
    b, t, h, hd = q.shape
    groups = h // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, groups, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=F32) * self.scale
    if cfg.attn_logit_softcapping:
      cap = cfg.attn_logit_softcapping
      scores = jnp.tanh(scores / cap) * cap
    scores = jnp.where(mask, scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, hd)
    out = jnp.einsum("bthk,hkd->btd", out, self.o[...].astype(dt))
    if self.o_bias is not None:
      out = out + self.o_bias[...].astype(dt)
    return out, cache


class MLP(nnx.Module):
  """Gated (down(act(gate x) * up x)) or plain (down(act(up x))) feed-forward block."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f, wd = cfg.hidden_size, cfg.intermediate_size, cfg.weight_dtype
    self.gated = cfg.gated_mlp
    self.act = activation(cfg.activation)
    if cfg.gated_mlp:
      self.gate = param(rngs, "normal", (d, f), ("embed", "mlp"), wd)
    self.up = param(rngs, "normal", (d, f), ("embed", "mlp"), wd)
    self.down = param(rngs, "normal", (f, d), ("mlp", "embed"), wd)
    if cfg.mlp_bias:
      if cfg.gated_mlp:
        self.gate_bias = param(rngs, "zeros", (f,), ("mlp",), wd)
      self.up_bias = param(rngs, "zeros", (f,), ("mlp",), wd)
      self.down_bias = param(rngs, "zeros", (d,), ("embed",), wd)
    self.has_bias = cfg.mlp_bias

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, seq, embed] -> [batch, seq, embed]."""
    dt = x.dtype
    up = x @ self.up[...].astype(dt)
    if self.has_bias:
      up = up + self.up_bias[...].astype(dt)
    if self.gated:
      gate = x @ self.gate[...].astype(dt)
      if self.has_bias:
        gate = gate + self.gate_bias[...].astype(dt)
      hidden = self.act(gate) * up
    else:
      hidden = self.act(up)
    out = hidden @ self.down[...].astype(dt)
    if self.has_bias:
      out = out + self.down_bias[...].astype(dt)
    return out
