"""MultiLevelOT (Cui et al. 2025; docs/method.md §8, deviations §6).

z = logits / (std_v(logits) + 1e-4) per position, p = softmax(z/τ); each side's vocabulary is
ordered by its total mass over the valid response positions and cut to the top k (the shorter
zero-padded): s̃ [B, Ls, k], t̃ [B, Lt, k].
  token level, on rank-paired positions: Σ_k |s̃ − t̃| + ce_weight·CE(softmax(t̃), softmax(s̃));
  sequence level, per row: OT_b = <P, C>, C_ij = ‖s̃_i − t̃_j‖₁, uniform marginals, entropic
  Sinkhorn (losses/ot.py, ε = sinkhorn_epsilon, sinkhorn_iters iterations), added as
  seq_weight·n_b·OT_b with n_b the row's number of paired positions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cot2align_jax.core.numerics import F32, log_probs, masked_sum
from cot2align_jax.losses import ot
from cot2align_jax.losses import vocab_chunk as vc
from cot2align_jax.losses.cross_tokenizer import (as_bool, gather_positions, pad_last,
                                                  rank_pairs, sg)
from cot2align_jax.losses.methods.base import Method, params_of, side


@dataclasses.dataclass(frozen=True)
class Params:
  """top_k: vocabulary columns kept; ce_weight: weight of the token-level CE; seq_weight: weight
  of the sequence-level OT (the reference's 0.001·0.1); sinkhorn_epsilon / sinkhorn_iters: its
  Sinkhorn; unrolled_grad: differentiate through the iterations (default: envelope)."""
  top_k: int = 50
  ce_weight: float = 0.1
  seq_weight: float = 1e-4
  sinkhorn_epsilon: float = 0.1
  sinkhorn_iters: int = 20
  unrolled_grad: bool = False

  def ot_config(self) -> ot.OTConfig:
    """The solver settings of the sequence-level OT."""
    return ot.OTConfig(epsilon=self.sinkhorn_epsilon, num_iters=self.sinkhorn_iters,
                       grad="unrolled" if self.unrolled_grad else "envelope")


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


def top_mass_vocab(probs: jax.Array, mask: jax.Array, k: int) -> jax.Array:
  """probs [B, L, V] -> [B, L, k]: the k vocabulary columns of largest total mass over the valid
  positions (descending), zero-padded when V < k."""
  mass = jnp.sum(sg(probs) * as_bool(mask).astype(F32)[..., None], axis=(0, 1))
  keep = min(k, probs.shape[-1])
  _, columns = jax.lax.top_k(mass, keep)
  return pad_last(jnp.take(probs, columns, axis=-1), k)


def top_mass_chunked(lg: vc.Logits, mask: jax.Array, k: int, *, temperature: float,
                     chunk: int, eps: float = 1e-4) -> jax.Array:
  """top_mass_vocab(softmax(std_normalise(logits)/τ), mask, k) -> [B, L, k] from hidden states
  and an LM head, in vocabulary chunks: pass 1 count and sum of the finite logits (mean),
  pass 2 their squared deviations (std, ddof 1), pass 3 the log-normaliser of the normalised
  logits at τ, pass 4 the mass of each column over the valid positions; then the k columns
  of largest mass are computed directly (h · W[:, columns])."""
  lay = vc.layout(lg.vocab, chunk)
  lead = lg.hidden.shape[:-1]
  base = vc.chunk_fn(lg, lay)

  def moments(carry, zs, ids):
    n, total = carry
    finite = jnp.isfinite(zs[0])
    return (n + jnp.sum(finite, axis=-1).astype(F32),
            total + jnp.sum(jnp.where(finite, zs[0], 0.0), axis=-1)), None

  zero = jnp.zeros(lead, F32)
  (n, total), _ = vc.vocab_scan(moments, (zero, zero), [base], lay)
  mean = total / jnp.maximum(n, 1.0)

  def spread(acc, zs, ids):
    x = zs[0]
    dev = jnp.where(jnp.isfinite(x), jnp.square(jnp.where(jnp.isfinite(x), x, 0.0)
                                                - mean[..., None]), 0.0)
    return acc + jnp.sum(dev, axis=-1), None

  var, _ = vc.vocab_scan(spread, zero, [base], lay)
  var = var / jnp.maximum(n - 1.0, 1.0)
  std = jnp.sqrt(jnp.where(var > 0, var, 1.0)) * (var > 0)
  scale = 1.0 / (std + eps)

  def normalised(x):
    finite = jnp.isfinite(x)
    return jnp.where(finite, jnp.where(finite, x, 0.0) * scale[..., None], -jnp.inf)

  def z_fn(j, ids):
    return normalised(base(j, ids))

  (lse,) = vc.log_normalisers([z_fn], [temperature], lay, lead)
  w = as_bool(mask).astype(F32)[..., None]

  def mass(carry, zs, ids):
    p = jnp.exp(sg(zs[0]) / temperature - sg(lse)[..., None])
    return carry, jnp.sum(p * w, axis=tuple(range(len(lead))))

  _, per_chunk = vc.vocab_scan(mass, (), [z_fn], lay)
  col_mass = lay.to_vocab(per_chunk)                                              # [V]
  keep = min(k, lg.vocab)
  _, columns = jax.lax.top_k(col_mass, keep)
  z = normalised(lg.columns(columns))                                             # [B, L, keep]
  return pad_last(jnp.exp(z / temperature - lse[..., None]), k)


def multilevel_ot_loss(student_logits: jax.Array | None, teacher_logits: jax.Array | None,
                       student_mask: jax.Array, teacher_mask: jax.Array, *,
                       temperature: float = 2.0, params: Params = Params(),
                       student_lg: vc.Logits | None = None,
                       teacher_lg: vc.Logits | None = None, vocab_chunk: int = 0
                       ) -> tuple[jax.Array, jax.Array, dict]:
  """student_logits [B, Ls, Vs], teacher_logits [B, Lt, Vt], masks [B, Ls] / [B, Lt].
  Returns (token_l1 + ce_weight·token_ce + seq_weight·seq_ot, number of pairs, parts).
  vocab_chunk > 0: the top-k distributions from student_lg / teacher_lg (vocab_chunk.Logits)
  in vocabulary chunks instead (the logits are then unused)."""
  if vocab_chunk > 0:
    s_top = top_mass_chunked(student_lg, student_mask, params.top_k, temperature=temperature,
                             chunk=vocab_chunk)
    t_top = sg(top_mass_chunked(teacher_lg.stop_gradient(), teacher_mask, params.top_k,
                                temperature=temperature, chunk=vocab_chunk))
  else:
    p_s = jnp.exp(log_probs(std_normalise(student_logits), temperature))
    p_t = jnp.exp(log_probs(std_normalise(sg(teacher_logits)), temperature))
    s_top = top_mass_vocab(p_s, student_mask, params.top_k)                       # [B, Ls, k]
    t_top = top_mass_vocab(p_t, teacher_mask, params.top_k)                       # [B, Lt, k]

  s_pos, t_pos, pair = rank_pairs(student_mask, teacher_mask)
  s_pair, t_pair = gather_positions(s_top, s_pos), gather_positions(t_top, t_pos)
  l1_sum, count = masked_sum(jnp.sum(jnp.abs(s_pair - t_pair), axis=-1), pair)
  ce = -jnp.sum(jax.nn.softmax(t_pair, axis=-1) * jax.nn.log_softmax(s_pair, axis=-1), axis=-1)
  ce_sum, _ = masked_sum(ce, pair)

  # The teacher x student problem: ott updates the column (here: student) potential first,
  # which is the reference's order (rows, then columns of the student x teacher plan).
  cost_ts = jnp.sum(jnp.abs(t_top[:, :, None, :] - s_top[:, None, :, :]), axis=-1)  # [B, Lt, Ls]
  cfg = params.ot_config()
  seq_ot = jax.vmap(lambda c, mt, ms: ot.sinkhorn_value(c, mt, ms, cfg))(
      cost_ts, teacher_mask, student_mask)                                        # [B]
  seq_sum = jnp.sum(seq_ot * jnp.sum(pair, axis=-1).astype(F32))

  total = l1_sum + params.ce_weight * ce_sum + params.seq_weight * seq_sum
  parts = {"token_l1": l1_sum, "token_ce": ce_sum, "seq_ot": seq_sum,
           "seq_ot_mean": jnp.mean(seq_ot)}
  return total, count, parts


def term(inputs, projectors, cfg):
  s, t = side(inputs, "student"), side(inputs, "teacher")
  total, _, parts = multilevel_ot_loss(s.logits, t.logits, s.mask, t.mask,
                                       temperature=cfg.temperature,
                                       params=params_of(cfg, METHOD), student_lg=s.lg(),
                                       teacher_lg=t.lg(), vocab_chunk=cfg.vocab_chunk)
  return total, parts


METHOD = Method("multilevel_ot", kd=term, params=Params)
