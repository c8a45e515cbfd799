"""Cross-tokenizer KD losses: ULD, MinED, DSKD, DSKD-CMA, DSKD-ETA, MultiLevelOT (METHOD §4, §8).

Every loss is a pure function of arrays (plus, for the DSKD family, the trainable `Projectors`
module) and returns sums, never means: the objective divides by the global number of student
response tokens (METHOD §4). Each returns `(sum, count)` or `(sum, count, parts)`:

  sum    float32 scalar, the loss summed over the positions that received a term;
  count  float32 scalar, the number of *student* response positions that received a term
         (ULD/MultiLevelOT: paired positions; MinED/DSKD/DSKD-CMA: every student response token;
         DSKD-ETA: the exactly aligned student positions);
  parts  dict of float32 scalars for logging (the summed components and their counts).

Conventions: teacher quantities (logits, hidden states, embedding tables, LM heads) are wrapped in
stop_gradient; softmax, logs, sorting, Sinkhorn and reductions run in float32; masks instead of
boolean indexing; shapes static; no Python loop over the batch. Empty masks give 0 with finite
gradients. Divergences and the masked sum come from `cot2align_jax.losses.divergences`
(`token_divergence(name, student_logits, teacher_logits, temperature=τ, **params)`, which
stop-gradients its teacher argument, applies no τ², and handles −inf logits).

Shapes: B batch, Ls / Lt student / teacher sequence length, Vs / Vt vocabulary sizes, dS / dT
hidden sizes. Masks are the response masks (`loss_mask` of the batch contract, data/spec.py).

Modelling decisions (the reference is songmzhang/DSKD, which the CoT2Align code forks):

ULD  The k-th student response token is paired with the k-th teacher response token (rank by
     cumulative count among loss_mask positions; the reference rolls each row so the responses
     start at 0, which is the same pairing). Positions beyond the shorter response get nothing.
     Loss per pair: Σ_v |sort↓(softmax(s/τ))_v − sort↓(softmax(t/τ))_v|, the shorter vocabulary
     zero-padded. The reference applies no temperature (τ = 1); τ is exposed, default 1.0.

MinED Teacher logits are gathered at the DTW position mined_pos[i] and moved into the student
     vocabulary with vocab_map [Vt] (teacher id -> student id; ids outside [0, Vs) mean "no
     student token"): logit_S[v] = max_{t: map[t]=v} logit_T[t] (jax.ops.segment_max), floored
     at −1e5, so student ids no teacher id maps to get −1e5 (the reference's constant). A
     position uses this teacher distribution when it is a 1:1 DTW pair (mined_mask) AND the
     aligned teacher token maps to the student's actual token (vocab_map[teacher_labels[j]] ==
     student_labels[i]) AND some teacher id maps into the student vocabulary (the reference's
     "max != −1e5" check); otherwise the target is the one-hot gold (logit 100 on the label,
     −1e5 elsewhere, as in the reference). The loss is forward KL(target ‖ student) at τ over all
     student response tokens. Our alignment arrays index *label* positions (the bytes of
     labels[i] and labels[j] coincide), so the "actual token" check compares labels; the
     reference's DTW runs on the input ids of the response positions, its analogue.

DSKD (dual space, same vocabulary; Zhang et al. 2024, `dual_space_kd.py`). Positions are 1:1
     (same tokenizer, so Ls == Lt is required): t2s_logits = t2s(h_T)·sg(W_S);
     t2s_CE = Σ_S CE(t2s_logits, labels) (τ = 1); t2s_KD = Σ_S D(student ‖ sg(t2s_logits)) at τ
     over every student response token (no agreement mask in this variant);
     s2t_logits = s2t(h_S)·W_T; s2t_KD = Σ_T KL(p_T ‖ softmax(s2t_logits)) at τ over the teacher
     response tokens. No std normalisation of h_T in this variant (as the reference).

DSKD-CMA (METHOD §4, `dual_space_kd_with_cross_model_attention.py`):
     e_S = [E_S(input); E_S(label)] and e_T likewise, concatenated on the feature axis, with
     positions outside the response mask set to zero *vectors* (the reference embeds token id 0
     there; those positions are masked out of the attention either way, so the only difference
     is in the std below). Embedding lookups are stop-gradient on both sides (the reference
     detaches the student's too); the raw embedding tables are used (no Gemma scale, no GPT-2
     position embedding). Three global stds, each ONE scalar over the whole batch, computed over
     the teacher's *valid response positions* and all features, population std (ddof 0): std(e_T),
     std(E_T(label)), std(h_T). (The reference's torch `.std()` runs over every position of the
     padded batch, prompt and padding included, with ddof 1.) A std of 0 (e.g. no valid
     position) is replaced by 1.
       A = query(e_S)·(e_T/std(e_T))ᵀ / √(2·d_T), set to −1e5 outside valid (i, j) pairs;
       t2s_h = softmax_j(A)·t2s(h_T/std(h_T) + E_T(label)/std(E_T(label)));
       t2s_logits = t2s_h·sg(W_S);  t2s_CE = Σ_S CE(t2s_logits, labels) (τ = 1);
       t2s_KD = Σ_S [argmax t2s_logits = label]·D(student ‖ sg(t2s_logits)) at τ;
       s2t_h = softmax_i(Aᵀ)·s2t(h_S);  s2t_logits = s2t_h·W_T;
       s2t_KD = Σ_T KL(p_T ‖ softmax(s2t_logits)) at τ (always forward KL, as the reference).
     KD_sum = t2s_CE + t2s_KD + s2t_KD.

DSKD-ETA (DSKDv2 with exact token alignment), at the exactly aligned pairs (i, j = eta_pos[i])
     with eta_mask[i] (and both response masks) = 1:
       t2s_logits_i = t2s(h_T[j])·sg(W_S);  t2s_CE = Σ CE(t2s_logits_i, label_i) (τ = 1);
       t2s_KD = Σ [argmax t2s_logits_i = label_i]·D(student_i ‖ sg(t2s_logits_i)) at τ
                (`agreement_mask=False` drops the bracket);
       s2t_logits_i = s2t(h_S[i])·W_T;  s2t_KD = Σ D(s2t_logits_i ‖ p_T[j]) at τ, i.e. the
                configured divergence with the projected student as "student" and the teacher's
                own distribution at j as "teacher" (DSKDv2 uses dist_func in both directions).
     KD_sum = t2s_CE + t2s_KD + s2t_KD. Simplifications against the DSKDv2 code: the t2s CE
     target is the gold label (DSKDv2 uses the teacher's argmax mapped to the student vocab by
     its token string, equal to the gold where the teacher is right; our batch contract carries
     no exact string vocab map), the agreement mask is always on (DSKDv2 switches it off once the
     agreement rate passes a threshold), and the three terms are sums (DSKDv2 divides each by its
     own count; the objective here divides by the student token count). h_T is not normalised.

MultiLevelOT (Cui et al. 2025; the reference is the MultiLevelOT criterion of DSKD forks):
     z = logits / (std_v(logits) + 1e-4) per position (std over the finite vocabulary entries,
     ddof 1 as torch), p = softmax(z/τ) (τ = 2 in the reference, both sides).
     Each side's vocabulary is ordered by its total mass Σ p over the valid response positions of
     the batch (the reference sums over every position, padding included) and cut to the top k
     (50), the shorter zero-padded to k: s̃ [B, Ls, k], t̃ [B, Lt, k].
     Token level, on rank-paired positions (as ULD): Σ_k |s̃ − t̃| + ce_weight·CE with
       CE = −Σ_k softmax(t̃)_k·log softmax(s̃)_k (the reference's "KL_wo" re-softmaxes the top-k
       probability vectors at temperature 1; we keep that, it stays finite with zero padding).
     Sequence level, per row: OT_b = ⟨P, C⟩ with C_ij = ‖s̃_i − t̃_j‖₁ over all valid student
       (i) × teacher (j) response positions, uniform marginals, log-domain Sinkhorn with kernel
       exp(−C/ε), ε = 0.1, 20 fixed iterations (the reference: row/column normalisation of
       exp(−C/0.1), 20 rounds). It is added as seq_weight·n_b·OT_b with n_b the row's number of
       paired positions: the reference's plan has unit row sums (mass n) instead of mass 1, and
       scales by 0.001·0.1 = 1e-4 = seq_weight. Gradient: envelope (stop_gradient(P)·C) by
       default, or unrolled through the iterations with unrolled_grad=True.
     Fixed against the reference: it re-softmaxes the probabilities inside its Sinkhorn (we use
     s̃, t̃ as METHOD §8 says), and it multiplies one batch-mean scalar by the number of valid
     pairs (we sum per pair and per sequence).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cot2align_jax.losses.projectors import Projectors

F32 = jnp.float32
NEG_LOGIT = -1.0e5          # "impossible" logit of the MinED reference and the attention mask
GOLD_LOGIT = 100.0          # one-hot gold logit of the MinED reference
_LSE_MASK = -1.0e30         # masked exponent inside Sinkhorn's logsumexp (finite, no NaN)

sg = jax.lax.stop_gradient


# ------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------

def _divergences():
  """The divergences module (imported lazily: it is developed beside this file)."""
  from cot2align_jax.losses import divergences
  return divergences


def _token_div(name: str, student_logits: jax.Array, teacher_logits: jax.Array,
               temperature: float, params: dict) -> jax.Array:
  """Per-position divergence D(student ‖ sg(teacher)) [B, T] float32 (see divergences.py)."""
  return _divergences().token_divergence(name, student_logits, teacher_logits,
                                         temperature=temperature, **params)


def _masked_sum(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Σ mask·values, Σ mask) as float32 scalars; masked positions contribute exactly 0."""
  return _divergences().masked_sum(values, mask)


