"""MinED-KD against a float64 numpy re-computation."""

import numpy as np
import pytest

from cot2align_jax.losses.methods.mined import mined_loss, mined_targets
from tests.losses.methods.support import (B, LS, TAU, VS, VT, assert_close, mined_inputs,
                                         np_fkl, rand_inputs)


def np_mined(x, tau):
  total, used_teacher = 0.0, 0
  for b in range(B):
    for i in range(LS):
      if not x["ms"][b, i]:
        continue
      j = x["mined_pos"][b, i]
      proj = np.full(VS, -np.inf)
      for t in range(VT):
        v = x["vocab_map"][t]
        if 0 <= v < VS:
          proj[v] = max(proj[v], float(x["t_logits"][b, j, t]))
      proj = np.maximum(proj, -1e5)
      label = x["s_labels"][b, i]
      aligned = (x["mined_mask"][b, i] == 1 and x["vocab_map"][x["t_labels"][b, j]] == label
                 and proj.max() > -1e5)
      if aligned:
        target = proj
        used_teacher += 1
      else:
        target = np.full(VS, -1e5)
        target[label] = 100.0
      total += np_fkl(x["s_logits"][b, i], target, tau)
  return total, used_teacher


@pytest.mark.parametrize("tau", [1.0, TAU])
def test_mined_matches_numpy(tau):
  x = mined_inputs()
  got, count = mined_loss(x["s_logits"], x["t_logits"], x["s_labels"], x["ms"], x["t_labels"],
                             x["mined_pos"], x["mined_mask"], x["vocab_map"], temperature=tau)
  want, used_teacher = np_mined(x, tau)
  assert_close(got, want)
  assert float(count) == x["ms"].sum()
  _, aligned = mined_targets(x["t_logits"], x["s_labels"], x["ms"], x["t_labels"],
                                x["mined_pos"], x["mined_mask"], x["vocab_map"], VS)
  assert int(aligned.sum()) == used_teacher > 0
  assert used_teacher < x["ms"].sum()          # both branches (teacher and one-hot) are tested


def test_mined_zero_with_identity_map_and_identical_logits():
  x = rand_inputs(5)
  logits = x["s_logits"][:, :, :VS]
  pos = np.broadcast_to(np.arange(LS), (B, LS)).astype(np.int32)
  got, count = mined_loss(logits, logits, x["s_labels"], x["ms"], x["s_labels"], pos, x["ms"],
                             np.arange(VS, dtype=np.int32), temperature=TAU)
  assert abs(float(got)) < 1e-5 and float(count) == x["ms"].sum()
