"""CoT2Align+ composes like cot2align, reads its own OT settings (kd.cot2align_plus over kd.ot)
and its plans align where the faithful cot2align's stay uniform; layer maps reach the forwards
of a real train step."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cot2align_jax.core import spec
from cot2align_jax.losses import methods as M
from cot2align_jax.losses import ot
from cot2align_jax.losses.methods.cot2align_plus import Params
from cot2align_jax.losses.ot import OTConfig
from cot2align_jax.training import config as C
from cot2align_jax.training import state as state_lib
from cot2align_jax.training import steps as steps_lib
from tests.losses.methods.support import DS, DT, loss_inputs
from tests.support import tiny

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def test_composition_and_own_ot_settings():
  for base in ("dskd_cma", "uld"):
    b, m = M.get_method(base), M.get_method("cot2align_plus", base)
    assert m.name == f"cot2align_plus[{base}]"
    assert m.kd is b.kd and m.ot and m.uses_rationales and m.projectors == b.projectors
  plus = M.get_method("cot2align_plus")
  faithful = M.get_method("cot2align")
  cfg = M.KDConfig(method="cot2align_plus", ot=OTConfig(num_iters=7))
  got = M.ot_config(cfg, plus)
  want = dataclasses.replace(OTConfig(num_iters=7), **dataclasses.asdict(Params()))
  assert got == want and got.num_iters == 7
  assert (got.cost, got.relative_epsilon, got.debiased, got.value) == (
      "cosine", "std", True, "entropic")
  # the faithful method keeps the paper's OT block exactly
  paper = M.ot_config(M.KDConfig(), faithful)
  assert paper == OTConfig()
  assert (paper.cost, paper.epsilon, paper.relative_epsilon, paper.value, paper.debiased,
          paper.tau_cross_cot, paper.layer_weighting, paper.layers) == (
              "attention", 10.0, "none", "transport", False, 1.0, "fixed", ("embed", "final"))
  # own params override; a kd.ot key it overrides is refused, the others pass through
  own = M.KDConfig(method_params=(("cot2align_plus", Params(epsilon=0.2, debiased=False)),))
  assert M.ot_config(own, plus).epsilon == 0.2 and not M.ot_config(own, plus).debiased
  with pytest.raises(ValueError, match="change kd.cot2align_plus.epsilon instead"):
    M.ot_config(M.KDConfig(ot=OTConfig(epsilon=1.0)), plus)
  assert M.ot_config(M.KDConfig(ot=OTConfig(terms=("same",))), plus).terms == ("same",)


def test_config_section_and_overrides():
  defaults = C.defaults()
  assert set(defaults.kd.cot2align_plus) == {f.name for f in dataclasses.fields(Params)}
  assert {"relative_epsilon", "debiased", "tau_cross_cot", "layer_weighting",
          "epsilon_init"} <= set(defaults.kd.ot)
  cfg = C.load_config(CONFIGS / "tiny.py", "cot2align_plus",
                      overrides={"kd.cot2align_plus.epsilon": 0.25, "kd.ot.num_iters": 9})
  kd = C.kd_config(cfg)
  method = C.method_of(kd)
  got = M.ot_config(kd, method)
  assert (got.epsilon, got.num_iters, got.cost) == (0.25, 9, "cosine")
  faithful = C.kd_config(C.load_config(CONFIGS / "base.py", "cot2align"))
  assert M.ot_config(faithful, C.method_of(faithful)) == OTConfig()


def test_projectors_hold_layer_parameters_and_the_objective_trains_them():
  cfg = M.KDConfig(method="cot2align_plus", ot=OTConfig(num_iters=20))
  method = M.method_from_config(cfg)
  proj = M.build_projectors(method, DS, DT, rngs=nnx.Rngs(0), kd=cfg)
  assert np.asarray(proj.ot.layer_params[...]).shape == (2,)
  paper = M.build_projectors(M.get_method("cot2align"), DS, DT, rngs=nnx.Rngs(0), kd=M.KDConfig())
  assert not hasattr(paper.ot, "layer_params")
  np.testing.assert_array_equal(np.asarray(proj.ot.linear.kernel[...]),
                                np.asarray(paper.ot.linear.kernel[...]))
  inputs = loss_inputs(3)
  graphdef, state = nnx.split(proj)

  def f(s):
    return M.objective(method, cfg, inputs, nnx.merge(graphdef, s))

  (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(state)
  assert np.isfinite(float(loss))
  assert {"ot/weight/embed", "ot/weight/final", "ot/same/final"} <= set(metrics)
  g = np.asarray(grads["ot"]["layer_params"][...])
  assert np.isfinite(g).all() and np.abs(g).min() > 0
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))


def test_plus_plan_aligns_where_the_papers_stays_uniform():
  """The same term's plan on one row: plan_peak >= 2 with cot2align_plus's settings, within
  a few percent of uniform at the paper's."""
  inputs = loss_inputs(4)
  b = inputs.batch
  x = inputs.student["main"].hidden_states[-1][0]
  y = jnp.asarray(np.random.default_rng(4).normal(size=(DT, DS)), jnp.float32)
  y = inputs.teacher["main"].hidden_states[-1][0] @ y
  xm, ym = b[spec.key("main", "student", "loss_mask")][0], b[spec.key("main", "teacher",
                                                                      "loss_mask")][0]
  peaks = {}
  for name, cfg in (("paper", OTConfig()),
                    ("plus", Params().ot_config(OTConfig()))):
    c = ot.cost_matrix(x, y, ym, cfg.cost)
    plan = ot.sinkhorn_plan(c, ot.uniform_marginal(xm), ot.uniform_marginal(ym), cfg)
    peaks[name] = float(ot.plan_peak(plan, xm, ym))
  assert peaks["paper"] < 1.2 and peaks["plus"] >= 2.0, peaks


