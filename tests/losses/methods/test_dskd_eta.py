"""DSKD-ETA against a float64 numpy re-computation."""

import numpy as np
import pytest
from flax import nnx

from cot2align_jax.losses import methods as M
from cot2align_jax.losses.methods.dskd_eta import Params, dskd_eta_loss
from tests.losses.methods.support import (B, DS, DT, LS, NP_DIV, TAU, assert_close,
                                         cma_projectors, eta_inputs, lin, loss_inputs, np_ce,
                                         np_params, sides)


def np_eta(x, p, div, tau):
  t2s_ce = t2s_kd = s2t_kd = 0.0
  pairs = 0
  for b in range(B):
    for i in range(LS):
      j = x["eta_pos"][b, i]
      if not (x["eta_mask"][b, i] and x["ms"][b, i] and x["mt"][b, j]):
        continue
      pairs += 1
      t2s = lin(p["t2s"], x["t_hidden"][b, j].astype(np.float64)) @ x["s_head"]
      label = x["s_labels"][b, i]
      t2s_ce += np_ce(t2s, label)
      if np.argmax(t2s) == label:
        t2s_kd += NP_DIV[div](x["s_logits"][b, i], t2s, tau)
      s2t = lin(p["s2t"], x["s_hidden"][b, i].astype(np.float64)) @ x["t_head"]
      s2t_kd += NP_DIV[div](s2t, x["t_logits"][b, j], tau)
  return t2s_ce, t2s_kd, s2t_kd, pairs


@pytest.mark.parametrize("div", ["fkl", "rkl"])
def test_dskd_eta_matches_numpy(div):
  x = eta_inputs()
  proj = cma_projectors(x, seed=3)
  student, teacher = sides(x)
  total, count, parts = dskd_eta_loss(proj, student, teacher, x["eta_pos"], x["eta_mask"],
                                         divergence=div, temperature=TAU)
  t2s_ce, t2s_kd, s2t_kd, pairs = np_eta(x, np_params(proj), div, TAU)
  assert float(count) == pairs > 0
  assert float(parts["t2s_kd"]) > 0
  assert_close(parts["t2s_ce"], t2s_ce)
  assert_close(parts["t2s_kd"], t2s_kd)
  assert_close(parts["s2t_kd"], s2t_kd)
  assert_close(total, t2s_ce + t2s_kd + s2t_kd)


def test_agreement_mask_is_a_method_parameter():
  inputs = loss_inputs(15)
  method = M.get_method("dskd_eta")
  assert method.alignment == ("eta",) and method.params is Params
  proj = M.build_projectors(method, DS, DT, rngs=nnx.Rngs(0))
  on = method.kd(inputs, proj, M.KDConfig(method="dskd_eta"))[1]
  off = method.kd(inputs, proj, M.KDConfig(
      method="dskd_eta", method_params=(("dskd_eta", Params(agreement_mask=False)),)))[1]
  b = inputs.batch
  s_mask, t_mask = np.asarray(b["main/student/loss_mask"]), np.asarray(b["main/teacher/loss_mask"])
  pos, eta = np.asarray(b["main/align/eta_pos"]), np.asarray(b["main/align/eta_mask"])
  pairs = sum(int(eta[i, j] and s_mask[i, j] and t_mask[i, pos[i, j]])
              for i in range(s_mask.shape[0]) for j in range(s_mask.shape[1]))
  assert float(off["t2s_kd_count"]) == pairs > float(on["t2s_kd_count"])
  assert float(off["t2s_ce"]) == pytest.approx(float(on["t2s_ce"]), rel=1e-6)
