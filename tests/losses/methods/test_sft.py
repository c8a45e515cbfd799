"""SFT: the mean cross-entropy, whatever the teacher says."""

import jax.numpy as jnp
import numpy as np
import pytest

from cot2align_jax.losses import methods as M
from tests.losses.methods.support import loss_inputs, np_ce


def test_sft_needs_nothing_from_the_teacher():
  method = M.get_method("sft")
  assert not method.needs_teacher and method.kd is None and not method.ot
  inputs = loss_inputs(30)
  nan_teacher = {v: o._replace(logits=jnp.full_like(o.logits, jnp.nan))
                 for v, o in inputs.teacher.items()}
  loss, metrics = M.objective(method, M.KDConfig(method="sft"),
                              inputs._replace(teacher=nan_teacher), None)
  b = inputs.batch
  logits = np.asarray(inputs.student["main"].logits)
  labels, mask = np.asarray(b["main/student/labels"]), np.asarray(b["main/student/loss_mask"])
  ces = [np_ce(logits[i, j], labels[i, j]) for i, j in zip(*np.nonzero(mask))]
  assert float(loss) == pytest.approx(np.mean(ces), rel=1e-5)
  assert set(metrics) == {"ce", "loss"}
