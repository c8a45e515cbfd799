"""Shared numerics: the float32 dtype every loss and reduction runs in, and masked reductions.

All reductions return float32 whatever the input dtype; masks may be bool, int or float weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


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
