"""Tests of the OT options beyond the paper (losses/ot.py, losses/ot_layers.py): relative ε and
the ε schedule, the entropic value and the debiased divergence, unbalanced marginals, layer
maps and layer weights, plan_peak. References are float64 numpy Sinkhorn loops written from the
formulas in ott's update order (column potential first), on the valid block."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cot2align_jax.core import spec
from cot2align_jax.losses import ot, ot_layers
from cot2align_jax.losses.projectors import Projectors
from cot2align_jax.models import ModelOutput
from tests.losses.test_ot import _reg_ot_cost, _terms  # shared with test_ot

N, M, D = 6, 8, 5
N_VALID = np.array([6, 4, 2])
M_VALID = np.array([8, 5, 3])


def _mask(lengths, size):
  return jnp.asarray((np.arange(size)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32))


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(3, N, D)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(3, M, D)), jnp.float32)
  return x, y, _mask(N_VALID, N), _mask(M_VALID, M)


def _cfg(**kw):
  return ot.OTConfig(**kw)


_ot = jax.jit(ot.sinkhorn_ot, static_argnums=(4,), static_argnames=("tau_a", "tau_b"))
_plan = jax.jit(ot.sinkhorn_plan, static_argnums=(3,), static_argnames=("tau_a", "tau_b"))


# ---- float64 numpy references ----------------------------------------------------------------


def np_cost(x, y, kind):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if kind == "attention":
    s = x @ y.T / np.sqrt(x.shape[1])
    s = np.exp(s - s.max(axis=1, keepdims=True))
    return 1.0 - s / s.sum(axis=1, keepdims=True)
  if kind == "cosine":
    return 1.0 - (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
        y / np.linalg.norm(y, axis=1, keepdims=True)).T
  return np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))


def np_lse(z, axis):
  zmax = z.max(axis=axis, keepdims=True)
  return np.squeeze(zmax, axis) + np.log(np.exp(z - zmax).sum(axis=axis))


def np_ott_plan(c, eps, iters, tau_a=1.0, tau_b=1.0, init=1.0, decay=1.0):
  """ott's log-domain Sinkhorn: per iteration t, ε_t = ε·max(init·decay^t, 1);
  g = τ_b(ε_t log b − ε_t lse_i((f_i − C_ij)/ε_t)), then f likewise; P = exp((f + g − C)/ε)."""
  n, m = c.shape
  a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
  f, g = np.zeros(n), np.zeros(m)
  for t in range(iters):
    e = eps * max(init * decay**t, 1.0)
    g = tau_b * (e * np.log(b) - e * np_lse((f[:, None] - c) / e, 0))
    f = tau_a * (e * np.log(a) - e * np_lse((g[None, :] - c) / e, 1))
  return np.exp((f[:, None] + g[None, :] - c) / eps)


def np_gkl(p, q):
  pos = (p > 0) & (q > 0)
  return float(np.sum(np.where(pos, p * np.log(np.where(pos, p, 1) / np.where(pos, q, 1)), 0))
               - p.sum() + q.sum())


def np_value(p, c, eps, kind, tau_a=1.0, tau_b=1.0):
  n, m = c.shape
  a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
  out = float((p * c).sum())
  if kind == "entropic":
    out += eps * np_gkl(p, np.outer(a, b))
    if tau_a < 1:
      out += eps * tau_a / (1 - tau_a) * np_gkl(p.sum(1), a)
    if tau_b < 1:
      out += eps * tau_b / (1 - tau_b) * np_gkl(p.sum(0), b)
  return out


def np_scale(c, kind):
  return c.mean() if kind == "mean" else c.std()


# ---- a. ε relative to the cost's scale, ε schedule -------------------------------------------


@pytest.mark.parametrize("kind", ["mean", "std"])
def test_cost_scale_uses_only_valid_pairs(kind):
  rng = np.random.default_rng(0)
  c = rng.uniform(size=(N, M))
  c[4:, :] = 1e3  # padding rows / columns hold garbage
  c[:, 5:] = -1e3
  got = ot.cost_scale(jnp.asarray(c, jnp.float32), _mask([4], N)[0], _mask([5], M)[0], kind)
  np.testing.assert_allclose(float(got), np_scale(c[:4, :5], kind), rtol=1e-5)
  # nothing valid, or a constant cost: the scale falls back to 1 (ε stays finite)
  assert float(ot.cost_scale(jnp.asarray(c, jnp.float32), _mask([0], N)[0], _mask([5], M)[0],
                             kind)) == 1.0
  if kind == "std":
    assert float(ot.cost_scale(jnp.full((N, M), 0.3), jnp.ones(N), jnp.ones(M), kind)) == 1.0


@pytest.mark.parametrize("kind", ["mean", "std"])
def test_relative_epsilon_matches_reference(kind):
  x, y, xm, ym = _inputs(1)
  cfg = _cfg(cost="cosine", relative_epsilon=kind, epsilon=0.5, num_iters=60)
  got = np.asarray(_ot(x, y, xm, ym, cfg))
  for i in range(3):
    c = np_cost(x[i, :N_VALID[i]], y[i, :M_VALID[i]], "cosine")
    eps = 0.5 * np_scale(c, kind)
    plan = np_ott_plan(c, eps, 60)
    np.testing.assert_allclose(got[i], np_value(plan, c, eps, "transport"), rtol=1e-4)


def test_relative_std_epsilon_plan_ignores_offset_and_scale_of_the_cost():
  """ε = r·std(C): the plan of 3·C + 1 is the plan of C (the paper's fixed ε is not)."""
  rng = np.random.default_rng(2)
  c = jnp.asarray(rng.uniform(size=(N, M)), jnp.float32)
  a, b = ot.uniform_marginal(jnp.ones(N)), ot.uniform_marginal(jnp.ones(M))
  rel = _cfg(relative_epsilon="std", epsilon=0.3)
  np.testing.assert_allclose(np.asarray(_plan(3 * c + 1, a, b, rel)),
                             np.asarray(_plan(c, a, b, rel)), rtol=1e-4, atol=1e-7)
  fixed = _cfg(epsilon=0.3)
  assert not np.allclose(np.asarray(_plan(3 * c + 1, a, b, fixed)),
                         np.asarray(_plan(c, a, b, fixed)), rtol=1e-3)


def test_relative_epsilon_does_not_see_padding():
  x, y, xm, ym = _inputs(3)
  cfg = _cfg(cost="euclidean", relative_epsilon="mean", epsilon=0.2)
  padded = np.asarray(_ot(x + 50.0 * (1 - xm[..., None]), y, xm, ym, cfg))
  for i in range(3):
    n, m = N_VALID[i], M_VALID[i]
    alone = _ot(x[i:i + 1, :n], y[i:i + 1, :m], jnp.ones((1, n)), jnp.ones((1, m)), cfg)
    np.testing.assert_allclose(padded[i], float(alone[0]), rtol=1e-5)


def test_epsilon_schedule_matches_reference_iterations():
  """Few iterations, so the schedule's intermediate ε values show in the plan."""
  rng = np.random.default_rng(4)
  c = rng.uniform(size=(N, M))
  cfg = _cfg(epsilon=0.05, num_iters=6, epsilon_init=4.0, epsilon_decay=0.5)
  a, b = ot.uniform_marginal(jnp.ones(N)), ot.uniform_marginal(jnp.ones(M))
  got = np.asarray(_plan(jnp.asarray(c, jnp.float32), a, b, cfg))
  np.testing.assert_allclose(got, np_ott_plan(c, 0.05, 6, init=4.0, decay=0.5), rtol=1e-4,
                             atol=1e-8)
  # ...and differs from the constant-ε run of the same length
  assert not np.allclose(got, np_ott_plan(c, 0.05, 6), rtol=1e-2)


def test_epsilon_schedule_that_does_not_reach_epsilon_is_refused():
  with pytest.raises(ValueError, match="does not reach epsilon"):
    _cfg(num_iters=20, epsilon_init=10.0, epsilon_decay=0.9)
  _cfg(num_iters=100, epsilon_init=10.0, epsilon_decay=0.9)
  for bad in ({"epsilon_init": 0.5}, {"epsilon_decay": 1.5}, {"relative_epsilon": "median"},
              {"epsilon": 0.0}, {"value": "dual"}, {"tau_same": 0.0}, {"tau_cross_cot": 1.2},
              {"layer_weighting": "softmax"}, {"layers": ("embed", "embed")},
              {"layers": ("s1",)}):
    with pytest.raises(ValueError):
      _cfg(**bad)


# ---- b. the entropic value and the debiased Sinkhorn divergence ------------------------------


def test_entropic_value_equals_otts_dual_objective():
  """Balanced: <P, C> + ε·KL(P‖ab) at convergence = ott's reg_ot_cost (computed from duals)."""
  rng = np.random.default_rng(5)
  c = jnp.asarray(rng.uniform(size=(N, M)), jnp.float32)
  a, b = ot.uniform_marginal(jnp.ones(N)), ot.uniform_marginal(jnp.ones(M))
  cfg = _cfg(epsilon=0.1, num_iters=400, value="entropic")
  got = jax.jit(lambda cc: ot.sinkhorn_value(cc, jnp.ones(N), jnp.ones(M), cfg))(c)
  np.testing.assert_allclose(float(got), float(_reg_ot_cost(c, a, b, epsilon=0.1, iters=400)), rtol=1e-5)


def test_unbalanced_entropic_value_is_the_primal_minimum():
  """τ_a < 1: the value is <P, C> + ε·KL(P‖ab) + ρ_a·KL(P1‖a) of the numpy plan, and that plan
  minimises it: feasible perturbations (column sums kept) only increase it."""
  rng = np.random.default_rng(5)
  c = rng.uniform(size=(N, M))
  cfg = _cfg(epsilon=0.1, num_iters=300, value="entropic")
  got = jax.jit(lambda cc: ot.sinkhorn_value(cc, jnp.ones(N), jnp.ones(M), cfg, tau_a=0.8))(
      jnp.asarray(c, jnp.float32))
  plan = np_ott_plan(c, 0.1, 300, tau_a=0.8)
  want = np_value(plan, c, 0.1, "entropic", tau_a=0.8)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  for _ in range(5):
    other = plan * np.exp(0.05 * rng.normal(size=(N, M)))
    other *= (1.0 / M) / other.sum(axis=0, keepdims=True)  # positive, Pᵀ1 = b kept
    assert np_value(other, c, 0.1, "entropic", tau_a=0.8) > want


@pytest.mark.parametrize("value", ["transport", "entropic"])
def test_debiased_matches_reference(value):
  x, y, xm, ym = _inputs(6)
  cfg = _cfg(cost="cosine", epsilon=0.3, num_iters=80, value=value, debiased=True)
  got = np.asarray(_ot(x, y, xm, ym, cfg))
  for i in range(3):
    xi, yi = x[i, :N_VALID[i]], y[i, :M_VALID[i]]
    parts = []
    for p, q in ((xi, yi), (xi, xi), (yi, yi)):
      c = np_cost(p, q, "cosine")
      parts.append(np_value(np_ott_plan(c, 0.3, 80), c, 0.3, value))
    np.testing.assert_allclose(got[i], parts[0] - 0.5 * parts[1] - 0.5 * parts[2],
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cost", ["attention", "cosine", "euclidean"])
def test_debiased_is_zero_when_the_sequences_match(cost):
  x, _, xm, _ = _inputs(7)
  for eps, rel in ((10.0, "none"), (0.05, "std")):
    cfg = _cfg(cost=cost, epsilon=eps, relative_epsilon=rel, debiased=True, value="entropic")
    got = np.asarray(_ot(x, x, xm, xm, cfg))
    np.testing.assert_allclose(got, 0.0, atol=1e-5)
    plain = np.asarray(_ot(x, x, xm, xm, dataclasses.replace(cfg, debiased=False)))
    assert np.all(np.abs(plain) > 1e-3)  # the un-debiased value is not 0 there


def test_debiased_is_nonnegative_and_has_a_real_gradient_at_small_epsilon():
  x, y, xm, ym = _inputs(8)
  cfg = _cfg(cost="cosine", epsilon=0.02, num_iters=200, value="entropic", debiased=True)
  val = np.asarray(_ot(x, y, xm, ym, cfg))
  assert np.all(val > -1e-5) and np.all(val > 1e-3)
  f = jax.jit(lambda xx: _ot(xx, y, xm, ym, cfg).sum())
  g = np.asarray(jax.grad(f)(x))
  assert np.isfinite(g).all() and np.abs(g).sum() > 1e-2
  assert np.all(g * (1 - np.asarray(xm)[..., None]) == 0)  # padding gets no gradient
  # a small step against the gradient lowers the divergence
  assert float(f(x - 0.05 * g)) < float(f(x))


@pytest.mark.parametrize("grad", ["envelope", "unrolled"])
def test_debiased_empty_side_gives_zero_and_zero_gradient(grad):
  x, y, _, _ = _inputs(9)
  xm, ym = _mask([0, 3, 4], N), _mask([5, 0, 2], M)
  cfg = _cfg(cost="cosine", epsilon=0.1, relative_epsilon="std", debiased=True,
             value="entropic", grad=grad, num_iters=30)
  vals = np.asarray(_ot(x, y, xm, ym, cfg, tau_a=0.9))
  assert vals[0] == 0.0 and vals[1] == 0.0 and vals[2] != 0.0
  gx, gy = jax.jit(jax.grad(lambda xx, yy: _ot(xx, yy, xm, ym, cfg, tau_a=0.9)[:2].sum(),
                            argnums=(0, 1)))(x, y)
  assert np.all(np.asarray(gx) == 0) and np.all(np.asarray(gy) == 0)
  gx, gy = jax.jit(jax.grad(lambda xx, yy: _ot(xx, yy, xm, ym, cfg, tau_a=0.9).sum(),
                            argnums=(0, 1)))(x, y)
  assert np.isfinite(np.asarray(gx)).all() and np.isfinite(np.asarray(gy)).all()


# ---- c. unbalanced OT ------------------------------------------------------------------------


def test_unbalanced_plan_matches_reference():
  rng = np.random.default_rng(10)
  c = rng.uniform(size=(N, M))
  cfg = _cfg(epsilon=0.1, num_iters=50)
  a, b = ot.uniform_marginal(jnp.ones(N)), ot.uniform_marginal(jnp.ones(M))
  got = np.asarray(_plan(jnp.asarray(c, jnp.float32), a, b, cfg, tau_a=0.7, tau_b=0.9))
  np.testing.assert_allclose(got, np_ott_plan(c, 0.1, 50, tau_a=0.7, tau_b=0.9), rtol=1e-4,
                             atol=1e-8)


def test_relaxed_cot_side_leaves_the_rationale_untransported():
  """y = a noisy copy of x (the answer) followed by unrelated tokens (the rationale): with the
  y side relaxed, the rationale rows receive far less mass; the x marginal is still exact."""
  rng = np.random.default_rng(11)
  x = rng.normal(size=(4, D))
  y = np.concatenate([rng.normal(size=(6, D)) * 3.0, x + 0.05 * rng.normal(size=(4, D))])
  c = jnp.asarray(np_cost(x, y, "euclidean"), jnp.float32)
  a, b = ot.uniform_marginal(jnp.ones(4)), ot.uniform_marginal(jnp.ones(10))
  cfg = _cfg(epsilon=0.1, num_iters=300)
  balanced = np.asarray(_plan(c, a, b, cfg))
  relaxed = np.asarray(_plan(c, a, b, cfg, tau_b=0.5))
  assert balanced[:, :6].sum() == pytest.approx(0.6, abs=1e-3)
  assert relaxed[:, :6].sum() < 0.1
  np.testing.assert_allclose(relaxed.sum(1), 0.25, atol=1e-4)


def test_term_taus_reach_each_term():
  cfg = _cfg(tau_same=0.95, tau_cross_cot=0.6, tau_cross_plain=0.8)
  assert cfg.term_taus("same") == (0.95, 0.95)
  assert cfg.term_taus("cross_a") == (0.8, 0.6)  # student plain (pair) vs teacher CoT (main)
  assert cfg.term_taus("cross_b") == (0.6, 0.8)  # student CoT (main) vs teacher plain (pair)
  student, teacher, batch = _view_batch(0, ("final",))
  proj = Projectors.ot(DT, DS, rngs=nnx.Rngs(0))
  cfg = dataclasses.replace(cfg, cost="cosine", epsilon=0.2, layers=("final",))
  out = _terms(student, teacher, batch, proj, cfg)
  for term, (sv, tv) in ot.TERM_VIEWS.items():
    ta, tb = cfg.term_taus(term)
    per = _ot(student[sv]["final"], proj(teacher[tv]["final"]),
              batch[spec.key(sv, "student", "loss_mask")],
              batch[spec.key(tv, "teacher", "loss_mask")], cfg, tau_a=ta, tau_b=tb)
    if term != "same":
      per = per * batch["has_pair"]
    np.testing.assert_allclose(float(out[f"ot/{term}/final"]), 0.25 * float(per.mean()),
                               rtol=1e-5)
  balanced = _terms(student, teacher, batch, proj, dataclasses.replace(
      cfg, tau_same=1.0, tau_cross_cot=1.0, tau_cross_plain=1.0))
  for term in ot.TERMS:
    assert float(out[f"ot/{term}/final"]) != float(balanced[f"ot/{term}/final"])


# ---- plan_peak -------------------------------------------------------------------------------


def test_plan_peak():
  xm, ym = _mask([3], 5)[0], _mask([4], 6)[0]
  uniform = jnp.zeros((5, 6)).at[:3, :4].set(1.0 / 12)
  assert float(ot.plan_peak(uniform, xm, ym)) == pytest.approx(1.0)
  peaked = uniform.at[1, 2].set(0.25).at[4, 5].set(7.0)  # the padded entry is ignored
  assert float(ot.plan_peak(peaked, xm, ym)) == pytest.approx(3.0)
  assert float(ot.plan_peak(peaked, jnp.zeros(5), ym)) == 0.0
  # the paper's ε = 10 keeps the attention-cost plan near uniform; a relative ε does not
  x, y, _, _ = _inputs(12)
  c = ot.cost_matrix(x[0], y[0], jnp.ones(M), "cosine")
  a, b = ot.uniform_marginal(jnp.ones(N)), ot.uniform_marginal(jnp.ones(M))
  paper = float(ot.plan_peak(_plan(c, a, b, _cfg()), jnp.ones(N), jnp.ones(M)))
  sharp = float(ot.plan_peak(_plan(c, a, b, _cfg(relative_epsilon="std", epsilon=0.5)),
                             jnp.ones(N), jnp.ones(M)))
  assert paper < 1.2 and sharp >= 2.0


# ---- d. layers and layer weights -------------------------------------------------------------


def test_layer_names_and_state_indices():
  for good in ("embed", "final", "mid", "s1:t2", "s-2:t0"):
    ot_layers.check_layer(good)
  for bad in ("s1", "t1:s2", "s1:t2:t3", "middle", "s1.5:t2"):
    with pytest.raises(ValueError):
      ot_layers.check_layer(bad)
  assert ot_layers.hidden_states_request(("embed", "final")) == "ends"
  assert ot_layers.hidden_states_request(("final", "mid")) == "all"
  idx = ot_layers.state_index
  assert [idx(l, "student", 2) for l in ("embed", "final")] == [0, 1]
  # 4 student blocks (5 states), 6 teacher blocks (7 states)
  assert [idx(l, "student", 5) for l in ("embed", "mid", "final", "s1:t5", "s-2:t-3")] == [
      0, 2, 4, 1, 3]
  assert [idx(l, "teacher", 7) for l in ("embed", "mid", "final", "s1:t5", "s-2:t-3")] == [
      0, 3, 6, 5, 4]
  with pytest.raises(ValueError, match="out of range"):
    idx("s5:t1", "student", 5)
  with pytest.raises(ValueError, match="needs all hidden states"):
    idx("mid", "student", 2)


def test_select_states_picks_the_mapped_layers():
  s_states = tuple(jnp.full((1, 2, 3), float(i)) for i in range(5))
  t_states = tuple(jnp.full((1, 2, 4), 10.0 + i) for i in range(7))
  outs = {"main": ModelOutput(None, s_states, None), "pair": None}
  got = ot_layers.select_states(outs, ("main", "pair"), "student", ("embed", "s3:t1", "final"))
  assert set(got) == {"main"}
  assert [float(got["main"][l][0, 0, 0]) for l in ("embed", "s3:t1", "final")] == [0, 3, 4]
  got = ot_layers.select_states({"main": ModelOutput(None, t_states, None)}, ("main",),
                                "teacher", ("mid", "s3:t1"))
  assert [float(got["main"][l][0, 0, 0]) for l in ("mid", "s3:t1")] == [13, 11]


def test_combine_layers_reference_values():
  per = jnp.asarray([0.3, 1.2, 0.05], jnp.float32)
  theta = jnp.asarray([0.4, -1.0, 7.0], jnp.float32)
  total, w = ot_layers.combine_layers(per, "fixed")
  assert float(total) == pytest.approx(1.55, rel=1e-6) and np.all(np.asarray(w) == 1)
  for kind in ("learned", "uncertainty"):  # at θ = 0 both equal "fixed"
    t0, w0 = ot_layers.combine_layers(per, kind, jnp.zeros(3))
    assert float(t0) == pytest.approx(1.55, rel=1e-6)
    np.testing.assert_allclose(np.asarray(w0), 1.0, rtol=1e-6)
  th = np.asarray(theta, np.float64)
  p = np.asarray(per, np.float64)
  soft = np.exp(th) / np.exp(th).sum()
  total, w = ot_layers.combine_layers(per, "learned", theta)
  np.testing.assert_allclose(np.asarray(w), 3 * soft, rtol=1e-5)
  assert float(total) == pytest.approx(float((3 * soft * p).sum()), rel=1e-5)
  s = np.clip(th, -5, 5)
  total, w = ot_layers.combine_layers(per, "uncertainty", theta)
  np.testing.assert_allclose(np.asarray(w), np.exp(-s), rtol=1e-5)
  assert float(total) == pytest.approx(float((np.exp(-s) * p + s).sum()), rel=1e-5)
  with pytest.raises(ValueError, match="needs the OT projector set"):
    ot_layers.combine_layers(per, "learned", None)


def test_ot_projectors_add_layer_parameters_only_when_learned():
  fixed = ot_layers.ot_projectors(DT, DS, rngs=nnx.Rngs(3))
  paper = Projectors.ot(DT, DS, rngs=nnx.Rngs(3))
  learned = ot_layers.ot_projectors(DT, DS, rngs=nnx.Rngs(3), layers=("embed", "mid", "final"),
                                    weighting="learned")
  assert jax.tree.structure(nnx.state(fixed)) == jax.tree.structure(nnx.state(paper))
  assert not hasattr(fixed, "layer_params")
  assert np.array_equal(np.asarray(learned.linear.kernel[...]),
                        np.asarray(paper.linear.kernel[...]))
  assert np.asarray(learned.layer_params[...]).tolist() == [0.0, 0.0, 0.0]
  x = jnp.ones((2, DT))
  np.testing.assert_array_equal(np.asarray(learned(x)), np.asarray(paper(x)))


B, LS, LT, DS, DT = 3, 6, 8, 8, 12


def _view_batch(seed, layers):
  rng = np.random.default_rng(seed)
  student, teacher, batch = {}, {}, {"has_pair": jnp.asarray([1.0, 0.0, 1.0])}
  lens = {("main", "student"): [6, 3, 5], ("main", "teacher"): [8, 2, 7],
          ("pair", "student"): [4, 0, 6], ("pair", "teacher"): [5, 0, 3]}
  for view in spec.VIEWS:
    student[view] = {l: jnp.asarray(rng.normal(size=(B, LS, DS)), jnp.float32) for l in layers}
    teacher[view] = {l: jnp.asarray(rng.normal(size=(B, LT, DT)), jnp.float32) for l in layers}
    batch[spec.key(view, "student", "loss_mask")] = _mask(lens[(view, "student")], LS)
    batch[spec.key(view, "teacher", "loss_mask")] = _mask(lens[(view, "teacher")], LT)
  return student, teacher, batch


@pytest.mark.parametrize("weighting", ["learned", "uncertainty"])
def test_weighted_layers_in_view_terms(weighting):
  layers = ("embed", "mid", "s1:t2")
  student, teacher, batch = _view_batch(1, layers)
  cfg = _cfg(cost="cosine", epsilon=0.2, layers=layers, layer_weighting=weighting, num_iters=30)
  proj = ot_layers.ot_projectors(DT, DS, rngs=nnx.Rngs(1), layers=layers, weighting=weighting)
  theta = jnp.asarray([0.5, -0.2, 0.1], jnp.float32)
  proj.layer_params[...] = theta
  out = _terms(student, teacher, batch, proj, cfg)
  fixed = _terms(student, teacher, batch, Projectors.ot(DT, DS, rngs=nnx.Rngs(1)),
                 dataclasses.replace(cfg, layer_weighting="fixed"))
  per = jnp.asarray([sum(float(fixed[f"ot/{t}/{l}"]) for t in ot.TERMS) for l in layers])
  want, w = ot_layers.combine_layers(per, weighting, theta)
  np.testing.assert_allclose(float(out["ot/total"]), float(want), rtol=1e-5)
  for i, l in enumerate(layers):
    np.testing.assert_allclose(float(out[f"ot/weight/{l}"]), float(w[i]), rtol=1e-6)
    for t in ot.TERMS:  # the terms themselves are unweighted
      np.testing.assert_allclose(float(out[f"ot/{t}/{l}"]), float(fixed[f"ot/{t}/{l}"]),
                                 rtol=1e-6)
  # the layer parameters train: finite, nonzero gradient
  graphdef, params = nnx.split(proj)
  g = jax.jit(jax.grad(lambda p: ot.ot_view_terms(student, teacher, batch,
                                                  nnx.merge(graphdef, p), cfg)["ot/total"]))(
      params)
  assert np.isfinite(np.asarray(g["layer_params"][...])).all()
  assert np.abs(np.asarray(g["layer_params"][...])).min() > 0
  with pytest.raises(ValueError, match="needs the OT projector set"):
    _terms(student, teacher, batch, Projectors.ot(DT, DS, rngs=nnx.Rngs(1)), cfg)
