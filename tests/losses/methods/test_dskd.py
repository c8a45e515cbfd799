"""DSKD (same tokenizer) against a float64 numpy re-computation."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cot2align_jax.losses.cross_tokenizer import KDSide
from cot2align_jax.losses.methods.dskd import dskd_loss
from cot2align_jax.losses.projectors import Projectors
from tests.losses.methods.support import (B, DS, DT, LS, NP_DIV, TAU, VS, assert_close, lin,
                                         np_ce, np_fkl, np_params, rand_inputs, sides)


def same_vocab_inputs(seed=6):
  x = rand_inputs(seed)
  rng = np.random.default_rng(seed)
  x["t_logits"] = rng.normal(size=(B, LS, VS)).astype(np.float32) * 2
  x["t_hidden"] = rng.normal(size=(B, LS, DT)).astype(np.float32)
  x["t_head"] = rng.normal(size=(DT, VS)).astype(np.float32)
  x["t_ids"], x["t_labels"], x["mt"] = x["s_ids"], x["s_labels"], x["ms"]
  x["t_embed"] = None
  return x


def np_dskd(x, p, div, tau):
  t2s_ce = t2s_kd = s2t_kd = 0.0
  for b in range(B):
    for i in range(LS):
      if x["ms"][b, i]:
        t2s = lin(p["t2s"], x["t_hidden"][b, i].astype(np.float64)) @ x["s_head"]
        t2s_ce += np_ce(t2s, x["s_labels"][b, i])
        t2s_kd += NP_DIV[div](x["s_logits"][b, i], t2s, tau)
      if x["mt"][b, i]:
        s2t = lin(p["s2t"], x["s_hidden"][b, i].astype(np.float64)) @ x["t_head"]
        s2t_kd += np_fkl(s2t, x["t_logits"][b, i], tau)
  return t2s_ce, t2s_kd, s2t_kd


@pytest.mark.parametrize("div", ["fkl", "rkl"])
def test_dskd_matches_numpy(div):
  x = same_vocab_inputs()
  proj = Projectors.dskd(DS, DT, rngs=nnx.Rngs(0), names=("t2s", "s2t"))
  student, teacher = sides(x)
  total, count, parts = dskd_loss(proj, student, teacher, divergence=div, temperature=TAU)
  t2s_ce, t2s_kd, s2t_kd = np_dskd(x, np_params(proj), div, TAU)
  assert_close(parts["t2s_ce"], t2s_ce)
  assert_close(parts["t2s_kd"], t2s_kd)
  assert_close(parts["s2t_kd"], s2t_kd)
  assert_close(total, t2s_ce + t2s_kd + s2t_kd)
  assert float(count) == x["ms"].sum()


def test_dskd_kd_terms_zero_when_projections_reproduce_the_other_model():
  """Same width, identity projectors, teacher = student: t2s_KD = s2t_KD = 0 (CE is not 0)."""
  x = same_vocab_inputs(7)
  proj = Projectors.dskd(DS, DS, rngs=nnx.Rngs(1), names=("t2s", "s2t"))
  for layer in (proj.t2s, proj.s2t):
    layer.kernel[...] = jnp.eye(DS)
    layer.bias[...] = jnp.zeros(DS)
  h = x["s_hidden"]
  logits = h @ x["s_head"]
  student = KDSide(logits, h, None, x["s_labels"], x["ms"], None, x["s_head"])
  teacher = KDSide(logits, h, None, x["s_labels"], x["ms"], None, x["s_head"])
  _, _, parts = dskd_loss(proj, student, teacher, divergence="fkl", temperature=TAU)
  assert abs(float(parts["t2s_kd"])) < 1e-5 and abs(float(parts["s2t_kd"])) < 1e-5
  assert float(parts["t2s_ce"]) > 0


def test_dskd_rejects_different_lengths():
  x = rand_inputs(8)
  student, teacher = sides(x)
  with pytest.raises(ValueError, match="equal student/teacher lengths"):
    dskd_loss(Projectors.dskd(DS, DT, rngs=nnx.Rngs(0), names=("t2s", "s2t")), student, teacher)
