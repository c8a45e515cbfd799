"""DSKD-CMA, dual-space KD with cross-model attention (docs/method.md §4; deviations §6).

e_S = [E_S(input); E_S(label)], e_T likewise (zero vectors outside the response, stop-gradient
lookups of the raw tables); std(·) is one population std over the teacher's valid response
positions and all features (1 if 0):
  A = query(e_S)·(e_T/std(e_T))ᵀ / √(2·d_T), −1e5 outside valid (i, j) pairs;
  t2s_h = softmax_j(A)·t2s(h_T/std(h_T) + E_T(label)/std(E_T(label))), t2s_logits = t2s_h·sg(W_S);
  t2s_CE = Σ_S CE(t2s_logits, label); t2s_KD = Σ_S [argmax t2s_logits = label]·D(student ‖ t2s);
  s2t_h = softmax_i(Aᵀ)·s2t(h_S), s2t_KD = Σ_T KL(p_T ‖ softmax(s2t_h·W_T)) at τ.
KD_sum = t2s_CE + t2s_KD + s2t_KD.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cot2align_jax.core.numerics import F32, masked_sum
from cot2align_jax.losses import vocab_chunk as vc
from cot2align_jax.losses.cross_tokenizer import (NEG_LOGIT, KDSide, as_bool, like_vocab_mask,
                                                  project_head, s2t_head, sg, t2s_head,
                                                  t2s_terms, t2s_terms_chunked, token_div)
from cot2align_jax.losses.methods.base import Method, side
from cot2align_jax.losses.projectors import Projectors


def masked_std(x: jax.Array, mask: jax.Array) -> jax.Array:
  """One float32 scalar: population std of x [B, L, D] over the valid rows (mask [B, L]) and
  all features; 1 when there is nothing (or no spread) to measure."""
  w = as_bool(mask).astype(F32)[..., None]
  x = x.astype(F32)
  n = jnp.sum(w) * x.shape[-1]
  safe_n = jnp.maximum(n, 1.0)
  mean = jnp.sum(x * w) / safe_n
  var = jnp.sum(jnp.square(x - mean) * w) / safe_n
  return jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 1.0)


def embed(table: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Rows of table [V, D] for ids [B, L] as float32, zero vectors where mask is 0."""
  safe_ids = jnp.where(as_bool(mask), ids, 0)
  e = jnp.take(table, safe_ids, axis=0).astype(F32)
  return e * as_bool(mask).astype(F32)[..., None]


def cma_attention_logits(projectors: Projectors, student: KDSide, teacher: KDSide) -> jax.Array:
  """DSKD-CMA alignment scores A [B, Ls, Lt] float32, −1e5 outside valid (i, j) pairs."""
  e_s = jnp.concatenate([embed(sg(student.embed), student.input_ids, student.mask),
                         embed(sg(student.embed), student.labels, student.mask)], axis=-1)
  e_t = jnp.concatenate([embed(sg(teacher.embed), teacher.input_ids, teacher.mask),
                         embed(sg(teacher.embed), teacher.labels, teacher.mask)], axis=-1)
  keys = e_t / masked_std(e_t, teacher.mask)
  queries = projectors.query(e_s)
  scores = jnp.einsum("bid,bjd->bij", queries, keys, preferred_element_type=F32)
  scores = scores / math.sqrt(e_t.shape[-1])
  valid = as_bool(student.mask)[:, :, None] & as_bool(teacher.mask)[:, None, :]
  return jnp.where(valid, scores, NEG_LOGIT)


def dskd_cma_loss(projectors: Projectors, student: KDSide, teacher: KDSide, *,
                  divergence: str = "fkl", temperature: float = 1.0, vocab_chunk: int = 0,
                  **div_params) -> tuple[jax.Array, jax.Array, dict]:
  """projectors: `Projectors.dskd` with query, t2s, s2t; student/teacher: KDSide with embed
  tables. Returns (KD_sum = t2s_CE + t2s_KD + s2t_KD, Σ student mask, parts). vocab_chunk > 0:
  every logit term in vocabulary chunks (the sides' logits may be None)."""
  projectors.require("query", "t2s", "s2t")
  scores = cma_attention_logits(projectors, student, teacher)
  h_t = sg(teacher.hidden).astype(F32)
  label_t = embed(sg(teacher.embed), teacher.labels, teacher.mask)
  values_t = projectors.t2s(h_t / masked_std(h_t, teacher.mask)
                            + label_t / masked_std(label_t, teacher.mask))      # [B, Lt, dS]
  t2s_h = jnp.einsum("bij,bjd->bid", jax.nn.softmax(scores, axis=-1), values_t)
  if vocab_chunk > 0:
    parts = t2s_terms_chunked(t2s_head(t2s_h, student), student, student.mask,
                              chunk=vocab_chunk, divergence=divergence,
                              temperature=temperature, div_params=div_params,
                              agreement_mask=True)
  else:
    t2s_logits = project_head(t2s_h, sg(student.head))
    parts = t2s_terms(t2s_logits, student, student.mask, divergence=divergence,
                      temperature=temperature, div_params=div_params, agreement_mask=True)
  values_s = projectors.s2t(student.hidden)                                       # [B, Ls, dT]
  s2t_weights = jax.nn.softmax(jnp.swapaxes(scores, 1, 2), axis=-1)               # [B, Lt, Ls]
  s2t_h = jnp.einsum("bji,bid->bjd", s2t_weights, values_s)
  if vocab_chunk > 0:
    s2t = vc.divergence("fkl", s2t_head(s2t_h, teacher), teacher.lg(),
                        temperature=temperature, chunk=vocab_chunk)
  else:
    s2t_logits = like_vocab_mask(project_head(s2t_h, sg(teacher.head)), sg(teacher.logits))
    s2t = token_div("fkl", s2t_logits, teacher.logits, temperature, {})
  parts["s2t_kd"], parts["s2t_count"] = masked_sum(s2t, teacher.mask)
  total = parts["t2s_ce"] + parts["t2s_kd"] + parts["s2t_kd"]
  return total, parts.pop("count"), parts


def term(inputs, projectors, cfg):
  total, _, parts = dskd_cma_loss(projectors.kd, side(inputs, "student"),
                                  side(inputs, "teacher"), divergence=cfg.divergence,
                                  temperature=cfg.temperature, vocab_chunk=cfg.vocab_chunk,
                                  **cfg.div_params)
  return total, parts


METHOD = Method("dskd_cma", kd=term, projectors=("query", "t2s", "s2t"))
