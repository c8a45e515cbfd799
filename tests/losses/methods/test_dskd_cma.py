"""DSKD-CMA against a float64 numpy re-computation."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cot2align_jax.losses.cross_tokenizer import KDSide
from cot2align_jax.losses.methods.dskd_cma import dskd_cma_loss
from cot2align_jax.losses.projectors import Projectors
from tests.losses.methods.support import (B, DS, DT, LS, LT, NP_DIV, TAU, VT, assert_close,
                                         cma_inputs, cma_projectors, lin, np_ce, np_fkl,
                                         np_params, np_softmax, np_std, rand_inputs, sides)


def np_cma(x, p, div, tau):
  ms, mt = x["ms"], x["mt"]
  t_embed = x["t_embed"].astype(np.float64)
  s_embed = x["s_embed"].astype(np.float64)
  e_t_rows, label_rows, h_rows = [], [], []
  for b in range(B):
    for j in range(LT):
      if mt[b, j]:
        e_t_rows.append(np.concatenate([t_embed[x["t_ids"][b, j]], t_embed[x["t_labels"][b, j]]]))
        label_rows.append(t_embed[x["t_labels"][b, j]])
        h_rows.append(x["t_hidden"][b, j].astype(np.float64))
  std_e, std_label, std_h = np_std(e_t_rows), np_std(label_rows), np_std(h_rows)
  t2s_ce = t2s_kd = s2t_kd = 0.0
  acc = 0
  for b in range(B):
    s_valid, t_valid = np.nonzero(ms[b])[0], np.nonzero(mt[b])[0]
    if len(s_valid) == 0 or len(t_valid) == 0:
      continue
    q = np.stack([lin(p["query"], np.concatenate([s_embed[x["s_ids"][b, i]],
                                                   s_embed[x["s_labels"][b, i]]]))
                  for i in s_valid])
    k = np.stack([np.concatenate([t_embed[x["t_ids"][b, j]], t_embed[x["t_labels"][b, j]]])
                  for j in t_valid]) / std_e
    a = q @ k.T / np.sqrt(2 * DT)                                   # [n_s, n_t] valid pairs
    v_t = np.stack([lin(p["t2s"], x["t_hidden"][b, j] / std_h + t_embed[x["t_labels"][b, j]]
                        / std_label) for j in t_valid])
    t2s_h = np_softmax(a) @ v_t
    for row, i in enumerate(s_valid):
      t2s = t2s_h[row] @ x["s_head"]
      label = x["s_labels"][b, i]
      t2s_ce += np_ce(t2s, label)
      if np.argmax(t2s) == label:
        acc += 1
        t2s_kd += NP_DIV[div](x["s_logits"][b, i], t2s, tau)
    v_s = np.stack([lin(p["s2t"], x["s_hidden"][b, i].astype(np.float64)) for i in s_valid])
    s2t_h = np_softmax(a.T) @ v_s
    for row, j in enumerate(t_valid):
      s2t_kd += np_fkl(s2t_h[row] @ x["t_head"], x["t_logits"][b, j], tau)
  return t2s_ce, t2s_kd, s2t_kd, acc


@pytest.mark.parametrize("div", ["fkl", "rkl"])
def test_dskd_cma_matches_numpy(div):
  x = cma_inputs()
  proj = cma_projectors(x)
  student, teacher = sides(x)
  total, count, parts = dskd_cma_loss(proj, student, teacher, divergence=div, temperature=TAU)
  t2s_ce, t2s_kd, s2t_kd, acc = np_cma(x, np_params(proj), div, TAU)
  assert 0 < acc < x["ms"].sum()                 # the agreement mask is on and off somewhere
  assert float(parts["t2s_acc"]) == acc == float(parts["t2s_kd_count"])
  assert_close(parts["t2s_ce"], t2s_ce)
  assert_close(parts["t2s_kd"], t2s_kd)
  assert_close(parts["s2t_kd"], s2t_kd)
  assert_close(total, t2s_ce + t2s_kd + s2t_kd)
  assert float(count) == x["ms"].sum()


def test_dskd_cma_kd_terms_zero_when_projections_reproduce_the_other_model():
  """d_S = d_T, identity t2s/s2t, zero teacher embeddings (A = 0, uniform attention), every
  hidden state the same unit-std vector h0 with teacher logits h0·W_T: then t2s_logits equal
  the student logits and s2t_logits the teacher logits, so t2s_KD = s2t_KD = 0."""
  x = rand_inputs(10)
  rng = np.random.default_rng(10)
  h0 = rng.normal(size=DS)
  h0 = ((h0 - h0.mean()) / h0.std()).astype(np.float32)
  hidden_s = np.broadcast_to(h0, (B, LS, DS)).astype(np.float32)
  hidden_t = np.broadcast_to(h0, (B, LT, DS)).astype(np.float32)
  t_head = rng.normal(size=(DS, VT)).astype(np.float32)
  s_logits = hidden_s @ x["s_head"]
  labels = (np.argmax(s_logits, -1) * x["ms"]).astype(np.int32)   # every position agrees
  proj = Projectors.dskd(DS, DS, rngs=nnx.Rngs(2))
  for layer in (proj.t2s, proj.s2t):
    layer.kernel[...] = jnp.eye(DS)
    layer.bias[...] = jnp.zeros(DS)
  student = KDSide(s_logits, hidden_s, x["s_ids"], labels, x["ms"], x["s_embed"], x["s_head"])
  teacher = KDSide(hidden_t @ t_head, hidden_t, x["t_ids"], x["t_labels"], x["mt"],
                      np.zeros((VT, DS), np.float32), t_head)
  _, _, parts = dskd_cma_loss(proj, student, teacher, divergence="fkl", temperature=TAU)
  assert float(parts["t2s_kd_count"]) == x["ms"].sum()
  assert abs(float(parts["t2s_kd"])) < 1e-5 and abs(float(parts["s2t_kd"])) < 1e-5
  assert float(parts["t2s_ce"]) > 0
