"""MinED-KD (docs/method.md §8): teacher logits at the DTW-aligned position, moved into the
student vocabulary by the minimum-edit-distance map, are the target of a KL at τ; positions
without a usable teacher distribution fall back to the one-hot gold label.

Needs the batch's "mined" alignment (main/align/mined_pos, mined_mask) and the teacher->student
vocabulary map (LossInputs.vocab_map).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cot2align_jax.core import spec
from cot2align_jax.core.numerics import F32, masked_sum
from cot2align_jax.losses import vocab_chunk as vc
from cot2align_jax.losses.cross_tokenizer import (NEG_LOGIT, KDSide, as_bool, gather_positions,
                                                  sg, token_div)
from cot2align_jax.losses.methods.base import Method, side

GOLD_LOGIT = 100.0          # one-hot gold logit of the MinED reference


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
  the [B, Ls] bool mask of positions that use the teacher (the rest hold the one-hot gold).

  A position uses the teacher when it is a 1:1 DTW pair (mined_mask), the aligned teacher
  label maps to the student's label, and some teacher id maps into the student vocabulary.
  """
  t_at = gather_positions(sg(teacher_logits), mined_pos)                       # [B, Ls, Vt]
  projected = teacher_logits_in_student_vocab(t_at, vocab_map, student_vocab)
  t_label = jnp.take_along_axis(teacher_labels, mined_pos, axis=1)
  mapped = jnp.take(vocab_map, t_label, mode="clip")
  aligned = (as_bool(mined_mask) & as_bool(student_mask) & (mapped == student_labels)
             & (jnp.max(projected, axis=-1) > NEG_LOGIT))
  gold = jnp.where(jnp.arange(student_vocab) == student_labels[..., None], GOLD_LOGIT, NEG_LOGIT)
  return jnp.where(aligned[..., None], projected, gold), aligned


def mined_loss(student_logits: jax.Array, teacher_logits: jax.Array, student_labels: jax.Array,
               student_mask: jax.Array, teacher_labels: jax.Array, mined_pos: jax.Array,
               mined_mask: jax.Array, vocab_map: jax.Array, *, temperature: float = 1.0,
               divergence: str = "fkl", **div_params) -> tuple[jax.Array, jax.Array]:
  """D(target ‖ student) at τ over the student response tokens.

  student_logits [B, Ls, Vs], teacher_logits [B, Lt, Vt], student_labels / student_mask /
  mined_pos / mined_mask [B, Ls], teacher_labels [B, Lt], vocab_map [Vt] (teacher -> student id).
  Returns (Σ_S D, Σ student_mask).
  """
  target, _ = mined_targets(teacher_logits, student_labels, student_mask, teacher_labels,
                            mined_pos, mined_mask, vocab_map, student_logits.shape[-1])
  per_token = token_div(divergence, student_logits, target, temperature, div_params)
  return masked_sum(per_token, student_mask)


def mined_loss_chunked(student: KDSide, teacher: KDSide, mined_pos: jax.Array,
                       mined_mask: jax.Array, vocab_map: np.ndarray, *, chunk: int,
                       temperature: float = 1.0, divergence: str = "fkl", **div_params
                       ) -> tuple[jax.Array, jax.Array]:
  """mined_loss from hidden states and LM heads, in chunks of the student vocabulary.

  vocab_map must be concrete (numpy, or a constant of the traced function): the teacher ids
  mapped into each student chunk are listed on the host (vocab_chunk.mined_table). Each chunk
  of the target is the segment max of the teacher's logits at those ids (floored at −1e5), or
  the one-hot gold where the position does not use the teacher.
  """
  try:
    vmap = np.asarray(vocab_map)
  except jax.errors.TracerArrayConversionError:
    raise ValueError("mined with kd.vocab_chunk > 0 needs a concrete vocabulary map (not a "
                     "traced argument)") from None
  s_lg = student.lg()
  lay = vc.layout(s_lg.vocab, chunk)
  projected = vc.mined_source(teacher.lg().at(mined_pos), vc.mined_table(vmap, lay), lay,
                              NEG_LOGIT)
  lead = student.labels.shape

  def max_step(best, zs, ids):
    return jnp.maximum(best, jnp.max(zs[0], axis=-1)), None

  best, _ = vc.vocab_scan(max_step, jnp.full(lead, -jnp.inf, F32), [projected], lay)
  t_label = jnp.take_along_axis(teacher.labels, mined_pos, axis=1)
  mapped = jnp.take(jnp.asarray(vmap, jnp.int32), t_label, mode="clip")
  aligned = (as_bool(mined_mask) & as_bool(student.mask) & (mapped == student.labels)
             & (best > NEG_LOGIT))

  def target(j, ids):
    gold = jnp.where(ids == student.labels[..., None], GOLD_LOGIT, NEG_LOGIT)
    gold = jnp.where(ids < lay.vocab, gold, -jnp.inf)
    return jnp.where(aligned[..., None], projected(j, ids), gold)

  per_token = vc.divergence(divergence, s_lg, target, temperature=temperature, chunk=chunk,
                            **div_params)
  return masked_sum(per_token, student.mask)


def term(inputs, projectors, cfg):
  if inputs.vocab_map is None:
    raise ValueError("method 'mined' needs the MinED vocabulary map (LossInputs.vocab_map)")
  s, t = side(inputs, "student"), side(inputs, "teacher")
  b = inputs.batch
  if cfg.vocab_chunk > 0:
    total, _ = mined_loss_chunked(s, t, b[spec.align_key("mined_pos")],
                                  b[spec.align_key("mined_mask")], inputs.vocab_map,
                                  chunk=cfg.vocab_chunk, temperature=cfg.temperature,
                                  divergence=cfg.divergence, **cfg.div_params)
    return total, {}
  total, _ = mined_loss(s.logits, t.logits, s.labels, s.mask, t.labels,
                        b[spec.align_key("mined_pos")], b[spec.align_key("mined_mask")],
                        inputs.vocab_map, temperature=cfg.temperature,
                        divergence=cfg.divergence, **cfg.div_params)
  return total, {}


METHOD = Method("mined", kd=term, alignment=("mined",), needs_vocab_map=True)
