"""DSKD-ETA, DSKDv2 with exact token alignment (docs/method.md §8).

At the exactly aligned pairs (i, j = eta_pos[i]) with eta_mask[i] and both response masks:
t2s_logits_i = t2s(h_T[j])·sg(W_S); t2s_CE = Σ CE(t2s_logits_i, label_i) (τ = 1);
t2s_KD = Σ [argmax t2s_logits_i = label_i]·D(student_i ‖ sg(t2s_logits_i)) at τ (the bracket
only with Params.agreement_mask); s2t_KD = Σ D(s2t(h_S[i])·W_T ‖ p_T[j]) at τ.
KD_sum = t2s_CE + t2s_KD + s2t_KD. Needs the batch's "eta" alignment.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cot2align_jax.core import spec
from cot2align_jax.core.numerics import masked_sum
from cot2align_jax.losses import vocab_chunk as vc
from cot2align_jax.losses.cross_tokenizer import (KDSide, as_bool, gather_positions,
                                                  like_vocab_mask, project_head, s2t_head, sg,
                                                  t2s_head, t2s_terms, t2s_terms_chunked,
                                                  token_div)
from cot2align_jax.losses.methods.base import Method, params_of, side
from cot2align_jax.losses.projectors import Projectors


@dataclasses.dataclass(frozen=True)
class Params:
  """agreement_mask: t2s_KD only where the projected teacher's argmax is the gold label."""
  agreement_mask: bool = True


def dskd_eta_loss(projectors: Projectors, student: KDSide, teacher: KDSide,
                  eta_pos: jax.Array, eta_mask: jax.Array, *, divergence: str = "fkl",
                  temperature: float = 1.0, params: Params = Params(), vocab_chunk: int = 0,
                  **div_params) -> tuple[jax.Array, jax.Array, dict]:
  """eta_pos / eta_mask [B, Ls]: teacher label position aligned to each student label position.
  Returns (t2s_CE + t2s_KD + s2t_KD, number of aligned pairs, parts). vocab_chunk > 0: every
  logit term in vocabulary chunks (the sides' logits may be None)."""
  projectors.require("t2s", "s2t")
  pairs = (as_bool(eta_mask) & as_bool(student.mask)
           & jnp.take_along_axis(as_bool(teacher.mask), eta_pos, axis=1))
  h_t = gather_positions(sg(teacher.hidden), eta_pos)                            # [B, Ls, dT]
  if vocab_chunk > 0:
    parts = t2s_terms_chunked(t2s_head(projectors.t2s(h_t), student), student, pairs,
                              chunk=vocab_chunk, divergence=divergence,
                              temperature=temperature, div_params=div_params,
                              agreement_mask=params.agreement_mask)
    s2t = vc.divergence(divergence, s2t_head(projectors.s2t(student.hidden), teacher),
                        teacher.lg().at(eta_pos), temperature=temperature, chunk=vocab_chunk,
                        **div_params)
    parts["s2t_kd"], parts["s2t_count"] = masked_sum(s2t, pairs)
    total = parts["t2s_ce"] + parts["t2s_kd"] + parts["s2t_kd"]
    return total, parts.pop("count"), parts
  t2s_logits = project_head(projectors.t2s(h_t), sg(student.head))
  parts = t2s_terms(t2s_logits, student, pairs, divergence=divergence,
                    temperature=temperature, div_params=div_params,
                    agreement_mask=params.agreement_mask)
  t_logits = gather_positions(sg(teacher.logits), eta_pos)                       # [B, Ls, Vt]
  s2t_logits = project_head(projectors.s2t(student.hidden), sg(teacher.head))
  s2t_logits = like_vocab_mask(s2t_logits, t_logits)
  s2t = token_div(divergence, s2t_logits, t_logits, temperature, div_params)
  parts["s2t_kd"], parts["s2t_count"] = masked_sum(s2t, pairs)
  total = parts["t2s_ce"] + parts["t2s_kd"] + parts["s2t_kd"]
  return total, parts.pop("count"), parts


def term(inputs, projectors, cfg):
  b = inputs.batch
  total, _, parts = dskd_eta_loss(
      projectors.kd, side(inputs, "student"), side(inputs, "teacher"),
      b[spec.align_key("eta_pos")], b[spec.align_key("eta_mask")], divergence=cfg.divergence,
      temperature=cfg.temperature, params=params_of(cfg, METHOD), vocab_chunk=cfg.vocab_chunk,
      **cfg.div_params)
  return total, parts


METHOD = Method("dskd_eta", kd=term, projectors=("t2s", "s2t"), alignment=("eta",),
                params=Params)
