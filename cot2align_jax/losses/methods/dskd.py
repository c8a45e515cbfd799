"""DSKD, dual-space KD for one shared tokenizer (Zhang et al. 2024; docs/method.md §8).

Positions are 1:1 (Ls == Lt): t2s_logits = t2s(h_T)·sg(W_S), t2s_CE + t2s_KD over every student
response token (no agreement mask), s2t_logits = s2t(h_S)·W_T, s2t_KD = Σ_T KL(p_T ‖ s2t) at τ.
KD_sum = t2s_CE + t2s_KD + s2t_KD.
"""

from __future__ import annotations

import jax

from cot2align_jax.core.numerics import masked_sum
from cot2align_jax.losses import vocab_chunk as vc
from cot2align_jax.losses.cross_tokenizer import (KDSide, like_vocab_mask, project_head,
                                                  s2t_head, sg, t2s_head, t2s_terms,
                                                  t2s_terms_chunked, token_div)
from cot2align_jax.losses.methods.base import Method, side
from cot2align_jax.losses.projectors import Projectors


def dskd_loss(projectors: Projectors, student: KDSide, teacher: KDSide, *,
              divergence: str = "fkl", temperature: float = 1.0, vocab_chunk: int = 0,
              **div_params) -> tuple[jax.Array, jax.Array, dict]:
  """projectors: `Projectors.dskd` with t2s and s2t. Returns (t2s_CE + t2s_KD + s2t_KD,
  Σ student mask, parts). vocab_chunk > 0: every logit term in vocabulary chunks (the sides'
  logits may be None)."""
  projectors.require("t2s", "s2t")
  if student.hidden.shape[1] != teacher.hidden.shape[1]:
    raise ValueError("dskd (same tokenizer) needs equal student/teacher lengths; use dskd_cma "
                     f"or dskd_eta for different tokenizers (got {student.hidden.shape[1]} and "
                     f"{teacher.hidden.shape[1]})")
  if vocab_chunk > 0:
    t2s = t2s_head(projectors.t2s(sg(teacher.hidden)), student)
    parts = t2s_terms_chunked(t2s, student, student.mask, chunk=vocab_chunk,
                              divergence=divergence, temperature=temperature,
                              div_params=div_params, agreement_mask=False)
    s2t = vc.divergence("fkl", s2t_head(projectors.s2t(student.hidden), teacher), teacher.lg(),
                        temperature=temperature, chunk=vocab_chunk)
    parts["s2t_kd"], parts["s2t_count"] = masked_sum(s2t, teacher.mask)
    total = parts["t2s_ce"] + parts["t2s_kd"] + parts["s2t_kd"]
    return total, parts.pop("count"), parts
  t2s_logits = project_head(projectors.t2s(sg(teacher.hidden)), sg(student.head))
  parts = t2s_terms(t2s_logits, student, student.mask, divergence=divergence,
                    temperature=temperature, div_params=div_params, agreement_mask=False)
  s2t_logits = project_head(projectors.s2t(student.hidden), sg(teacher.head))
  s2t_logits = like_vocab_mask(s2t_logits, sg(teacher.logits))
  s2t = token_div("fkl", s2t_logits, teacher.logits, temperature, {})
  parts["s2t_kd"], parts["s2t_count"] = masked_sum(s2t, teacher.mask)
  total = parts["t2s_ce"] + parts["t2s_kd"] + parts["s2t_kd"]
  return total, parts.pop("count"), parts


def term(inputs, projectors, cfg):
  total, _, parts = dskd_loss(projectors.kd, side(inputs, "student"), side(inputs, "teacher"),
                              divergence=cfg.divergence, temperature=cfg.temperature,
                              vocab_chunk=cfg.vocab_chunk, **cfg.div_params)
  return total, parts


METHOD = Method("dskd", kd=term, projectors=("t2s", "s2t"))