def _log_probs(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """float32 log_softmax(logits/τ) [..., V], safe for −inf entries."""
  return _divergences().log_probs(logits, temperature)


def _bool(mask: jax.Array) -> jax.Array:
  return mask.astype(bool)


def response_order(mask: jax.Array) -> jax.Array:
  """mask [B, L] -> order [B, L] int32: order[b, k] is the position of the k-th valid token.

  The valid positions come first in their original order (stable sort on "invalid"); entries
  at k >= n_valid are the invalid positions and must be masked by the caller.
  """
  return jnp.argsort((~_bool(mask)).astype(jnp.int32), axis=-1, stable=True).astype(jnp.int32)


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
  n_pairs = jnp.minimum(jnp.sum(_bool(student_mask), axis=1), jnp.sum(_bool(teacher_mask), axis=1))
  pair = jnp.arange(k)[None, :] < n_pairs[:, None]
  return s_pos, t_pos, pair


def _pad_last(x: jax.Array, size: int) -> jax.Array:
  """Zero-pads the last axis of x to `size` (no-op if already that long)."""
  extra = size - x.shape[-1]
  if extra <= 0:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def _like_vocab_mask(logits: jax.Array, reference: jax.Array) -> jax.Array:
  """Sets logits [..., V] to −inf wherever the reference logits are −inf (padded vocabulary)."""
  return jnp.where(jnp.isneginf(reference), -jnp.inf, logits)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """−log softmax(logits)[label] per position: [B, T, V], [B, T] -> [B, T] float32."""
  lp = _log_probs(logits)
  safe_labels = jnp.clip(labels, 0, logits.shape[-1] - 1)
  return -jnp.take_along_axis(lp, safe_labels[..., None], axis=-1)[..., 0]


def _masked_std(x: jax.Array, mask: jax.Array) -> jax.Array:
  """One float32 scalar: population std of x [B, L, D] over the valid rows (mask [B, L]) and
  all features; 1 when there is nothing (or no spread) to measure."""
  w = _bool(mask).astype(F32)[..., None]
  x = x.astype(F32)
  n = jnp.sum(w) * x.shape[-1]
  safe_n = jnp.maximum(n, 1.0)
  mean = jnp.sum(x * w) / safe_n
  var = jnp.sum(jnp.square(x - mean) * w) / safe_n
  return jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 1.0)


