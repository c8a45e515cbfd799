"""Plain KD: the configured divergence D(student ‖ teacher) per response token at τ; teacher and
student must share one vocabulary and tokenization (docs/method.md §7)."""

from __future__ import annotations

from cot2align_jax.core.numerics import masked_sum
from cot2align_jax.losses import divergences as dv
from cot2align_jax.losses import vocab_chunk as vc
from cot2align_jax.losses.methods.base import Method, side


def term(inputs, projectors, cfg):
  """KD_sum = Σ_S D(student ‖ teacher) at τ over the student response tokens."""
  s, t = side(inputs, "student"), side(inputs, "teacher")
  if cfg.vocab_chunk > 0:
    per_token = vc.divergence(cfg.divergence, s.lg(), t.lg(), temperature=cfg.temperature,
                              chunk=cfg.vocab_chunk, **cfg.div_params)
    return masked_sum(per_token, s.mask)[0], {}
  total, _ = dv.kd_loss(cfg.divergence, s.logits, t.logits, s.mask,
                        temperature=cfg.temperature, **cfg.div_params)
  return total, {}


METHOD = Method("kd", kd=term, same_vocab=True)
