"""Pieces shared by the cross-tokenizer KD methods (losses/methods/): sides, pairings, heads.

Every cross-tokenizer loss is a pure function of arrays that returns sums, never means (the
objective divides by the global student response-token count, docs/method.md §4): `(sum, count)`
or `(sum, count, parts)` with float32 scalars, count = the student response positions that got a
term, parts = summed components for logging. Teacher quantities are stop-gradient; softmax, logs
and reductions run in float32; masks instead of boolean indexing; empty masks give 0 with finite
gradients. Shapes: B batch, Ls / Lt student / teacher length, Vs / Vt vocabularies, dS / dT
hidden sizes; masks are the batch's response masks (`loss_mask`, core/spec.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cot2align_jax.core.numerics import F32, log_probs, masked_sum
from cot2align_jax.losses import divergences as dv
from cot2align_jax.losses import vocab_chunk as vc

NEG_LOGIT = -1.0e5          # "impossible" logit of the MinED reference and the attention mask

sg = jax.lax.stop_gradient


class KDSide(NamedTuple):
  """One model's main-view arrays (student or teacher side).

  logits [B, L, V] float; hidden [B, L, D] final normed states (ModelOutput.hidden_states[-1]);
  input_ids, labels, mask [B, L] int (mask = loss_mask, the response tokens);
  embed [V, D] the token embedding table (DSKD-CMA only); head [D, V] the LM head
  (Transformer.output_matrix()); lm: its softcap / valid rows (vocab_chunk.HeadSpec), for the
  chunked losses, where logits is None.
  """

  logits: jax.Array
  hidden: jax.Array
  input_ids: jax.Array | None
  labels: jax.Array
  mask: jax.Array
  embed: jax.Array | None
  head: jax.Array
  lm: vc.HeadSpec | None = None

  def lg(self) -> vc.Logits:
    """This side's logits as a vocab_chunk.Logits (hidden · head, never materialised)."""
    return vc.side_logits(self.hidden, self.head, self.lm)

  @property
  def valid(self) -> int | None:
    """Ids at or past this are −inf logits (padded vocabulary), None = all rows."""
    return None if self.lm is None else self.lm.valid


def token_div(name: str, student_logits: jax.Array, teacher_logits: jax.Array,
              temperature: float, params: dict) -> jax.Array:
  """Per-position divergence D(student ‖ sg(teacher)) [B, T] float32 (losses/divergences.py)."""
  return dv.token_divergence(name, student_logits, teacher_logits, temperature=temperature,
                             **params)


def as_bool(mask: jax.Array) -> jax.Array:
  return mask.astype(bool)


def response_order(mask: jax.Array) -> jax.Array:
  """mask [B, L] -> order [B, L] int32: order[b, k] is the position of the k-th valid token.

  The valid positions come first in their original order (stable sort on "invalid"); entries
  at k >= n_valid are the invalid positions and must be masked by the caller.
  """
  return jnp.argsort((~as_bool(mask)).astype(jnp.int32), axis=-1, stable=True).astype(jnp.int32)