def test_steps_request_the_hidden_states_the_layers_need():
  plus = M.get_method("cot2align_plus")
  ends = M.KDConfig(method="cot2align_plus")
  mid = M.KDConfig(method="cot2align_plus", ot=OTConfig(layers=("embed", "mid")))
  assert steps_lib.hidden_states_needed(plus, ends) == "ends"
  assert steps_lib.hidden_states_needed(plus, mid) == "all"
  assert steps_lib.hidden_states_needed(M.get_method("uld"), mid) == "ends"
  assert steps_lib.pair_views_needed(plus, M.KDConfig(ot=OTConfig(terms=("cross_b",)))) == (
      False, True)


def test_train_step_with_intermediate_layers():
  """3-block tiny models: "mid" is block 1 on both sides, so its terms equal "s1:t1"'s; a train
  step runs, is finite and moves the layer weights."""
  prob = tiny.tiny_problem(layers=3)
  batch = prob.batches(batch_size=4, n=1)[0]
  layers = ("embed", "mid", "s1:t1", "s-1:t-1")
  kd = M.KDConfig(method="cot2align_plus", base="uld", ot=OTConfig(num_iters=5, layers=layers))
  method = M.method_from_config(kd)
  proj = M.build_projectors(method, prob.student_cfg.hidden_size, prob.teacher_cfg.hidden_size,
                            rngs=nnx.Rngs(2), kd=kd)
  opt_cfg = state_lib.OptimConfig(lr=1e-3, schedule="constant", total_steps=10)
  optimizer = state_lib.make_optimizer(opt_cfg)
  state, (s_gd, p_gd) = state_lib.init_state(prob.student(0), proj, opt_cfg, 0,
                                             optimizer=optimizer)
  t_gd, t_params = state_lib.split_params(prob.teacher(1))
  metrics = steps_lib.make_eval_step(s_gd, t_gd, p_gd, method, kd, compiler_options=FAST)(
      state, t_params, batch)
  for term in ot.TERMS:
    mean = lambda k: float(metrics[k][0] / metrics[k][1])
    assert mean(f"ot/{term}/mid") == pytest.approx(mean(f"ot/{term}/s1:t1"), rel=1e-6)
    assert mean(f"ot/{term}/mid") != pytest.approx(mean(f"ot/{term}/embed"), rel=1e-3)
  before = np.asarray(state.proj["ot"]["layer_params"][...]).copy()
  step = steps_lib.make_train_step(s_gd, t_gd, p_gd, method, kd, optimizer,
                                   compiler_options=FAST)
  state, metrics = step(state, t_params, batch)
  assert np.isfinite(float(metrics["loss"][0]))
  after = np.asarray(state.proj["ot"]["layer_params"][...])
  assert after.shape == (4,) and np.all(after != before)