def _embed(table: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Rows of table [V, D] for ids [B, L] as float32, zero vectors where mask is 0."""
  safe_ids = jnp.where(_bool(mask), ids, 0)
  e = jnp.take(table, safe_ids, axis=0).astype(F32)
  return e * _bool(mask).astype(F32)[..., None]


def _project_head(h: jax.Array, head: jax.Array) -> jax.Array:
  """h [B, T, D] times an LM head [D, V] -> float32 logits [B, T, V].

  Like Transformer.logits: h is cast to the head's dtype (a bf16 head is never copied to
  float32) and the product accumulates in float32.
  """
  return jnp.einsum("btd,dv->btv", h.astype(head.dtype), head, preferred_element_type=F32)


class KDSide(NamedTuple):
  """One model's arrays for the DSKD family (student or teacher side of the main view).

  logits [B, L, V] float; hidden [B, L, D] final normed states (ModelOutput.hidden_states[-1]);
  input_ids, labels, mask [B, L] int (mask = loss_mask, the response tokens);
  embed [V, D] the token embedding table (Transformer.embed[...]), needed by DSKD-CMA only;
  head [D, V] the LM head (Transformer.output_matrix()).
  """

  logits: jax.Array
  hidden: jax.Array
  input_ids: jax.Array | None
  labels: jax.Array
  mask: jax.Array
  embed: jax.Array | None
  head: jax.Array


# ------------------------------------------------------------------------------------------
# ULD
# ------------------------------------------------------------------------------------------

def uld_loss(student_logits: jax.Array, teacher_logits: jax.Array, student_mask: jax.Array,
             teacher_mask: jax.Array, *, temperature: float = 1.0
             ) -> tuple[jax.Array, jax.Array]:
  """Universal Logit Distillation (Boizard et al. 2024), without its CE term.

  student_logits [B, Ls, Vs], teacher_logits [B, Lt, Vt], masks [B, Ls] / [B, Lt].
  Returns (Σ_pairs Σ_v |sorted p_S − sorted p_T|, number of pairs).
  """
  s_pos, t_pos, pair = rank_pairs(student_mask, teacher_mask)
  p_s = jnp.exp(_log_probs(gather_positions(student_logits, s_pos), temperature))
  p_t = jnp.exp(_log_probs(gather_positions(sg(teacher_logits), t_pos), temperature))
  size = max(p_s.shape[-1], p_t.shape[-1])
  sorted_s = _pad_last(-jnp.sort(-p_s, axis=-1), size)
  sorted_t = _pad_last(-jnp.sort(-p_t, axis=-1), size)
  l1 = jnp.sum(jnp.abs(sorted_s - sorted_t), axis=-1)
  return _masked_sum(l1, pair)


# ------------------------------------------------------------------------------------------
# MinED
# ------------------------------------------------------------------------------------------

def teacher_logits_in_student_vocab(teacher_logits: jax.Array, vocab_map: jax.Array,
                                    student_vocab: int, *, floor: float = NEG_LOGIT
                                    ) -> jax.Array:
  """[..., Vt] teacher logits -> [..., Vs] float32: max over teacher ids mapped to each
  student id (vocab_map [Vt] int, ids outside [0, Vs) dropped), floored at `floor`."""
  lead = teacher_logits.shape[:-1]
  flat = teacher_logits.astype(F32).reshape(-1, teacher_logits.shape[-1]).T        # [Vt, N]
  out = jax.ops.segment_max(flat, vocab_map.astype(jnp.int32), num_segments=student_vocab)
  out = jnp.maximum(out, floor)                                                       # [Vs, N]
  return out.T.reshape(lead + (student_vocab,))


def mined_targets(teacher_logits: jax.Array, student_labels: jax.Array,
                  student_mask: jax.Array, teacher_labels: jax.Array, mined_pos: jax.Array,
                  mined_mask: jax.Array, vocab_map: jax.Array, student_vocab: int
                  ) -> tuple[jax.Array, jax.Array]:
  """MinED teacher logits in the student vocabulary, [B, Ls, Vs] float32 (stop-gradient), and
  the [B, Ls] bool mask of positions that use the teacher (the rest hold the one-hot gold)."""
  t_at = gather_positions(sg(teacher_logits), mined_pos)                       # [B, Ls, Vt]
  projected = teacher_logits_in_student_vocab(t_at, vocab_map, student_vocab)
  t_label = jnp.take_along_axis(teacher_labels, mined_pos, axis=1)
  mapped = jnp.take(vocab_map, t_label, mode="clip")
  aligned = (_bool(mined_mask) & _bool(student_mask) & (mapped == student_labels)
             & (jnp.max(projected, axis=-1) > NEG_LOGIT))
  gold = jnp.where(jnp.arange(student_vocab) == student_labels[..., None], GOLD_LOGIT, NEG_LOGIT)
  return jnp.where(aligned[..., None], projected, gold), aligned


def mined_loss(student_logits: jax.Array, teacher_logits: jax.Array, student_labels: jax.Array,
               student_mask: jax.Array, teacher_labels: jax.Array, mined_pos: jax.Array,
               mined_mask: jax.Array, vocab_map: jax.Array, *, temperature: float = 1.0,
               divergence: str = "fkl", **div_params) -> tuple[jax.Array, jax.Array]:
  """MinED-KD (METHOD §8): forward KL(target ‖ student) at τ over the student response tokens.

  student_logits [B, Ls, Vs], teacher_logits [B, Lt, Vt], student_labels / student_mask /
  mined_pos / mined_mask [B, Ls], teacher_labels [B, Lt], vocab_map [Vt] (teacher -> student id).
  Returns (Σ_S KL, Σ student_mask).
  """
  target, _ = mined_targets(teacher_logits, student_labels, student_mask, teacher_labels,
                            mined_pos, mined_mask, vocab_map, student_logits.shape[-1])
  per_token = _token_div(divergence, student_logits, target, temperature, div_params)
  return _masked_sum(per_token, student_mask)


# ------------------------------------------------------------------------------------------
# DSKD family
# ------------------------------------------------------------------------------------------

def _t2s_terms(t2s_logits: jax.Array, student: KDSide, mask: jax.Array, *, divergence: str,
               temperature: float, div_params: dict, agreement_mask: bool) -> dict:
  """t2s_CE, t2s_KD (and counts) at the positions of `mask` [B, Ls]."""
  t2s_logits = _like_vocab_mask(t2s_logits, sg(student.logits))
  ce_sum, count = _masked_sum(_cross_entropy(t2s_logits, student.labels), mask)
  agree = jnp.argmax(t2s_logits, axis=-1) == student.labels
  kd_mask = _bool(mask) & agree if agreement_mask else _bool(mask)
  kd = _token_div(divergence, student.logits, sg(t2s_logits), temperature, div_params)
  kd_sum, kd_count = _masked_sum(kd, kd_mask)
  acc, _ = _masked_sum(agree.astype(F32), mask)
  return {"t2s_ce": ce_sum, "t2s_kd": kd_sum, "t2s_kd_count": kd_count, "t2s_acc": acc,
          "count": count}


def dskd_loss(projectors: Projectors, student: KDSide, teacher: KDSide, *,
              divergence: str = "fkl", temperature: float = 1.0, **div_params
              ) -> tuple[jax.Array, jax.Array, dict]:
  """Dual-space KD for a shared tokenizer (positions 1:1, Ls == Lt); see the module docstring.

  projectors: `Projectors` with t2s and s2t. Returns (t2s_CE + t2s_KD + s2t_KD, Σ student
  mask, parts).
  """
  projectors.require("t2s", "s2t")
  if student.logits.shape[1] != teacher.logits.shape[1]:
    raise ValueError("dskd (same tokenizer) needs equal student/teacher lengths; use dskd_cma "
                     f"or dskd_eta for different tokenizers (got {student.logits.shape[1]} and "
                     f"{teacher.logits.shape[1]})")
  t2s_logits = _project_head(projectors.t2s(sg(teacher.hidden)), sg(student.head))
  parts = _t2s_terms(t2s_logits, student, student.mask, divergence=divergence,
                     temperature=temperature, div_params=div_params, agreement_mask=False)
  s2t_logits = _project_head(projectors.s2t(student.hidden), sg(teacher.head))
  s2t_logits = _like_vocab_mask(s2t_logits, sg(teacher.logits))
  s2t = _token_div("fkl", s2t_logits, teacher.logits, temperature, {})
  parts["s2t_kd"], parts["s2t_count"] = _masked_sum(s2t, teacher.mask)
  total = parts["t2s_ce"] + parts["t2s_kd"] + parts["s2t_kd"]
  return total, parts.pop("count"), parts


def cma_attention_logits(projectors: Projectors, student: KDSide, teacher: KDSide) -> jax.Array:
  """DSKD-CMA alignment scores A [B, Ls, Lt] float32, −1e5 outside valid (i, j) pairs."""
  e_s = jnp.concatenate([_embed(sg(student.embed), student.input_ids, student.mask),
                         _embed(sg(student.embed), student.labels, student.mask)], axis=-1)
  e_t = jnp.concatenate([_embed(sg(teacher.embed), teacher.input_ids, teacher.mask),
                         _embed(sg(teacher.embed), teacher.labels, teacher.mask)], axis=-1)
  keys = e_t / _masked_std(e_t, teacher.mask)
  queries = projectors.query(e_s)
  scores = jnp.einsum("bid,bjd->bij", queries, keys, preferred_element_type=F32)
  scores = scores / math.sqrt(e_t.shape[-1])
  valid = _bool(student.mask)[:, :, None] & _bool(teacher.mask)[:, None, :]
  return jnp.where(valid, scores, NEG_LOGIT)


def dskd_cma_loss(projectors: Projectors, student: KDSide, teacher: KDSide, *,
                  divergence: str = "fkl", temperature: float = 1.0, **div_params
                  ) -> tuple[jax.Array, jax.Array, dict]:
  """DSKD with cross-model attention (METHOD §4); see the module docstring.

  projectors: `Projectors` with query, t2s, s2t. student/teacher: KDSide with embed tables.
  Returns (KD_sum = t2s_CE + t2s_KD + s2t_KD, Σ student mask, parts).
  """
  projectors.require("query", "t2s", "s2t")
  scores = cma_attention_logits(projectors, student, teacher)
  h_t = sg(teacher.hidden).astype(F32)
  label_t = _embed(sg(teacher.embed), teacher.labels, teacher.mask)
  values_t = projectors.t2s(h_t / _masked_std(h_t, teacher.mask)
                            + label_t / _masked_std(label_t, teacher.mask))     # [B, Lt, dS]
  t2s_h = jnp.einsum("bij,bjd->bid", jax.nn.softmax(scores, axis=-1), values_t)
  t2s_logits = _project_head(t2s_h, sg(student.head))
  parts = _t2s_terms(t2s_logits, student, student.mask, divergence=divergence,
                     temperature=temperature, div_params=div_params, agreement_mask=True)
  values_s = projectors.s2t(student.hidden)                                       # [B, Ls, dT]
  s2t_weights = jax.nn.softmax(jnp.swapaxes(scores, 1, 2), axis=-1)               # [B, Lt, Ls]
  s2t_h = jnp.einsum("bji,bid->bjd", s2t_weights, values_s)
  s2t_logits = _like_vocab_mask(_project_head(s2t_h, sg(teacher.head)), sg(teacher.logits))
  s2t = _token_div("fkl", s2t_logits, teacher.logits, temperature, {})
  parts["s2t_kd"], parts["s2t_count"] = _masked_sum(s2t, teacher.mask)
  total = parts["t2s_ce"] + parts["t2s_kd"] + parts["s2t_kd"]
  return total, parts.pop("count"), parts


def dskd_eta_loss(projectors: Projectors, student: KDSide, teacher: KDSide,
                  eta_pos: jax.Array, eta_mask: jax.Array, *, divergence: str = "fkl",
                  temperature: float = 1.0, agreement_mask: bool = True, **div_params
                  ) -> tuple[jax.Array, jax.Array, dict]:
  """DSKD-ETA (DSKDv2 exact token alignment); see the module docstring.

  eta_pos / eta_mask [B, Ls]: teacher label position aligned to each student label position.
  Returns (t2s_CE + t2s_KD + s2t_KD, number of aligned pairs, parts).
  """
  projectors.require("t2s", "s2t")
  pairs = (_bool(eta_mask) & _bool(student.mask)
           & jnp.take_along_axis(_bool(teacher.mask), eta_pos, axis=1))
  h_t = gather_positions(sg(teacher.hidden), eta_pos)                            # [B, Ls, dT]
  t2s_logits = _project_head(projectors.t2s(h_t), sg(student.head))
  parts = _t2s_terms(t2s_logits, student, pairs, divergence=divergence,
                     temperature=temperature, div_params=div_params,
                     agreement_mask=agreement_mask)
  t_logits = gather_positions(sg(teacher.logits), eta_pos)                       # [B, Ls, Vt]
  s2t_logits = _project_head(projectors.s2t(student.hidden), sg(teacher.head))
  s2t_logits = _like_vocab_mask(s2t_logits, t_logits)
  s2t = _token_div(divergence, s2t_logits, t_logits, temperature, div_params)
  parts["s2t_kd"], parts["s2t_count"] = _masked_sum(s2t, pairs)
  total = parts["t2s_ce"] + parts["t2s_kd"] + parts["s2t_kd"]
  return total, parts.pop("count"), parts


# ------------------------------------------------------------------------------------------
# MultiLevelOT
# ------------------------------------------------------------------------------------------

def std_normalise(logits: jax.Array, eps: float = 1e-4) -> jax.Array:
  """logits [..., V] / (std over the finite entries (ddof 1) + eps), −inf kept; float32."""
  x = logits.astype(F32)
  finite = jnp.isfinite(x)
  n = jnp.sum(finite, axis=-1, keepdims=True).astype(F32)
  xz = jnp.where(finite, x, 0.0)
  mean = jnp.sum(xz, axis=-1, keepdims=True) / jnp.maximum(n, 1.0)
  var = jnp.sum(jnp.where(finite, jnp.square(xz - mean), 0.0), axis=-1, keepdims=True)
  var = var / jnp.maximum(n - 1.0, 1.0)
  std = jnp.sqrt(jnp.where(var > 0, var, 1.0)) * (var > 0)
  return jnp.where(finite, xz / (std + eps), -jnp.inf)


def _top_mass_vocab(probs: jax.Array, mask: jax.Array, k: int) -> jax.Array:
  """probs [B, L, V] -> [B, L, k]: the k vocabulary columns of largest total mass over the valid
  positions (descending), zero-padded when V < k."""
  mass = jnp.sum(sg(probs) * _bool(mask).astype(F32)[..., None], axis=(0, 1))
  keep = min(k, probs.shape[-1])
  _, columns = jax.lax.top_k(mass, keep)
  return _pad_last(jnp.take(probs, columns, axis=-1), k)


def _sinkhorn_from_cost(cost: jax.Array, a: jax.Array, b: jax.Array, epsilon: float,
                        iters: int) -> jax.Array:
  """Entropic OT plan P [n, m] float32 for cost [n, m] and marginals a [n], b [m].

  Log-domain Sinkhorn with kernel exp(−C/ε), `iters` fixed rounds (rows then columns), zero
  marginal entries = padding (their rows/columns of P are 0). A side with no mass gives P = 0.
  """
  cost = cost.astype(F32)
  va, vb = a > 0, b > 0
  log_a = jnp.log(jnp.where(va, a, 1.0))
  log_b = jnp.log(jnp.where(vb, b, 1.0))

  def body(_, fg):
    f, g = fg
    zf = jnp.where(vb[None, :], (g[None, :] - cost) / epsilon, _LSE_MASK)
    f = jnp.where(va, epsilon * (log_a - jax.nn.logsumexp(zf, axis=1)), 0.0)
    zg = jnp.where(va[:, None], (f[:, None] - cost) / epsilon, _LSE_MASK)
    g = jnp.where(vb, epsilon * (log_b - jax.nn.logsumexp(zg, axis=0)), 0.0)
    return f, g

  f, g = jax.lax.fori_loop(0, iters, body, (jnp.zeros_like(a), jnp.zeros_like(b)))
  both = va[:, None] & vb[None, :]
  exponent = jnp.where(both, (f[:, None] + g[None, :] - cost) / epsilon, _LSE_MASK)
  return jnp.where(both, jnp.exp(exponent), 0.0)


def _uniform(mask: jax.Array) -> jax.Array:
  """mask [B, L] -> [B, L] float32 weights 1/n on valid positions (all 0 if none)."""
  w = _bool(mask).astype(F32)
  return w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1.0)


def multilevel_ot_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                       student_mask: jax.Array, teacher_mask: jax.Array, *,
                       temperature: float = 2.0, top_k: int = 50, ce_weight: float = 0.1,
                       seq_weight: float = 1e-4, sinkhorn_epsilon: float = 0.1,
                       sinkhorn_iters: int = 20, unrolled_grad: bool = False
                       ) -> tuple[jax.Array, jax.Array, dict]:
  """MultiLevelOT (METHOD §8); see the module docstring.

  student_logits [B, Ls, Vs], teacher_logits [B, Lt, Vt], masks [B, Ls] / [B, Lt].
  Returns (token_l1 + ce_weight·token_ce + seq_weight·seq_ot, number of pairs, parts).
  """
  p_s = jnp.exp(_log_probs(std_normalise(student_logits), temperature))
  p_t = jnp.exp(_log_probs(std_normalise(sg(teacher_logits)), temperature))
  s_top = _top_mass_vocab(p_s, student_mask, top_k)                               # [B, Ls, k]
  t_top = _top_mass_vocab(p_t, teacher_mask, top_k)                               # [B, Lt, k]

  s_pos, t_pos, pair = rank_pairs(student_mask, teacher_mask)
  s_pair, t_pair = gather_positions(s_top, s_pos), gather_positions(t_top, t_pos)
  l1_sum, count = _masked_sum(jnp.sum(jnp.abs(s_pair - t_pair), axis=-1), pair)
  ce = -jnp.sum(jax.nn.softmax(t_pair, axis=-1) * jax.nn.log_softmax(s_pair, axis=-1), axis=-1)
  ce_sum, _ = _masked_sum(ce, pair)

  cost = jnp.sum(jnp.abs(s_top[:, :, None, :] - t_top[:, None, :, :]), axis=-1)  # [B, Ls, Lt]
  plan_fn = partial(_sinkhorn_from_cost, epsilon=sinkhorn_epsilon, iters=sinkhorn_iters)
  plan = jax.vmap(plan_fn)(cost, _uniform(student_mask), _uniform(teacher_mask))
  if not unrolled_grad:
    plan = sg(plan)
  seq_ot = jnp.sum(plan * cost, axis=(1, 2))                                      # [B]
  seq_sum = jnp.sum(seq_ot * jnp.sum(pair, axis=-1).astype(F32))

  total = l1_sum + ce_weight * ce_sum + seq_weight * seq_sum
  parts = {"token_l1": l1_sum, "token_ce": ce_sum, "seq_ot": seq_sum,
           "seq_ot_mean": jnp.mean(seq_ot)}
  return total, count, parts
