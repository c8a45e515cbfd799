"""The Llama family: Llama-2 / TinyLlama, Mistral, Qwen2 / Qwen1.5 and SmolLM2.

Same block for all: RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU MLP. Differences
are config switches: q/k/v biases (Qwen2, Llama's `attention_bias`), a sliding window (Mistral,
Qwen2 layers past `max_window_layers`), tied or untied heads (SmolLM2 ties).
"""

from __future__ import annotations

from cot2align_jax.models.config import FULL, ModelConfig, RopeSpec
from cot2align_jax.models.families import (TensorSource, common_hf_fields, heads_in, heads_out,
                                           linear_in, linear_out, token_ids)

MODEL_TYPES = ("llama", "mistral", "qwen2")


def rope_from_hf(hf: dict) -> RopeSpec:
  """RopeSpec from `rope_parameters` (v5) or legacy `rope_theta` + `rope_scaling`."""
  params = hf.get("rope_parameters")
  if not params:
    params = dict(hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
  return RopeSpec.from_hf(params, partial_rotary_factor=hf.get("partial_rotary_factor", 1.0))


def config_from_hf(hf: dict) -> ModelConfig:
  mt = hf["model_type"]
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  attention_bias = bool(hf.get("attention_bias", False))
  layer_types = tuple(hf.get("layer_types") or ())
  window = hf.get("sliding_window")
  if mt == "qwen2" and not hf.get("use_sliding_window", False):
    window = None
  return ModelConfig(
      family="llama", model_type=mt,
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
      intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      norm_eps=hf.get("rms_norm_eps", 1e-6), norm_type="rmsnorm",
      activation=hf.get("hidden_act", "silu"), gated_mlp=True,
      qkv_bias=True if mt == "qwen2" else attention_bias,
      o_bias=False if mt == "qwen2" else attention_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      layer_types=layer_types, sliding_window=window,
      rope=((FULL, rope_from_hf(hf)),),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      hf_extra=dict(hf), **token_ids(hf))


def config_to_hf(cfg: ModelConfig) -> dict:
  out = dict(cfg.hf_extra)
  out.update(common_hf_fields(cfg))
  out.update(
      model_type=cfg.model_type, architectures=[_ARCH[cfg.model_type]],
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
      hidden_act=cfg.activation, rope_parameters=cfg.rope_for(FULL).to_hf(),
      mlp_bias=cfg.mlp_bias)
  out.pop("rope_scaling", None)
  out.pop("rope_theta", None)
  if cfg.model_type == "qwen2":
    out.update(use_sliding_window=cfg.sliding_window is not None,
               sliding_window=cfg.sliding_window)
    if cfg.layer_types:
      out["layer_types"] = list(cfg.layer_types)
  else:
    out["attention_bias"] = cfg.qkv_bias
    if cfg.model_type == "mistral":
      out["sliding_window"] = cfg.sliding_window
  return out


_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
         "qwen2": "Qwen2ForCausalLM"}


def layer_names(i: int, prefix: str = "model.") -> dict[str, str]:
  """Our parameter path -> HF tensor name for the tensors of layer i."""
  p, a, m = f"{prefix}layers.{i}.", f"{prefix}layers.{i}.self_attn.", f"{prefix}layers.{i}.mlp."
  return {
      f"layers/{i}/attn_norm/scale": p + "input_layernorm.weight",
      f"layers/{i}/mlp_norm/scale": p + "post_attention_layernorm.weight",
      f"layers/{i}/attn/q": a + "q_proj.weight", f"layers/{i}/attn/k": a + "k_proj.weight",
      f"layers/{i}/attn/v": a + "v_proj.weight", f"layers/{i}/attn/o": a + "o_proj.weight",
      f"layers/{i}/attn/q_bias": a + "q_proj.bias", f"layers/{i}/attn/k_bias": a + "k_proj.bias",
      f"layers/{i}/attn/v_bias": a + "v_proj.bias", f"layers/{i}/attn/o_bias": a + "o_proj.bias",
      f"layers/{i}/mlp/gate": m + "gate_proj.weight", f"layers/{i}/mlp/up": m + "up_proj.weight",
      f"layers/{i}/mlp/down": m + "down_proj.weight",
      f"layers/{i}/mlp/gate_bias": m + "gate_proj.bias",
      f"layers/{i}/mlp/up_bias": m + "up_proj.bias",
      f"layers/{i}/mlp/down_bias": m + "down_proj.bias",
  }


def name_map(cfg: ModelConfig, layer_extra=None) -> dict[str, str]:
  """Every parameter path of a model of this config -> its HF tensor name."""
  names = {"embed": "model.embed_tokens.weight", "final_norm/scale": "model.norm.weight"}
  if not cfg.tie_word_embeddings:
    names["lm_head"] = "lm_head.weight"
  for i in range(cfg.num_layers):
    names.update(layer_names(i))
    if layer_extra:
      names.update(layer_extra(i))
  return names


def to_ours(path: str, w, cfg: ModelConfig):
  """HF layout -> ours for one tensor, by the kind of parameter the path names."""
  leaf = path.rsplit("/", 1)[-1]
  hd = cfg.head_dim
  if leaf == "q":
    return linear_in(w, cfg.num_heads, hd)
  if leaf in ("k", "v"):
    return linear_in(w, cfg.num_kv_heads, hd)
  if leaf == "o":
    return heads_in(w, cfg.num_heads, hd)
  if leaf == "q_bias":
    return w.reshape(cfg.num_heads, hd)
  if leaf in ("k_bias", "v_bias"):
    return w.reshape(cfg.num_kv_heads, hd)
  if leaf in ("gate", "up", "down", "lm_head"):
    return w.T
  return w


def to_hf(path: str, w):
  """Ours -> HF layout for one tensor."""
  leaf = path.rsplit("/", 1)[-1]
  if leaf in ("q", "k", "v"):
    return linear_out(w)
  if leaf == "o":
    return heads_out(w)
  if leaf in ("q_bias", "k_bias", "v_bias"):
    return w.reshape(-1)
  if leaf in ("gate", "up", "down", "lm_head"):
    return w.T
  return w


def params_from_hf(cfg: ModelConfig, src: TensorSource, expected: set[str], layer_extra=None):
  """{our path: (array in our layout, hf name)} for every path in `expected`."""
  names = name_map(cfg, layer_extra)
  return {path: (to_ours(path, src.get(names[path]), cfg), names[path]) for path in expected}


def params_to_hf(cfg: ModelConfig, params: dict, layer_extra=None) -> dict:
  names = name_map(cfg, layer_extra)
  return {names[path]: to_hf(path, w) for path, w in params.items()}
