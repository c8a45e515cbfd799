"""Same-vocabulary KD divergences D(student ‖ teacher) per token (docs/method.md §7).

p = softmax(teacher_logits / τ), q = softmax(student_logits / τ), KL(a‖b) = Σ_v a_v log(a_v/b_v):

  fkl KL(p‖q)   rkl KL(q‖p)   js ½KL(p‖m)+½KL(q‖m), m=(p+q)/2   tvd ½Σ|p−q|
  skl KL(p ‖ λp+(1−λ)q)   srkl KL(q ‖ (1−λ)p+λq)   (λ = `lam`, 0.1)
  akl adaptive KL: head/tail-weighted FKL + RKL (`mu`, 0.5)
  gjsd β·KL(p‖m)+(1−β)·KL(q‖m), m=βp+(1−β)q (`beta` 0.5, `normalize` divides by β(1−β))

Every divergence returns [B, T] float32 for [B, T, V] logits, in float32 whatever the input
dtype, with no τ² factor; `token_divergence` stop-gradients the teacher. −inf logits (padded
vocabulary) are allowed on either side: log-probabilities are clamped at LOG_FLOOR inside the
log-ratios, so values and gradients stay finite. Parameters are Python floats (static under
jit). Details and the reasoning behind each convention: docs/losses.md.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from cot2align_jax.core.numerics import F32, log_probs, masked_sum

LOG_FLOOR = -1.0e4  # lower clamp of log-probabilities inside log-ratios (see module docstring)


def _clamp(logp: jax.Array) -> jax.Array:
  """[..., V] log-probabilities clamped below at LOG_FLOOR (finite everywhere)."""
  return jnp.maximum(logp, LOG_FLOOR)


def _log_mix(lp: jax.Array, lq: jax.Array, w: float) -> jax.Array:
  """log(w·p + (1−w)·q) from clamped log-probabilities lp, lq [..., V]; w a Python float."""
  if w >= 1.0:
    return lp
  if w <= 0.0:
    return lq
  return jnp.logaddexp(lp + math.log(w), lq + math.log1p(-w))


def _kl(la: jax.Array, lb: jax.Array) -> jax.Array:
  """KL(a‖b) = Σ_v a_v (la_v − lb_v) from clamped log-probabilities [..., V] -> [...] float32.

  a = exp(la) is exactly 0 where la is at the floor, so 0·log 0 terms vanish.
  """
  return jnp.sum(jnp.exp(la) * (la - lb), axis=-1)


# ------------------------------------------------------------------------------------------
# Divergences from log-probabilities (student first, teacher second; [..., V] -> [...])
# ------------------------------------------------------------------------------------------

def fkl(student_logprobs: jax.Array, teacher_logprobs: jax.Array) -> jax.Array:
  """Forward KL(p‖q). [..., V] float32 log-probs -> [...] float32."""
  return _kl(_clamp(teacher_logprobs), _clamp(student_logprobs))


def rkl(student_logprobs: jax.Array, teacher_logprobs: jax.Array) -> jax.Array:
  """Reverse KL(q‖p). [..., V] float32 log-probs -> [...] float32."""
  return _kl(_clamp(student_logprobs), _clamp(teacher_logprobs))


def js(student_logprobs: jax.Array, teacher_logprobs: jax.Array) -> jax.Array:
  """Jensen-Shannon ½KL(p‖m) + ½KL(q‖m), m = (p+q)/2. [..., V] -> [...] float32."""
  lq, lp = _clamp(student_logprobs), _clamp(teacher_logprobs)
  lm = _log_mix(lp, lq, 0.5)
  return 0.5 * _kl(lp, lm) + 0.5 * _kl(lq, lm)


def tvd(student_logprobs: jax.Array, teacher_logprobs: jax.Array) -> jax.Array:
  """Total variation ½Σ|p − q|. [..., V] -> [...] float32, in [0, 1]."""
  return 0.5 * jnp.sum(jnp.abs(jnp.exp(teacher_logprobs) - jnp.exp(student_logprobs)), axis=-1)


def skl(student_logprobs: jax.Array, teacher_logprobs: jax.Array, *, lam: float = 0.1
        ) -> jax.Array:
  """Skewed forward KL(p ‖ λp + (1−λ)q) (DistiLLM). [..., V] -> [...] float32."""
  lq, lp = _clamp(student_logprobs), _clamp(teacher_logprobs)
  return _kl(lp, _log_mix(lp, lq, float(lam)))


def srkl(student_logprobs: jax.Array, teacher_logprobs: jax.Array, *, lam: float = 0.1
         ) -> jax.Array:
  """Skewed reverse KL(q ‖ (1−λ)p + λq) (DistiLLM). [..., V] -> [...] float32."""
  lq, lp = _clamp(student_logprobs), _clamp(teacher_logprobs)
  return _kl(lq, _log_mix(lp, lq, 1.0 - float(lam)))


def akl_weights(student_logprobs: jax.Array, teacher_logprobs: jax.Array, *, mu: float = 0.5
                ) -> tuple[jax.Array, jax.Array]:
  """AKL head/tail weights (w_fkl, w_rkl), each [...] float32, stop-gradient.

  Sorts the vocabulary by teacher probability (descending, stable); head = tokens whose
  preceding teacher mass is < μ; w_fkl = g_head/(g_head+g_tail), w_rkl = 1 − w_fkl, with
  ½/½ where both gaps are 0.
  """
  p = jax.lax.stop_gradient(jnp.exp(teacher_logprobs))
  q = jax.lax.stop_gradient(jnp.exp(student_logprobs))
  gap = jnp.abs(p - q)
  neg_p_sorted, gap_sorted = jax.lax.sort((-p, gap), dimension=-1, num_keys=1, is_stable=True)
  p_sorted = -neg_p_sorted
  mass_before = jnp.cumsum(p_sorted, axis=-1) - p_sorted
  head = mass_before < mu
  g_head = jnp.sum(jnp.where(head, gap_sorted, 0.0), axis=-1)
  g_tail = jnp.sum(jnp.where(head, 0.0, gap_sorted), axis=-1)
  total = g_head + g_tail
  w_fkl = jnp.where(total > 0, g_head / jnp.where(total > 0, total, 1.0), 0.5)
  return w_fkl, 1.0 - w_fkl


def akl(student_logprobs: jax.Array, teacher_logprobs: jax.Array, *, mu: float = 0.5
        ) -> jax.Array:
  """Adaptive KL (Wu et al. 2024): w_head·FKL + w_tail·RKL, see akl_weights. [..., V] -> [...]."""
  w_fkl, w_rkl = akl_weights(student_logprobs, teacher_logprobs, mu=mu)
  return (w_fkl * fkl(student_logprobs, teacher_logprobs)
          + w_rkl * rkl(student_logprobs, teacher_logprobs))


def gjsd(student_logprobs: jax.Array, teacher_logprobs: jax.Array, *, beta: float = 0.5,
         normalize: bool = False) -> jax.Array:
  """Generalised JSD with m = βp + (1−β)q: β·KL(p‖m) + (1−β)·KL(q‖m). [..., V] -> [...].

  β = 0 gives exactly FKL and β = 1 exactly RKL; with normalize=True the interior value is
  divided by β(1−β), which makes it continuous in β with those limits (module docstring).
  """
  beta = float(beta)
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"gjsd beta must be in [0, 1], got {beta}")
  if beta == 0.0:
    return fkl(student_logprobs, teacher_logprobs)
  if beta == 1.0:
    return rkl(student_logprobs, teacher_logprobs)
  lq, lp = _clamp(student_logprobs), _clamp(teacher_logprobs)
  lm = _log_mix(lp, lq, beta)
  value = beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm)
  if normalize:
    value = value / (beta * (1.0 - beta))
  return value


class Columns(NamedTuple):
  """A divergence as sums over the vocabulary, for the chunked losses (losses/vocab_chunk.py).

  parts(lq, lp) -> n_parts arrays [..., C] (any chunk of columns of the float32 log-probs) whose
  sums over all V columns, combined by combine(sums) -> [...], give the divergence.
  """
  parts: Callable[[jax.Array, jax.Array], tuple[jax.Array, ...]]
  n_parts: int
  combine: Callable[[tuple[jax.Array, ...]], jax.Array]


def _kl_cols(la: jax.Array, lb: jax.Array) -> jax.Array:
  """The columns a_v (la_v − lb_v) of _kl (clamped log-probabilities)."""
  return jnp.exp(la) * (la - lb)


def divergence_columns(name: str, **params) -> Columns:
  """The `Columns` of divergence `name` (the same formulas as the functions above, summed per
  part). "fkl_rkl" gives (FKL, RKL) as two parts, for AKL (whose head/tail weights need the
  whole distribution, see vocab_chunk.akl_weights)."""
  first = lambda s: s[0]                                                    # noqa: E731
  if name == "fkl":
    return Columns(lambda lq, lp: (_kl_cols(_clamp(lp), _clamp(lq)),), 1, first)
  if name == "rkl":
    return Columns(lambda lq, lp: (_kl_cols(_clamp(lq), _clamp(lp)),), 1, first)
  if name == "fkl_rkl":
    return Columns(lambda lq, lp: (_kl_cols(_clamp(lp), _clamp(lq)),
                                   _kl_cols(_clamp(lq), _clamp(lp))), 2, tuple)
  if name == "tvd":
    return Columns(lambda lq, lp: (jnp.abs(jnp.exp(lp) - jnp.exp(lq)),), 1,
                   lambda s: 0.5 * s[0])
  if name in ("skl", "srkl"):
    lam = float(params.get("lam", 0.1))
    if name == "skl":
      def parts(lq, lp):
        lq, lp = _clamp(lq), _clamp(lp)
        return (_kl_cols(lp, _log_mix(lp, lq, lam)),)
    else:
      def parts(lq, lp):
        lq, lp = _clamp(lq), _clamp(lp)
        return (_kl_cols(lq, _log_mix(lp, lq, 1.0 - lam)),)
    return Columns(parts, 1, first)
  if name in ("js", "gjsd"):
    beta = 0.5 if name == "js" else float(params.get("beta", 0.5))
    normalize = name == "gjsd" and bool(params.get("normalize", False))
    if not 0.0 <= beta <= 1.0:
      raise ValueError(f"gjsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
      return divergence_columns("fkl")
    if beta == 1.0:
      return divergence_columns("rkl")

    def mix_parts(lq, lp):
      lq, lp = _clamp(lq), _clamp(lp)
      lm = _log_mix(lp, lq, beta)
      return _kl_cols(lp, lm), _kl_cols(lq, lm)

    def combine(s):
      value = beta * s[0] + (1.0 - beta) * s[1]
      return value / (beta * (1.0 - beta)) if normalize else value
    return Columns(mix_parts, 2, combine)
  if name == "akl":
    raise ValueError("akl is not a sum over columns; use 'fkl_rkl' and vocab_chunk.akl_weights")
  get_divergence(name)
  raise ValueError(f"divergence {name!r} has no column form")


DIVERGENCES: dict[str, Callable[..., jax.Array]] = {
    "fkl": fkl,
    "rkl": rkl,
    "js": js,
    "tvd": tvd,
    "skl": skl,
    "srkl": srkl,
    "akl": akl,
    "gjsd": gjsd,
}


def get_divergence(name: str) -> Callable[..., jax.Array]:
  """The divergence fn(student_logprobs, teacher_logprobs, **params) registered as `name`."""
  try:
    return DIVERGENCES[name]
  except KeyError:
    raise ValueError(f"unknown divergence {name!r}; known: {', '.join(sorted(DIVERGENCES))}"
                     ) from None


def divergence_from_log_probs(name: str, student_logprobs: jax.Array,
                              teacher_logprobs: jax.Array, **params) -> jax.Array:
  """Divergence `name` between normalised log-probabilities [..., V] -> [...] float32.

  For callers that already hold log-probabilities (e.g. gathered or cached teacher outputs);
  no stop_gradient is applied here.
  """
  fn = get_divergence(name)
  return fn(student_logprobs.astype(F32), teacher_logprobs.astype(F32), **params)


# ------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------

def token_divergence(name: str, student_logits: jax.Array, teacher_logits: jax.Array, *,
                     temperature: float = 1.0, **params) -> jax.Array:
  """Per-token divergence `name` between teacher and student at temperature τ.

  student_logits, teacher_logits: [B, T, V] (any float dtype, same V; −inf allowed).
  Returns [B, T] float32 (in general [...] for [..., V]). The teacher is stop-gradient; no τ².
  name: one of DIVERGENCES; params: lam (skl, srkl), mu (akl), beta / normalize (gjsd).
  """
  fn = get_divergence(name)
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"student logits {student_logits.shape} and teacher logits "
                     f"{teacher_logits.shape} differ in shape")
  lq = log_probs(student_logits, temperature)
  lp = log_probs(jax.lax.stop_gradient(teacher_logits), temperature)
  return fn(lq, lp, **params)


def kd_loss(name: str, student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array,
            *, temperature: float = 1.0, **params) -> tuple[jax.Array, jax.Array]:
  """KD_sum of docs/method.md §4: (Σ_mask divergence, Σ mask), float32 scalars.

  student_logits, teacher_logits: [B, T, V]; mask: [B, T] (response tokens). The caller
  normalises by the global token count.
  """
  per_token = token_divergence(name, student_logits, teacher_logits,
                               temperature=temperature, **params)
  return masked_sum(per_token, mask)