def gather_positions(x: jax.Array, pos: jax.Array) -> jax.Array:
  """x [B, L, ...] gathered at positions pos [B, K] along axis 1 -> [B, K, ...]."""
  idx = pos.reshape(pos.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def rank_pairs(student_mask: jax.Array, teacher_mask: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pairs the k-th student response token with the k-th teacher response token.

  student_mask [B, Ls], teacher_mask [B, Lt] -> (s_pos [B, K], t_pos [B, K], pair [B, K] bool)
  with K = min(Ls, Lt); pair[b, k] is True for k < min(n_S[b], n_T[b]).
  """
  k = min(student_mask.shape[1], teacher_mask.shape[1])
  s_pos = response_order(student_mask)[:, :k]
  t_pos = response_order(teacher_mask)[:, :k]
  n_pairs = jnp.minimum(jnp.sum(as_bool(student_mask), axis=1),
                        jnp.sum(as_bool(teacher_mask), axis=1))
  pair = jnp.arange(k)[None, :] < n_pairs[:, None]
  return s_pos, t_pos, pair


def pad_last(x: jax.Array, size: int) -> jax.Array:
  """Zero-pads the last axis of x to `size` (no-op if already that long)."""
  extra = size - x.shape[-1]
  if extra <= 0:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def like_vocab_mask(logits: jax.Array, reference: jax.Array) -> jax.Array:
  """Sets logits [..., V] to −inf wherever the reference logits are −inf (padded vocabulary)."""
  return jnp.where(jnp.isneginf(reference), -jnp.inf, logits)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """−log softmax(logits)[label] per position: [B, T, V], [B, T] -> [B, T] float32."""
  lp = log_probs(logits)
  safe_labels = jnp.clip(labels, 0, logits.shape[-1] - 1)
  return -jnp.take_along_axis(lp, safe_labels[..., None], axis=-1)[..., 0]


def project_head(h: jax.Array, head: jax.Array) -> jax.Array:
  """h [B, T, D] times an LM head [D, V] -> float32 logits [B, T, V].

  Like Transformer.logits: h is cast to the head's dtype (a bf16 head is never copied to
  float32) and the product accumulates in float32.
  """
  return jnp.einsum("btd,dv->btv", h.astype(head.dtype), head, preferred_element_type=F32)


def t2s_terms(t2s_logits: jax.Array, student: KDSide, mask: jax.Array, *, divergence: str,
              temperature: float, div_params: dict, agreement_mask: bool) -> dict:
  """The DSKD family's teacher-to-student terms at the positions of `mask` [B, Ls]:
  t2s_CE = Σ CE(t2s_logits, label) (τ = 1) and t2s_KD = Σ [argmax t2s = label]·D(student ‖
  sg(t2s_logits)) at τ (the bracket only with agreement_mask), with their counts."""
  t2s_logits = like_vocab_mask(t2s_logits, sg(student.logits))
  ce_sum, count = masked_sum(cross_entropy(t2s_logits, student.labels), mask)
  agree = jnp.argmax(t2s_logits, axis=-1) == student.labels
  kd_mask = as_bool(mask) & agree if agreement_mask else as_bool(mask)
  kd = token_div(divergence, student.logits, sg(t2s_logits), temperature, div_params)
  kd_sum, kd_count = masked_sum(kd, kd_mask)
  acc, _ = masked_sum(agree.astype(F32), mask)
  return {"t2s_ce": ce_sum, "t2s_kd": kd_sum, "t2s_kd_count": kd_count, "t2s_acc": acc,
          "count": count}


def t2s_terms_chunked(t2s: vc.Logits, student: KDSide, mask: jax.Array, *, chunk: int,
                      divergence: str, temperature: float, div_params: dict,
                      agreement_mask: bool) -> dict:
  """t2s_terms with the t2s logits (t2s: projected hidden states and sg(W_S), the student's
  −inf rows) and the student's logits computed in vocabulary chunks of at most `chunk`."""
  ce, argmax = vc.cross_entropy(t2s, student.labels, chunk, with_argmax=True)
  ce_sum, count = masked_sum(ce, mask)
  agree = argmax == student.labels
  kd_mask = as_bool(mask) & agree if agreement_mask else as_bool(mask)
  kd = vc.divergence(divergence, student.lg(), t2s, temperature=temperature, chunk=chunk,
                     **div_params)
  kd_sum, kd_count = masked_sum(kd, kd_mask)
  acc, _ = masked_sum(agree.astype(F32), mask)
  return {"t2s_ce": ce_sum, "t2s_kd": kd_sum, "t2s_kd_count": kd_count, "t2s_acc": acc,
          "count": count}


def t2s_head(hidden: jax.Array, student: KDSide) -> vc.Logits:
  """t2s logits hidden [B, L, dS] · sg(W_S) with the student's −inf rows, as a Logits."""
  return vc.projected_logits(hidden, sg(student.head), student.valid)


def s2t_head(hidden: jax.Array, teacher: KDSide) -> vc.Logits:
  """s2t logits hidden [B, L, dT] · sg(W_T) with the teacher's −inf rows, as a Logits."""
  return vc.projected_logits(hidden, sg(teacher.head), teacher.valid)
