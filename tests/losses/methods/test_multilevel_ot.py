"""MultiLevelOT against a float64 numpy re-computation."""

import numpy as np
import pytest

from cot2align_jax.losses import methods as M
from cot2align_jax.losses.methods.multilevel_ot import Params, multilevel_ot_loss
from tests.losses.methods.support import (B, TAU, assert_close, loss_inputs, np_log_softmax,
                                         np_softmax, rand_inputs)


def np_std_normalise(x):
  return x / (np.std(x, axis=-1, ddof=1, keepdims=True) + 1e-4)


def np_top_mass(p, mask, k):
  mass = np.sum(p * mask[..., None], axis=(0, 1))
  cols = np.argsort(-mass, kind="stable")[:k]
  out = p[..., cols]
  return np.pad(out, [(0, 0), (0, 0), (0, k - out.shape[-1])])


def np_sinkhorn_plan(c, a, b, eps, iters):
  """Scaling-form Sinkhorn on the valid block: u = a / Kv, v = b / Kᵀu, P = diag(u) K diag(v)."""
  k = np.exp(-c / eps)
  v = np.ones(len(b))
  for _ in range(iters):
    u = a / (k @ v)
    v = b / (k.T @ u)
  return u[:, None] * k * v[None, :]


def np_multilevel(x, tau, top_k, ce_weight, seq_weight, eps, iters):
  ms, mt = x["ms"], x["mt"]
  s = np_top_mass(np_softmax(np_std_normalise(x["s_logits"].astype(np.float64)) / tau), ms, top_k)
  t = np_top_mass(np_softmax(np_std_normalise(x["t_logits"].astype(np.float64)) / tau), mt, top_k)
  l1 = ce = seq = 0.0
  for b in range(B):
    s_idx, t_idx = np.nonzero(ms[b])[0], np.nonzero(mt[b])[0]
    n = min(len(s_idx), len(t_idx))
    for k in range(n):
      sv, tv = s[b, s_idx[k]], t[b, t_idx[k]]
      l1 += np.sum(np.abs(sv - tv))
      ce += -np.sum(np_softmax(tv) * np_log_softmax(sv))
    if n:
      c = np.abs(s[b, s_idx][:, None, :] - t[b, t_idx][None, :, :]).sum(-1)
      plan = np_sinkhorn_plan(c, np.full(len(s_idx), 1 / len(s_idx)),
                              np.full(len(t_idx), 1 / len(t_idx)), eps, iters)
      seq += n * np.sum(plan * c)
  return l1 + ce_weight * ce + seq_weight * seq, l1, ce, seq


@pytest.mark.parametrize("top_k,seq_weight", [(50, 1e-4), (5, 1.0)])
def test_multilevel_ot_matches_numpy(top_k, seq_weight):
  x = rand_inputs(12)
  total, count, parts = multilevel_ot_loss(
      x["s_logits"], x["t_logits"], x["ms"], x["mt"], temperature=TAU,
      params=Params(top_k=top_k, seq_weight=seq_weight))
  want, l1, ce, seq = np_multilevel(x, TAU, top_k, 0.1, seq_weight, 0.1, 20)
  assert_close(parts["token_l1"], l1)
  assert_close(parts["token_ce"], ce)
  assert_close(parts["seq_ot"], seq)
  assert_close(total, want)
  assert float(count) == 5 + 3


def test_method_params_reach_the_term():
  inputs = loss_inputs(14)
  method = M.get_method("multilevel_ot")
  assert method.params is Params
  s, t = inputs.student["main"].logits, inputs.teacher["main"].logits
  ms, mt = inputs.batch["main/student/loss_mask"], inputs.batch["main/teacher/loss_mask"]
  small = Params(top_k=5, seq_weight=1.0)
  for given, want_params in (((), Params()), ((("multilevel_ot", small),), small)):
    cfg = M.KDConfig(method="multilevel_ot", temperature=TAU, method_params=given)
    total, parts = method.kd(inputs, None, cfg)
    want, _, want_parts = multilevel_ot_loss(s, t, ms, mt, temperature=TAU, params=want_params)
    assert float(total) == pytest.approx(float(want), rel=1e-6)
    assert float(parts["seq_ot"]) == pytest.approx(float(want_parts["seq_ot"]), rel=1e-6)
  assert float(method.kd(inputs, None, cfg)[0]) != pytest.approx(
      float(method.kd(inputs, None, M.KDConfig(method="multilevel_ot"))[0]))
