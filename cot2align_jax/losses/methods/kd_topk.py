"""kd_topk: same-vocabulary KD on the teacher's top-k tokens plus one rest bucket
(docs/adding_a_method.md §1 has the math)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cot2align_jax.core.numerics import log_probs, masked_sum
from cot2align_jax.losses import vocab_chunk as vc
from cot2align_jax.losses.divergences import LOG_FLOOR
from cot2align_jax.losses.methods.base import Method, params_of, side


@dataclasses.dataclass(frozen=True)
class Params:
  """k: teacher tokens compared one by one at each position; the others form one bucket."""
  k: int = 20


def _log_rest(logp: jax.Array, in_top: jax.Array) -> jax.Array:
  """log Σ_{v ∉ top} exp(logp_v): [..., V] float32 log-probs, [..., V] bool -> [...] float32;
  −inf (with zero gradient) where nothing finite is left outside the top."""
  outside = jnp.where(in_top, -jnp.inf, logp)
  has_rest = jnp.any(jnp.isfinite(outside), axis=-1)
  safe = jnp.where(has_rest[..., None], outside, 0.0)
  return jnp.where(has_rest, jax.nn.logsumexp(safe, axis=-1), -jnp.inf)


def topk_kl(student_logits: jax.Array, teacher_logits: jax.Array, *, k: int,
            temperature: float = 1.0) -> jax.Array:
  """KL(p̂ ‖ q̂) per position: [B, T, V] logits (same V, −inf allowed) -> [B, T] float32.
  The teacher is stop-gradient; no τ² factor."""
  lq = log_probs(student_logits, temperature)
  lp = log_probs(jax.lax.stop_gradient(teacher_logits), temperature)
  _, top = jax.lax.top_k(lp, min(k, lp.shape[-1]))                     # [B, T, k]
  in_top = jnp.any(jax.nn.one_hot(top, lp.shape[-1], dtype=bool), axis=-2)
  return _topk_kl_from(jnp.take_along_axis(lp, top, axis=-1),
                       jnp.take_along_axis(lq, top, axis=-1),
                       _log_rest(lp, in_top), _log_rest(lq, in_top))


def _topk_kl_from(lp_k, lq_k, lp_r, lq_r) -> jax.Array:
  """TopKL from the teacher's / student's log-probs at the top ids [..., k] and the log-mass
  of the rest [...] (−inf if none): [...] float32."""
  lp_k, lq_k = jnp.maximum(lp_k, LOG_FLOOR), jnp.maximum(lq_k, LOG_FLOOR)
  lp_r, lq_r = jnp.maximum(lp_r, LOG_FLOOR), jnp.maximum(lq_r, LOG_FLOOR)
  head = jnp.sum(jnp.exp(lp_k) * (lp_k - lq_k), axis=-1)
  rest = jnp.where(lp_r > LOG_FLOOR, jnp.exp(lp_r) * (lp_r - lq_r), 0.0)
  return head + rest


def topk_kl_chunked(student: vc.Logits, teacher: vc.Logits, *, k: int, chunk: int,
                    temperature: float = 1.0) -> jax.Array:
  """topk_kl from hidden states and LM heads in vocabulary chunks: [...] float32.

  Pass 1: both log-normalisers at τ and the teacher's running top k (ties by id, as lax.top_k);
  pass 2: the student's and teacher's logits at the top ids and the log-sum-exp of the rest.
  """
  teacher = teacher.stop_gradient()
  lay = vc.layout(student.vocab, chunk)
  lead = student.hidden.shape[:-1]
  inv = 1.0 / float(temperature)
  l_s, l_t = vc.log_normalisers([student, teacher], [temperature, temperature], lay, lead)
  _, top = vc.running_top_k(teacher, min(k, student.vocab), lay, lead, scale=inv)
  (z_s, z_t), (r_s, r_t) = vc.gather_and_rest([student, teacher], top, (inv, inv), lay, lead)
  l_s, l_t = l_s[..., None], jax.lax.stop_gradient(l_t)[..., None]
  return _topk_kl_from(z_t - l_t, z_s - l_s, r_t - l_t[..., 0], r_s - l_s[..., 0])


def kd_topk_loss(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, *,
                 k: int, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(Σ_mask TopKL, Σ mask), float32 scalars; mask [B, T] = the student's response tokens."""
  return masked_sum(topk_kl(student_logits, teacher_logits, k=k, temperature=temperature),
                    mask)


def term(inputs, projectors, cfg):
  """The registry's term: KD_sum on the main view and no logging parts."""
  del projectors
  s, t = side(inputs, "student"), side(inputs, "teacher")
  if cfg.vocab_chunk > 0:
    per_token = topk_kl_chunked(s.lg(), t.lg(), k=params_of(cfg, METHOD).k,
                                chunk=cfg.vocab_chunk, temperature=cfg.temperature)
    return masked_sum(per_token, s.mask)[0], {}
  total, _ = kd_topk_loss(s.logits, t.logits, s.mask, k=params_of(cfg, METHOD).k,
                          temperature=cfg.temperature)
  return total, {}


METHOD = Method("kd_topk", kd=term, same_vocab=True, params=Params)
