"""ULD against a float64 numpy re-computation."""

import numpy as np
import pytest

from cot2align_jax.losses.methods.uld import uld_loss
from tests.losses.methods.support import B, LT, TAU, VS, VT, assert_close, np_softmax, rand_inputs


def np_uld(s_logits, t_logits, ms, mt, tau):
  total, count = 0.0, 0
  for b in range(B):
    s_idx, t_idx = np.nonzero(ms[b])[0], np.nonzero(mt[b])[0]
    for k in range(min(len(s_idx), len(t_idx))):
      ps = np.sort(np_softmax(s_logits[b, s_idx[k]] / tau))[::-1]
      pt = np.sort(np_softmax(t_logits[b, t_idx[k]] / tau))[::-1]
      size = max(len(ps), len(pt))
      ps, pt = np.pad(ps, (0, size - len(ps))), np.pad(pt, (0, size - len(pt)))
      total += np.sum(np.abs(ps - pt))
      count += 1
  return total, count


@pytest.mark.parametrize("tau", [1.0, TAU])
def test_uld_matches_numpy(tau):
  x = rand_inputs(1)
  got, count = uld_loss(x["s_logits"], x["t_logits"], x["ms"], x["mt"], temperature=tau)
  want, want_count = np_uld(x["s_logits"], x["t_logits"], x["ms"], x["mt"], tau)
  assert_close(got, want)
  assert float(count) == want_count == 5 + 3


def test_uld_zero_for_identical_sorted_distributions():
  x = rand_inputs(2)
  rng = np.random.default_rng(3)
  t_logits = np.full((B, LT, VT), -np.inf, np.float32)   # extra teacher vocab: padded (-inf)
  for b in range(B):
    s_idx, t_idx = np.nonzero(x["ms"][b])[0], np.nonzero(x["mt"][b])[0]
    for k in range(min(len(s_idx), len(t_idx))):
      t_logits[b, t_idx[k], :VS] = rng.permutation(x["s_logits"][b, s_idx[k]])
  got, _ = uld_loss(x["s_logits"], t_logits, x["ms"], x["mt"], temperature=TAU)
  assert abs(float(got)) < 1e-5
