"""ULD, Universal Logit Distillation (Boizard et al. 2024) without its CE term (docs/method.md
§8): the k-th student response token is paired with the k-th teacher response token, and each
pair adds Σ_v |sort↓ p_S − sort↓ p_T| (the shorter vocabulary zero-padded)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cot2align_jax.core.numerics import log_probs, masked_sum
from cot2align_jax.losses.cross_tokenizer import gather_positions, pad_last, rank_pairs, sg
from cot2align_jax.losses.methods.base import Method, side


def uld_loss(student_logits: jax.Array, teacher_logits: jax.Array, student_mask: jax.Array,
             teacher_mask: jax.Array, *, temperature: float = 1.0
             ) -> tuple[jax.Array, jax.Array]:
  """student_logits [B, Ls, Vs], teacher_logits [B, Lt, Vt], masks [B, Ls] / [B, Lt].
  Returns (Σ_pairs Σ_v |sorted p_S − sorted p_T|, number of pairs)."""
  s_pos, t_pos, pair = rank_pairs(student_mask, teacher_mask)
  p_s = jnp.exp(log_probs(gather_positions(student_logits, s_pos), temperature))
  p_t = jnp.exp(log_probs(gather_positions(sg(teacher_logits), t_pos), temperature))
  size = max(p_s.shape[-1], p_t.shape[-1])
  sorted_s = pad_last(-jnp.sort(-p_s, axis=-1), size)
  sorted_t = pad_last(-jnp.sort(-p_t, axis=-1), size)
  l1 = jnp.sum(jnp.abs(sorted_s - sorted_t), axis=-1)
  return masked_sum(l1, pair)


def term(inputs, projectors, cfg):
  s, t = side(inputs, "student"), side(inputs, "teacher")
  total, _ = uld_loss(s.logits, t.logits, s.mask, t.mask, temperature=cfg.temperature)
  return total, {}


# The full sort of both distributions does not decompose over vocabulary chunks.
METHOD = Method("uld", kd=term, vocab_chunk=False)
