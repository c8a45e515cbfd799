"""Scoring text with a model: per-token log-probabilities and perplexity."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cot2align_jax.models.transformer import Transformer


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_logprobs(graphdef, state, ids, mask):
  logits = nnx.merge(graphdef, state)(ids, mask, hidden_states="none").logits
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
  return jnp.where(valid, picked, 0.0), valid


def token_logprobs(model: Transformer, ids, mask=None) -> tuple[np.ndarray, np.ndarray]:
  """log p(ids[:, t+1] | ids[:, :t+1]) for ids [B, T]: returns (logprobs [B, T-1] float32 with
  0 where invalid, valid [B, T-1] bool: both the context token and the target are real)."""
  ids = jnp.asarray(ids, jnp.int32)
  mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask, jnp.int32)
  graphdef, state = nnx.split(model)
  lp, valid = _token_logprobs(graphdef, state, ids, mask)
  return np.asarray(lp), np.asarray(valid)


def perplexity(model: Transformer, ids, mask=None) -> np.ndarray:
  """exp(mean negative log-likelihood) per row [B] over the predicted real tokens."""
  lp, valid = token_logprobs(model, ids, mask)
  n = np.maximum(valid.sum(-1), 1)
  return np.exp(-lp.sum(-1) / n)
