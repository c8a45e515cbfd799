"""GPT-2: LayerNorm with bias, learned absolute positions, fused q/k/v, GELU (tanh) MLP.

HF stores GPT-2 projections as `Conv1D` weights of shape (in, out) (no transpose needed) with the
q, k, v projections fused in `attn.c_attn` along the output axis.
"""

from __future__ import annotations

import numpy as np

from cot2align_jax.models.config import ModelConfig
from cot2align_jax.models.families import TensorSource, common_hf_fields, token_ids

MODEL_TYPES = ("gpt2",)


def config_from_hf(hf: dict) -> ModelConfig:
  d, heads = hf["n_embd"], hf["n_head"]
  return ModelConfig(
      family="gpt2", model_type="gpt2", vocab_size=hf["vocab_size"], hidden_size=d,
      num_layers=hf["n_layer"], num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
      intermediate_size=hf.get("n_inner") or 4 * d,
      max_position_embeddings=hf.get("n_positions", 1024),
      norm_eps=hf.get("layer_norm_epsilon", 1e-5), norm_type="layernorm", norm_bias=True,
      activation=hf.get("activation_function", "gelu_new"), gated_mlp=False,
      qkv_bias=True, o_bias=True, mlp_bias=True, learned_positions=True, rope=(),
      attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
      scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
      hf_extra=dict(hf), **token_ids(hf))


def config_to_hf(cfg: ModelConfig) -> dict:
  out = dict(cfg.hf_extra)
  out.update(common_hf_fields(cfg))
  out.update(
      model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=cfg.hidden_size,
      n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
      n_positions=cfg.max_position_embeddings, layer_norm_epsilon=cfg.norm_eps,
      activation_function=cfg.activation, scale_attn_weights=cfg.attn_scale is None,
      scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx)
  return out


def _layer(i: int) -> dict[str, str]:
  """Our parameter path -> HF name (without the `transformer.` prefix) for layer i."""
  p = f"h.{i}."
  return {
      f"layers/{i}/attn_norm/scale": p + "ln_1.weight", f"layers/{i}/attn_norm/bias": p + "ln_1.bias",
      f"layers/{i}/mlp_norm/scale": p + "ln_2.weight", f"layers/{i}/mlp_norm/bias": p + "ln_2.bias",
      f"layers/{i}/attn/o": p + "attn.c_proj.weight", f"layers/{i}/attn/o_bias": p + "attn.c_proj.bias",
      f"layers/{i}/mlp/up": p + "mlp.c_fc.weight", f"layers/{i}/mlp/up_bias": p + "mlp.c_fc.bias",
      f"layers/{i}/mlp/down": p + "mlp.c_proj.weight",
      f"layers/{i}/mlp/down_bias": p + "mlp.c_proj.bias",
  }


def _names(cfg: ModelConfig) -> dict[str, str]:
  names = {"embed": "wte.weight", "pos_embed": "wpe.weight", "final_norm/scale": "ln_f.weight",
           "final_norm/bias": "ln_f.bias"}
  for i in range(cfg.num_layers):
    names.update(_layer(i))
  return names


def params_from_hf(cfg: ModelConfig, src: TensorSource, expected: set[str]):
  """{our path: (array, hf name)}; accepts names with or without the `transformer.` prefix."""
  names = _names(cfg)
  h, hd, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
  out = {}
  for path in expected:
    leaf = path.rsplit("/", 1)[-1]
    if path == "lm_head":
      name, w = src.first("lm_head.weight")
      out[path] = (w.T, name)
    elif leaf in ("q", "k", "v", "q_bias", "k_bias", "v_bias"):
      i = path.split("/")[1]
      part = "weight" if leaf in ("q", "k", "v") else "bias"
      base = f"h.{i}.attn.c_attn.{part}"
      name, w = src.first("transformer." + base, base)
      j = "qkv".index(leaf[0])
      if part == "weight":
        out[path] = (w[:, j * d:(j + 1) * d].reshape(d, h, hd), name)
      else:
        out[path] = (w[j * d:(j + 1) * d].reshape(h, hd), name)
    else:
      name, w = src.first("transformer." + names[path], names[path])
      if leaf == "o":
        w = w.reshape(h, hd, d)
      out[path] = (w, name)
  return out


def params_to_hf(cfg: ModelConfig, params: dict) -> dict:
  names = _names(cfg)
  out = {}
  for i in range(cfg.num_layers):
    a = f"layers/{i}/attn/"
    qkv = [params.pop(a + x) for x in "qkv"]
    out[f"transformer.h.{i}.attn.c_attn.weight"] = np.concatenate(
        [w.reshape(w.shape[0], -1) for w in qkv], axis=1)
    out[f"transformer.h.{i}.attn.c_attn.bias"] = np.concatenate(
        [params.pop(a + x + "_bias").reshape(-1) for x in "qkv"])
  for path, w in params.items():
    if path == "lm_head":
      out["lm_head.weight"] = w.T
    elif path.endswith("attn/o"):
      out["transformer." + names[path]] = w.reshape(-1, w.shape[-1])
    else:
      out["transformer." + names[path]] = w
  return out
