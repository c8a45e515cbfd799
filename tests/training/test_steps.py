"""Train/eval steps on the tiny cross-tokenizer problem: the loss goes down for sft, dskd_cma and
cot2align; gradient accumulation is exact; the optimizer's decay mask and projector lr; (sum,
count) metrics; pair-view forwards sit behind a cond on any(has_pair).

Compile time dominates on CPU, so one student/teacher pair and one set of batches serve every
test, and steps compile with XLA's backend optimisation off (FAST)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cot2align_jax.losses.methods import KDConfig
from cot2align_jax.losses.ot import OTConfig
from cot2align_jax.training import state as state_lib
from cot2align_jax.training import steps as steps_lib
from tests.support import tiny

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
OT_FAST = OTConfig(num_iters=10)


@pytest.fixture(scope="module")
def prob():
  return tiny.tiny_problem()


@pytest.fixture(scope="module")
def models(prob):
  return prob.student(0), prob.teacher(1)


@pytest.fixture(scope="module")
def batches(prob):
  return prob.batches(batch_size=8, n=4)


LR = 3e-3
_STEPS = {}


def _setup(prob, models, method, **opt):
  kd = KDConfig(method=method, base="dskd_cma", ot=OT_FAST)
  opt_cfg = state_lib.OptimConfig(**{"lr": LR, "schedule": "constant", "total_steps": 100,
                                     **opt})
  return tiny.make_setup(prob, kd, opt_cfg, student=models[0], teacher=models[1])


def _train_step(su, **kw):
  """One compiled step per (method, accumulate): setups with equal configs share it."""
  key = (su.kd_cfg.method, su.opt_cfg.accumulate, su.opt_cfg.lr, tuple(sorted(kw.items())))
  if key not in _STEPS:
    _STEPS[key] = su.train_step(compiler_options=FAST, **kw)
  return _STEPS[key]


def _mean(m, k):
  return float(m[k][0] / m[k][1])


@pytest.mark.parametrize("method", ["sft", "dskd_cma", "cot2align"])
def test_loss_goes_down(prob, models, batches, method):
  su = _setup(prob, models, method)
  step = _train_step(su)
  state, losses = su.state, []
  for i in range(30):
    state, m = step(state, su.teacher_params, batches[i % len(batches)])
    losses.append(_mean(m, "loss"))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.8 * losses[0], losses
  assert int(state.step) == 30
  if method == "cot2align":
    assert any(k.startswith("ot/cross_a") for k in m)


def _max_rel(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-12))
             for x, y in zip(la, lb))


def test_accumulation_equals_full_batch(prob, models, batches):
  """accumulate=2 over a batch of 8 (two micro-batches of 4 rows) == one step on the 8 rows.

  The gradient is the sum of exactly weighted micro-batch shares (token terms over the full
  batch's token count), so only float32 summation order differs: 1e-5 relative on the loss,
  the metric sums and the gradient norm. Updated params: Adam's first step is lr·g/(|g| + eps),
  about lr·sign(g); entries agree to 1% of one step (lr)."""
  batch = batches[0]
  out = {}
  for acc in (1, 2):
    su = _setup(prob, models, "sft", accumulate=acc)
    out[acc] = _train_step(su)(su.state, su.teacher_params, batch)
  (s1, m1), (s2, m2) = out[1], out[2]
  np.testing.assert_allclose(_mean(m2, "loss"), _mean(m1, "loss"), rtol=1e-5)
  # (sum, count) pairs add up exactly over micro-batches
  np.testing.assert_allclose(np.asarray(m2["ce"]), np.asarray(m1["ce"]), rtol=1e-5)
  assert float(m1["ce"][1]) == float(batch["main/student/loss_mask"].sum())
  assert float(m2["ce"][1]) == float(batch["main/student/loss_mask"].sum())
  np.testing.assert_allclose(float(m2["grad_norm"][0]), float(m1["grad_norm"][0]), rtol=1e-5)
  delta = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)))
  assert delta <= 0.01 * LR, delta


def test_decay_mask_excludes_biases_and_norms(models):
  from cot2align_jax.losses.methods import build_projectors, get_method
  from flax import nnx
  student = models[0]
  _, params = state_lib.split_params(student)
  proj = state_lib.split_params(build_projectors(get_method("cot2align"), 32, 48,
                                                 rngs=nnx.Rngs(0)))[1]
  flat = {}
  for tree_name, tree in (("student", params), ("proj", proj)):
    mask = state_lib.decay_mask(tree)
    for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]:
      flat[tree_name + "/" + "/".join(state_lib._path_names(path))] = v  # pylint: disable=protected-access
  no = {k for k, v in flat.items() if not v}
  # exactly the biases and the norm scales are excluded
  expect_no = {k for k in flat if k.split("/")[-2].endswith("bias") or
               k.split("/")[-2] == "scale"}
  assert no == expect_no
  assert "student/layers/0/attn/q_bias/value" in no
  assert "student/final_norm/scale/value" in no and "proj/kd/query/bias/value" in no
  for k in ("student/embed/value", "student/layers/0/attn/q/value",
            "student/layers/1/mlp/down/value", "proj/kd/query/kernel/value"):
    assert flat[k], k


def test_projector_lr_and_weight_decay():
  """Zero gradients: AdamW moves each parameter by -lr·wd·p (decayed) or not at all, with the
  student's lr on "student" and proj_lr on "proj"."""
  cfg = state_lib.OptimConfig(lr=1e-2, proj_lr=1e-1, weight_decay=0.5, schedule="constant",
                              clip_norm=1.0)
  tx = state_lib.make_optimizer(cfg)
  params = {"student": {"w": jnp.ones((2, 2)), "b_bias": jnp.ones((2,)), "norm": {"scale":
                                                                                 jnp.ones(2)}},
            "proj": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  grads = jax.tree.map(jnp.zeros_like, params)
  upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(upd["student"]["w"], -1e-2 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(upd["proj"]["kernel"], -1e-1 * 0.5, rtol=1e-6)
  for leaf in (upd["student"]["b_bias"], upd["student"]["norm"]["scale"], upd["proj"]["bias"]):
    np.testing.assert_array_equal(leaf, 0.0)


def test_schedules():
  c = state_lib.OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10, total_steps=110,
                            end_lr=1e-3)
  s = state_lib.make_schedule(c, 1.0)
  np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)],
                             [0.0, 0.5, 1.0, 0.5 * (1 + 1e-3), 1e-3], rtol=1e-5, atol=1e-6)
  lin = state_lib.make_schedule(state_lib.OptimConfig(lr=1.0, schedule="linear",
                                                      total_steps=100, end_lr=0.0), 1.0)
  np.testing.assert_allclose([lin(0), lin(50), lin(100)], [1.0, 0.5, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    state_lib.OptimConfig(schedule="poly")


def _count(jaxpr, prim: str) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == prim:
      n += 1
    for p in eqn.params.values():
      for j in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(j, "jaxpr", j)
        if hasattr(inner, "eqns"):
          n += _count(inner, prim)
  return n


def _pair_conds(jaxpr):
  """(branch dot counts) of every cond in the (nested) jaxpr."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "cond":
      out.append(tuple(_count(b.jaxpr, "dot_general") for b in eqn.params["branches"]))
    for p in eqn.params.values():
      for j in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(j, "jaxpr", j)
        if hasattr(inner, "eqns"):
          out.extend(_pair_conds(inner))
  return out


def test_pair_forwards_behind_cond(prob, models, batches):
  """cot2align's pair-view forwards run in the true branch of a cond on any(has_pair) (the
  false branch does no matmul), so a batch without pairs skips them; sft has no such cond."""
  su = _setup(prob, models, "cot2align")
  batch = batches[0]
  conds = _pair_conds(jax.make_jaxpr(su.train_step(jit=False))(su.state, su.teacher_params,
                                                                batch).jaxpr)
  pair = [c for c in conds if min(c) == 0 and max(c) > 0]
  # forward cond (+ its transpose in the backward pass)
  assert pair, conds
  off = _pair_conds(jax.make_jaxpr(su.train_step(jit=False, pair_saving=False))(
      su.state, su.teacher_params, batch).jaxpr)
  # the OT block's cross terms have their own skip-cond (losses/ot.py); pair_saving adds the
  # forward one on top
  assert len([c for c in off if min(c) == 0 and max(c) > 0]) < len(pair), (off, pair)
  assert steps_lib.pair_views_needed(su.method, su.kd_cfg) == (True, True)
  sft = _setup(prob, models, "sft")
  assert steps_lib.pair_views_needed(sft.method, sft.kd_cfg) == (False, False)


def test_eval_step_matches_train_metrics(prob, models, batches):
  su = _setup(prob, models, "sft")
  m_eval = su.eval_step(compiler_options=FAST)(su.state, su.teacher_params, batches[1])
  _, m_train = _train_step(su)(su.state, su.teacher_params, batches[1])
  np.testing.assert_allclose(np.asarray(m_eval["ce"]), np.asarray(m_train["ce"]), rtol=1e-6)
  assert set(m_train) == set(m_eval) | {"grad_norm"}
