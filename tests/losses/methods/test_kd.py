"""Plain KD: Σ D(student ‖ teacher) over the response tokens; one vocabulary required."""

import numpy as np
import pytest

from cot2align_jax.losses import methods as M
from tests.losses.methods.support import TAU, loss_inputs, np_fkl, np_rkl


@pytest.mark.parametrize("div,np_div", [("fkl", np_fkl), ("rkl", np_rkl)])
def test_kd_term_matches_numpy(div, np_div):
  method = M.get_method("kd")
  assert method.same_vocab and not method.alignment and not method.projectors
  inputs = loss_inputs(31, same_vocab=True)
  total, parts = method.kd(inputs, None, M.KDConfig(method="kd", divergence=div,
                                                     temperature=TAU))
  s = np.asarray(inputs.student["main"].logits)
  t = np.asarray(inputs.teacher["main"].logits)
  mask = np.asarray(inputs.batch["main/student/loss_mask"])
  want = sum(np_div(s[i, j], t[i, j], TAU) for i, j in zip(*np.nonzero(mask)))
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  assert parts == {}
