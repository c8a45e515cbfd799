"""Architecture description shared by every decoder family.

One frozen, hashable dataclass describes GPT-2, the Llama family (Llama-2/TinyLlama, Mistral,
Qwen2/Qwen1.5, SmolLM2) and Gemma-3 text models. Families translate Hugging Face `config.json`
dictionaries to and from it (see `gpt2.py`, `llama.py`, `gemma3.py`); the decoder in
`transformer.py` reads only this class.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

FULL = "full_attention"
SLIDING = "sliding_attention"
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class ModelError(ValueError):
  """A checkpoint or configuration problem, reported in one line."""


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """Rotary embedding settings (Hugging Face `rope_parameters` for one layer type).

  rope_type: "default" | "linear" | "llama3" | "dynamic" (dynamic = default below the
  original context length; we do not grow it at run time, so it is treated as default).
  """

  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  partial_rotary_factor: float = 1.0

  @classmethod
  def from_hf(cls, params: dict[str, Any] | None, default_theta: float = 10000.0,
              partial_rotary_factor: float = 1.0) -> RopeSpec:
    """Builds a spec from an HF `rope_parameters` / legacy `rope_scaling` dict."""
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    supported = ("default", "linear", "llama3", "dynamic")
    if rope_type not in supported:
      raise ModelError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(supported)}")
    return cls(
        theta=float(params.get("rope_theta", default_theta)),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0) or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", 8192)),
        partial_rotary_factor=float(params.get("partial_rotary_factor", partial_rotary_factor)),
    )

  def to_hf(self) -> dict[str, Any]:
    """The HF `rope_parameters` dict for this spec."""
    out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
    if self.rope_type in ("linear", "llama3", "dynamic"):
      out["factor"] = self.factor
    if self.rope_type == "llama3":
      out.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                 original_max_position_embeddings=self.original_max_position_embeddings)
    if self.partial_rotary_factor != 1.0:
      out["partial_rotary_factor"] = self.partial_rotary_factor
    return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only LM.

  Shapes used throughout: vocab V = `vocab_size` (embedding rows, may exceed the tokenizer's
  length), model width D = `hidden_size`, H query heads and K key/value heads of size
  `head_dim`, MLP width F = `intermediate_size`.
  """

  family: str                      # "gpt2" | "llama" | "gemma3"
  model_type: str                  # the HF model_type written back on export
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  max_position_embeddings: int = 2048
  norm_eps: float = 1e-5
  norm_type: str = "rmsnorm"       # "rmsnorm" | "layernorm"
  norm_offset: float = 0.0         # Gemma scales by (offset + w); 1.0 there
  activation: str = "silu"
  gated_mlp: bool = True           # SwiGLU / GeGLU (gate, up, down) vs GPT-2 (up, down)
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  norm_bias: bool = False          # LayerNorm bias (GPT-2)
  qk_norm: bool = False            # per-head RMSNorm on q and k (Gemma-3)
  sandwich_norm: bool = False      # extra post-attention / post-MLP norms (Gemma-3)
  embed_scale: float | None = None  # multiply token embeddings (Gemma: sqrt(D))
  learned_positions: bool = False  # GPT-2 absolute position table
  layer_types: tuple[str, ...] = ()  # per layer: FULL or SLIDING; empty = all FULL
  sliding_window: int | None = None
  rope: tuple[tuple[str, RopeSpec], ...] = ((FULL, RopeSpec()),)  # per layer type
  attn_scale: float | None = None  # None: head_dim ** -0.5
  scale_attn_by_inverse_layer_idx: bool = False  # GPT-2 option
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  tie_word_embeddings: bool = True
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  valid_vocab_size: int | None = None  # tokens past this get logit -inf (padded vocabularies)
  dtype: str = "float32"           # compute dtype
  param_dtype: str = "float32"     # storage dtype of parameters
  remat: bool = False              # rematerialise each layer in the backward pass
  # LoRA (layers.py): rank 0 = off. With rank > 0 every projection named in `lora_targets`
  # ("q", "k", "v", "o", "gate", "up", "down") gets W + (alpha / rank) A @ B, and all base
  # weights are constants for autodiff (only the LoRAParam variables A, B are trained).
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_targets: tuple[str, ...] = ()
  # The source HF config (extra keys are written back on export). Not part of equality.
  hf_extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False,
                                               repr=False)

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ModelError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.layer_types and len(self.layer_types) != self.num_layers:
      raise ModelError(f"layer_types has {len(self.layer_types)} entries for "
                       f"{self.num_layers} layers")
    bad = set(self.lora_targets) - set(LORA_TARGETS)
    if self.lora_rank < 0 or bad:
      raise ModelError(f"bad LoRA settings: rank {self.lora_rank}, unknown target(s) "
                       f"{sorted(bad)} (known: {', '.join(LORA_TARGETS)})")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ModelError(f"{name}={getattr(self, name)!r} is not a dtype") from e

  def layer_type(self, i: int) -> str:
    return self.layer_types[i] if self.layer_types else FULL

  def rope_for(self, layer_type: str) -> RopeSpec:
    table = dict(self.rope)
    return table.get(layer_type, table.get(FULL, RopeSpec()))

  def window_for(self, i: int) -> int | None:
    """Sliding-window length of layer i (None = global attention)."""
    if self.sliding_window is None:
      return None
    if self.layer_types:
      return self.sliding_window if self.layer_types[i] == SLIDING else None
    return self.sliding_window

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

  def has_lora(self, target: str) -> bool:
    return self.lora_rank > 0 and target in self.lora_targets

  @property
  def scale(self) -> float:
    return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.head_dim)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def eos_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  def replace(self, **changes) -> ModelConfig:
    """A copy with fields changed (hf_extra carried over)."""
    return dataclasses.replace(self, **changes)
