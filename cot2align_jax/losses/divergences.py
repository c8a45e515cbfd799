"""Same-vocabulary KD divergences between a teacher p and a student q (docs/METHOD.md §7).

Both distributions come from logits over the same vocabulary V at temperature τ:
p = softmax(teacher_logits / τ), q = softmax(student_logits / τ). Every divergence returns one
value per token ([B, T] float32 for [B, T, V] logits); `kd_loss` sums them over a mask.

Conventions (shared by every divergence here)
---------------------------------------------
* float32: logits of any dtype (bf16 included) are cast to float32 before the temperature
  division; softmax, logs, KL terms and all reductions run in float32.
* Temperature: softmax(logits / τ) on both sides and **no τ² factor** — the DSKD / CoT2Align
  reference code does not multiply by τ², and neither do we. Multiply outside if wanted.
* The teacher is a constant: `token_divergence` wraps the teacher logits in stop_gradient.
* −inf logits (padded vocabulary rows, e.g. Qwen's 151,936 head rows for 151,646 tokens, or
  masked columns) are allowed on either side:
  - a column that is −inf on both sides has p = q = 0 there and contributes exactly 0
    (0·log 0 = 0), i.e. it is excluded; no vocabulary slicing is ever needed;
  - log-probabilities are clamped from below at LOG_FLOOR = −1e4 before they enter a log-ratio.
    Where only one side is −inf but the other has mass (true KL = +inf) the value is therefore
    large but finite: e.g. FKL gains p_i·(log p_i + 1e4) for a column with p_i > 0, q_i = 0. The
    clamp has zero gradient, so such a column does not push the (immovable) −inf logit;
  - the clamp never changes a finite case in practice: a float32 probability is 0 below
    log ≈ −104, and a log-ratio term only matters where the weighting probability is > 0;
  - a row whose logits are all −inf is treated as the all-zero vector (no NaN); such rows
    should be masked out by the caller.
  No NaN is produced in values or gradients, including for fully masked rows.
* Divergence parameters are Python floats (static under jit): `lam` (skl, srkl), `mu` (akl),
  `beta` and `normalize` (gjsd).

Divergences (KL(a‖b) = Σ_v a_v (log a_v − log b_v))
---------------------------------------------------
fkl   KL(p‖q)
rkl   KL(q‖p)
js    ½ KL(p‖m) + ½ KL(q‖m),  m = (p + q)/2
tvd   ½ Σ_v |p_v − q_v|                                      (in [0, 1])
skl   KL(p ‖ λp + (1−λ)q)                                    (DistiLLM skewed FKL, λ = 0.1)
srkl  KL(q ‖ (1−λ)p + λq)                                    (DistiLLM skewed RKL, λ = 0.1)
akl   adaptive KL (Wu et al. 2024, "Rethinking KL divergence in KD for LLMs", arXiv 2404.02657):
      sort the vocabulary by teacher probability, descending; the head H is the smallest prefix
      whose teacher mass reaches μ (a token is in H iff the teacher mass strictly before it is
      < μ); g_head = Σ_{v∈H} |p_v − q_v|, g_tail = Σ_{v∉H} |p_v − q_v| (both stop-gradient);
      AKL = g_head/(g_head+g_tail)·FKL + g_tail/(g_head+g_tail)·RKL, μ = 0.5 by default.
      (The DSKD code expresses the same split with an ascending sort and "tail = cumulative
      mass ≤ α"; its α corresponds to 1 − μ, identical at the default 0.5.) When p = q the gaps
      are 0 and the weights are taken as ½, ½ (FKL = RKL = 0 there).
gjsd  generalised JSD (GKD, Agarwal et al. 2024; the TRL convention): m = βp + (1−β)q,
        GJSD_β = β·KL(p‖m) + (1−β)·KL(q‖m),  β = 0.5 by default (then GJSD = JS).
      The raw GJSD_β tends to 0 at both ends, so "β=0 → FKL, β=1 → RKL" (METHOD.md) holds for
      the normalised value GJSD_β / (β(1−β)), which tends to KL(p‖q) as β→0 and to KL(q‖p) as
      β→1. We implement:
        normalize=False (default, as TRL): GJSD_β for 0 < β < 1, exactly FKL at β = 0 and
                                           exactly RKL at β = 1;
        normalize=True:                    GJSD_β / (β(1−β)) for 0 < β < 1 (continuous in β),
                                           FKL at β = 0 and RKL at β = 1.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

F32 = jnp.float32
LOG_FLOOR = -1.0e4  # lower clamp of log-probabilities inside log-ratios (see module docstring)


# ------------------------------------------------------------------------------------------
# Log-probabilities
# ------------------------------------------------------------------------------------------

def log_probs(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """float32 log_softmax(logits / τ) over the last axis, safe for −inf entries.

  logits: [..., V] any float dtype. Returns [..., V] float32; −inf columns stay −inf, and a row
  that is entirely −inf gives all −inf (probabilities 0) instead of NaN.
  """
  z = logits.astype(F32) / jnp.asarray(temperature, F32)
  zmax = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  zmax = jnp.where(jnp.isfinite(zmax), zmax, 0.0)
  shifted = z - zmax
  total = jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True)
  return shifted - jnp.log(jnp.where(total > 0, total, 1.0))


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


def masked_sum(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Σ mask·values, Σ mask), both float32 scalars.

  values: [B, T]; mask: [B, T] bool / int / float weights. Positions with mask 0 contribute
  exactly 0 even if their value is inf or NaN.
  """
  weights = mask.astype(F32)
  kept = jnp.where(weights != 0, values.astype(F32) * weights, 0.0)
  return jnp.sum(kept), jnp.sum(weights)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Σ mask·values / Σ mask as a float32 scalar; 0 (with zero, finite gradient) if Σ mask = 0."""
  total, count = masked_sum(values, mask)
  return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def kd_loss(name: str, student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array,
            *, temperature: float = 1.0, **params) -> tuple[jax.Array, jax.Array]:
  """KD_sum of METHOD.md §4: (Σ_mask divergence, Σ mask), float32 scalars.

  student_logits, teacher_logits: [B, T, V]; mask: [B, T] (response tokens). The caller
  normalises by the global token count.
  """
  per_token = token_divergence(name, student_logits, teacher_logits,
                               temperature=temperature, **params)
  return masked_sum(per_token, mask)
