"""Gemma-3 text models (e.g. Gemma-3-270M).

Differences from the Llama block: RMSNorm scales by (1 + w); per-head RMSNorm on q and k;
extra norms after attention and after the MLP; GeGLU (tanh GELU); embeddings times sqrt(D);
attention scale query_pre_attn_scalar^-1/2; interleaved sliding-window (local, RoPE base 1e4)
and global (RoPE base 1e6) layers; optional soft-capping of attention and final logits.
"""

from __future__ import annotations

import math

from cot2align_jax.models import llama
from cot2align_jax.models.config import FULL, SLIDING, ModelConfig, RopeSpec
from cot2align_jax.models.families import TensorSource, common_hf_fields, token_ids

MODEL_TYPES = ("gemma3_text",)


def config_from_hf(hf: dict) -> ModelConfig:
  n = hf["num_hidden_layers"]
  layer_types = tuple(hf.get("layer_types") or (
      SLIDING if (i + 1) % hf.get("sliding_window_pattern", 6) else FULL for i in range(n)))
  rp = hf.get("rope_parameters") or {}
  if FULL in rp or SLIDING in rp:
    rope = ((FULL, RopeSpec.from_hf(rp.get(FULL), 1e6)),
            (SLIDING, RopeSpec.from_hf(rp.get(SLIDING), 1e4)))
  else:  # legacy keys
    rope = ((FULL, RopeSpec.from_hf({**(hf.get("rope_scaling") or {}),
                                     "rope_theta": hf.get("rope_theta", 1e6)})),
            (SLIDING, RopeSpec(theta=float(hf.get("rope_local_base_freq", 1e4)))))
  heads = hf["num_attention_heads"]
  d = hf["hidden_size"]
  return ModelConfig(
      family="gemma3", model_type=hf["model_type"],
      vocab_size=hf["vocab_size"], hidden_size=d, num_layers=n, num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or d // heads,
      intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf.get("max_position_embeddings", 32768),
      norm_eps=hf.get("rms_norm_eps", 1e-6), norm_type="rmsnorm", norm_offset=1.0,
      activation=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
      gated_mlp=True, qkv_bias=bool(hf.get("attention_bias", False)),
      o_bias=bool(hf.get("attention_bias", False)), qk_norm=True, sandwich_norm=True,
      embed_scale=math.sqrt(d), layer_types=layer_types, sliding_window=hf.get("sliding_window"),
      rope=rope, attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
      # transformers' Gemma-3 attention ignores attn_logit_softcapping (null in every released
      # Gemma-3 config); we do the same so exported models run identically there.
      attn_logit_softcapping=None,
      final_logit_softcapping=hf.get("final_logit_softcapping"),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
      hf_extra=dict(hf), **token_ids(hf))


def config_to_hf(cfg: ModelConfig) -> dict:
  out = dict(cfg.hf_extra)
  out.update(common_hf_fields(cfg))
  for key in ("rope_scaling", "rope_theta", "rope_local_base_freq", "sliding_window_pattern"):
    out.pop(key, None)
  out.update(
      model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
      hidden_activation=cfg.activation, attention_bias=cfg.qkv_bias,
      query_pre_attn_scalar=_as_int_if_whole(cfg.scale ** -2), sliding_window=cfg.sliding_window,
      layer_types=list(cfg.layer_types) or [FULL] * cfg.num_layers,
      rope_parameters={FULL: cfg.rope_for(FULL).to_hf(), SLIDING: cfg.rope_for(SLIDING).to_hf()},
      final_logit_softcapping=cfg.final_logit_softcapping)
  return out


def _as_int_if_whole(x: float):
  return int(round(x)) if abs(x - round(x)) < 1e-6 else x


def _layer_names(i: int) -> dict[str, str]:
  p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
  return {
      f"layers/{i}/attn_norm/scale": p + "input_layernorm.weight",
      f"layers/{i}/post_attn_norm/scale": p + "post_attention_layernorm.weight",
      f"layers/{i}/mlp_norm/scale": p + "pre_feedforward_layernorm.weight",
      f"layers/{i}/post_mlp_norm/scale": p + "post_feedforward_layernorm.weight",
      f"layers/{i}/attn/q_norm/scale": a + "q_norm.weight",
      f"layers/{i}/attn/k_norm/scale": a + "k_norm.weight",
  }


def params_from_hf(cfg: ModelConfig, src: TensorSource, expected: set[str]):
  return llama.params_from_hf(cfg, src, expected, layer_extra=_layer_names)


def params_to_hf(cfg: ModelConfig, params: dict) -> dict:
  return llama.params_to_hf(cfg, params, layer_extra=_layer_names)
