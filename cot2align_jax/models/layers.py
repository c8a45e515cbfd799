"""Building blocks of the decoders: parameters with logical axes, norms, RoPE, attention, MLPs.

Logical axis names (mapped to mesh axes by the training code's sharding rules):
  vocab, embed, heads, kv_heads, head_dim, mlp, position.
Every reduction that matters numerically (norm statistics, attention softmax) runs in float32.

LoRA (cfg.lora_rank > 0): each projection W named in cfg.lora_targets gets `LoRAParam` factors
`<name>_lora_a` [*in, r] (uniform ±1/sqrt(fan_in), PEFT's kaiming_uniform(a=√5)) and
`<name>_lora_b` [r, *out] (zeros), and computes x W + (alpha / r) (x A) B; every other
parameter is read through `jax.lax.stop_gradient` (frozen: its gradient is a symbolic zero, so
no weight gradient is computed). `merge_lora` folds the factors into W (export). No LoRA dropout.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cot2align_jax.core.numerics import F32
from cot2align_jax.models.config import ModelConfig, RopeSpec

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


class LoRAParam(nnx.Param):
  """A LoRA factor (A or B); a distinct Param type so optimizers and filters can select it."""


def read(var: nnx.Variable, frozen: bool) -> jax.Array:
  """var[...], a constant for autodiff when `frozen` (base weights of a LoRA model)."""
  x = var[...]
  return jax.lax.stop_gradient(x) if frozen else x


def lora_pair(rngs: nnx.Rngs, cfg: ModelConfig, in_shape: tuple[int, ...],
              in_axes: tuple, out_shape: tuple[int, ...], out_axes: tuple):
  """(A [*in, r], B [r, *out]) LoRA factors with logical axes (rank axis unsharded)."""
  r, wd = cfg.lora_rank, cfg.weight_dtype
  bound = 1.0 / math.sqrt(math.prod(in_shape))
  a = jax.random.uniform(rngs.params(), (*in_shape, r), F32, -bound, bound)
  return (LoRAParam(a.astype(wd), out_sharding=(*in_axes, None), eager_sharding=False),
          LoRAParam(jnp.zeros((r, *out_shape), wd), out_sharding=(None, *out_axes),
                    eager_sharding=False))


def lora_delta(module: nnx.Module, name: str, x: jax.Array, n_in: int, scale: float):
  """scale (x A) B for `module.<name>_lora_{a,b}`: x's last n_in axes contract with A's first."""
  dt = x.dtype
  h = jnp.tensordot(x, getattr(module, f"{name}_lora_a")[...].astype(dt), axes=n_in)
  h = h * jnp.asarray(scale, dt)
  return jnp.tensordot(h, getattr(module, f"{name}_lora_b")[...].astype(dt), axes=1)


def merge_lora(flat: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
  """A flat {path: array} params dict with every `<W>_lora_a/_lora_b` pair folded into W
  (W + scale A @ B, computed in float32, cast to W's dtype) and removed."""
  out = {k: v for k, v in flat.items() if "_lora_" not in k.rsplit("/", 1)[-1]}
  for key in flat:
    if key.endswith("_lora_a"):
      base = key[:-len("_lora_a")]
      a = np.asarray(flat[key], np.float32)
      b = np.asarray(flat[base + "_lora_b"], np.float32)
      w = out[base]
      out[base] = (np.asarray(w, np.float32) + scale * np.tensordot(a, b, axes=1)).astype(w.dtype)
  return out


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
    self.frozen = cfg.lora_rank > 0
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
    y = y * (self.offset + read(self.scale, self.frozen).astype(F32))
    if self.bias is not None:
      y = y + read(self.bias, self.frozen).astype(F32)
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
    self.frozen = cfg.lora_rank > 0
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
    q = self._proj("q", "btd,dhk->bthk", x, 1)
    k = self._proj("k", "btd,dhk->bthk", x, 1)
    v = self._proj("v", "btd,dhk->bthk", x, 1)
    if cfg.qkv_bias:
      q = q + read(self.q_bias, self.frozen).astype(dt)
      k = k + read(self.k_bias, self.frozen).astype(dt)
      v = v + read(self.v_bias, self.frozen).astype(dt)
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
    out = self._proj("o", "bthk,hkd->btd", out, 2)
    if self.o_bias is not None:
      out = out + read(self.o_bias, self.frozen).astype(dt)
    return out, cache

  def add_lora(self, rngs: nnx.Rngs) -> None:
    """Creates the LoRA factors of cfg.lora_targets among q, k, v, o."""
    cfg = self.cfg
    d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {"q": ((d,), ("embed",), (h, hd), ("heads", "head_dim")),
              "k": ((d,), ("embed",), (k, hd), ("kv_heads", "head_dim")),
              "v": ((d,), ("embed",), (k, hd), ("kv_heads", "head_dim")),
              "o": ((h, hd), ("heads", "head_dim"), (d,), ("embed",))}
    for name, spec in shapes.items():
      if cfg.has_lora(name):
        a, b = lora_pair(rngs, cfg, *spec)
        setattr(self, f"{name}_lora_a", a)
        setattr(self, f"{name}_lora_b", b)

  def _proj(self, name: str, eq: str, x: jax.Array, n_in: int) -> jax.Array:
    y = jnp.einsum(eq, x, read(getattr(self, name), self.frozen).astype(x.dtype))
    if self.cfg.has_lora(name):
      y = y + lora_delta(self, name, x, n_in, self.cfg.lora_scale)
    return y


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
    self.cfg = cfg
    self.frozen = cfg.lora_rank > 0

  def add_lora(self, rngs: nnx.Rngs) -> None:
    """Creates the LoRA factors of cfg.lora_targets among gate, up, down."""
    cfg = self.cfg
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {"gate": ((d,), ("embed",), (f,), ("mlp",)),
              "up": ((d,), ("embed",), (f,), ("mlp",)),
              "down": ((f,), ("mlp",), (d,), ("embed",))}
    for name, spec in shapes.items():
      if cfg.has_lora(name) and (name != "gate" or self.gated):
        a, b = lora_pair(rngs, cfg, *spec)
        setattr(self, f"{name}_lora_a", a)
        setattr(self, f"{name}_lora_b", b)

  def _proj(self, name: str, x: jax.Array) -> jax.Array:
    y = x @ read(getattr(self, name), self.frozen).astype(x.dtype)
    if self.cfg.has_lora(name):
      y = y + lora_delta(self, name, x, 1, self.cfg.lora_scale)
    if self.has_bias:
      y = y + read(getattr(self, f"{name}_bias"), self.frozen).astype(x.dtype)
    return y

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, seq, embed] -> [batch, seq, embed]."""
    up = self._proj("up", x)
    hidden = self.act(self._proj("gate", x)) * up if self.gated else self.act(up)
    return self._proj("down", hidden)
