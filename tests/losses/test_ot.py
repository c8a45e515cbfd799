"""Tests of cot2align_jax.losses.ot: Sinkhorn OT values, gradients, padding and the OT terms."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ott.geometry import geometry as ott_geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn as ott_sinkhorn

from cot2align_jax.core import spec
from cot2align_jax.losses import ot
from cot2align_jax.losses.projectors import Projectors

# jitted entry points: eager ott dispatch is slow, and each shape compiles once
_STATIC = ("cost", "epsilon", "num_iters", "grad", "lse_mode")
_ot = jax.jit(ot.sinkhorn_ot, static_argnames=_STATIC)

N, M, D = 7, 9, 16
N_VALID = np.array([7, 4, 1])
M_VALID = np.array([9, 5, 3])


def _mask(lengths, size):
  return jnp.asarray((np.arange(size)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32))


def _inputs(seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(scale * rng.normal(size=(len(N_VALID), N, D)), jnp.float32)
  y = jnp.asarray(scale * rng.normal(size=(len(M_VALID), M, D)), jnp.float32)
  return x, y, _mask(N_VALID, N), _mask(M_VALID, M)


# ---- a float64 numpy re-implementation of the reference (valid rows only, no masks) ----------


def _np_cost(x, y, kind):
  if kind == "attention":
    s = x @ y.T / np.sqrt(x.shape[1])
    s = np.exp(s - s.max(axis=1, keepdims=True))
    return 1.0 - s / s.sum(axis=1, keepdims=True)
  if kind == "cosine":
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    return 1.0 - xn @ yn.T
  return np.sqrt(((x[:, None, :] - y[None, :, :])**2).sum(-1))


def _np_reference_ot(x, y, kind, alpha=0.1, iters=100):
  c = _np_cost(np.asarray(x, np.float64), np.asarray(y, np.float64), kind)
  n, m = c.shape
  a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
  k = np.exp(-alpha * c)
  v = np.ones(m)
  for _ in range(iters):
    u = a / (k @ v + 1e-9)
    v = b / (k.T @ u + 1e-9)
  plan = u[:, None] * k * v[None, :]
  return float((plan * c).sum()), plan


@pytest.mark.parametrize("cost", ["attention", "cosine", "euclidean"])
def test_matches_float64_reference_loop(cost):
  x, y, xm, ym = _inputs()
  got = _ot(x, y, xm, ym, cost=cost)
  assert got.dtype == jnp.float32 and got.shape == (3,)
  for i in range(3):
    want, _ = _np_reference_ot(x[i, :N_VALID[i]], y[i, :M_VALID[i]], cost)
    np.testing.assert_allclose(float(got[i]), want, rtol=1e-5, atol=1e-6)


def test_plan_matches_reference_plan():
  """Plan against plan (a stricter check than the value): ott against the reference loop."""
  x, y, _, _ = _inputs()
  c = ot.cost_matrix(x[0], y[0], jnp.ones(M), "attention")
  a, b = jnp.full(N, 1.0 / N), jnp.full(M, 1.0 / M)
  _, want = _np_reference_ot(x[0], y[0], "attention")
  plan = jax.jit(ot.sinkhorn_plan)(c, a, b)
  np.testing.assert_allclose(np.asarray(plan), want, rtol=1e-5, atol=1e-9)


def test_attention_cost_value_is_nearly_one_minus_one_over_m():
  """docs/method.md §6.4: at eps = 10 the plan is close to a b^T, so <P, C> ~= 1 - 1/m."""
  x, y, xm, ym = _inputs(seed=1)
  got = np.asarray(_ot(x, y, xm, ym))
  np.testing.assert_allclose(got, 1.0 - 1.0 / M_VALID, atol=0.2 / M_VALID.min())
  assert np.all(np.abs(got - (1.0 - 1.0 / M_VALID)) > 0)  # ...but not exactly constant


def test_vmap_equals_loop_and_padding_changes_nothing():
  x, y, xm, ym = _inputs(seed=2)
  batched = _ot(x, y, xm, ym, cost="cosine")
  for i in range(3):
    n, m = N_VALID[i], M_VALID[i]
    loop = _ot(x[i:i + 1], y[i:i + 1], xm[i:i + 1], ym[i:i + 1], cost="cosine")
    unpadded = _ot(x[i:i + 1, :n], y[i:i + 1, :m], jnp.ones((1, n)), jnp.ones((1, m)),
                              cost="cosine")
    np.testing.assert_allclose(float(batched[i]), float(loop[0]), rtol=1e-6)
    np.testing.assert_allclose(float(batched[i]), float(unpadded[0]), rtol=1e-5)
  # garbage in padded positions changes nothing, values nor gradients
  noise = 100.0 * jnp.ones_like(x) * (1 - xm[..., None])

  def f(xx):
    return _ot(xx, y, xm, ym).sum()

  vg = jax.jit(jax.value_and_grad(f))
  (v_noisy, g_noisy), (v_clean, g_clean) = vg(x + noise), vg(x)
  np.testing.assert_allclose(v_noisy, v_clean, rtol=1e-6)
  np.testing.assert_allclose(g_noisy, g_clean, rtol=1e-5, atol=1e-9)


@functools.partial(jax.jit, static_argnames=("epsilon", "iters"))
def _reg_ot_cost(c, a, b, epsilon=10.0, iters=200):
  """ott's entropic objective (from its duals) after `iters` fixed iterations."""
  solver = ott_sinkhorn.Sinkhorn(min_iterations=iters, max_iterations=iters, implicit_diff=None)
  return solver(linear_problem.LinearProblem(
      ott_geometry.Geometry(cost_matrix=c, epsilon=epsilon), a=a, b=b)).reg_ot_cost


def test_envelope_gradient_is_derivative_of_entropic_objective():
  """Danskin: d reg_ot_cost / dC = P, so the envelope gradient is reg_ot_cost's gradient."""
  x, y, xm, ym = _inputs(seed=3)
  rng = np.random.default_rng(3)
  # w.r.t. the cost matrix (every cost kind reduces to this), with padding
  c = ot.cost_matrix(x[1], y[1], ym[1], "attention")
  a, b = ot.uniform_marginal(xm[1]), ot.uniform_marginal(ym[1])
  direction = jnp.asarray(rng.normal(size=c.shape), jnp.float32) * xm[1][:, None] * ym[1][None]
  g = jax.jit(jax.grad(lambda cc: ot.sinkhorn_value(cc, xm[1], ym[1])))(c)
  h = 1e-2
  fd = (_reg_ot_cost(c + h * direction, a, b) - _reg_ot_cost(c - h * direction, a, b)) / (2 * h)
  np.testing.assert_allclose(float(jnp.sum(g * direction)), float(fd), rtol=2e-3)
  # w.r.t. the student states, through the cosine and Euclidean costs
  for cost in ("cosine", "euclidean"):
    gx = jax.jit(jax.grad(lambda xx, cost=cost: ot.sinkhorn_ot(xx, y, xm, ym, cost=cost)[1]))(x)
    dx = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def reg(xx, cost=cost):
      return _reg_ot_cost(ot.cost_matrix(xx[1], y[1], ym[1], cost), a, b)


    fd = (reg(x + h * dx) - reg(x - h * dx)) / (2 * h)
    np.testing.assert_allclose(float(jnp.sum(gx * dx)), float(fd), rtol=5e-3)


def test_unrolled_gradients_finite_and_close_to_envelope():
  x, y, xm, ym = _inputs(seed=4)

  def f(xx, yy, grad):
    return _ot(xx, yy, xm, ym, cost="cosine", grad=grad).sum()

  vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)
  vu, gu = vg(x, y, "unrolled")
  ve, ge = vg(x, y, "envelope")
  for u, e in zip(gu, ge):
    assert np.isfinite(np.asarray(u)).all()
    # at eps = 10 the plan barely depends on C, so both gradients are close
    np.testing.assert_allclose(np.asarray(u), np.asarray(e), atol=0.05 * float(jnp.abs(e).max()))
  np.testing.assert_allclose(vu, ve, rtol=1e-6)


@pytest.mark.parametrize("grad", ["envelope", "unrolled"])
def test_empty_side_gives_zero_and_zero_gradient(grad):
  x, y, _, _ = _inputs(seed=5)
  xm = _mask([0, 3, 2], N)
  ym = _mask([4, 0, 3], M)

  def f(xx, yy):
    return _ot(xx, yy, xm, ym, grad=grad)

  vals = f(x, y)
  assert float(vals[0]) == 0.0 and float(vals[1]) == 0.0 and float(vals[2]) > 0
  gx, gy = jax.jit(jax.grad(lambda xx, yy: f(xx, yy)[:2].sum(), argnums=(0, 1)))(x, y)
  assert np.all(np.asarray(gx) == 0) and np.all(np.asarray(gy) == 0)


def test_cosine_and_euclidean_zero_vectors_have_finite_gradients():
  x, y, xm, ym = _inputs(seed=6)
  x = x.at[:, -3:].set(0.0)  # zero (padded-looking) vectors, some inside the valid range
  y = y.at[:, -4:].set(0.0)
  xm, ym = jnp.ones_like(xm), jnp.ones_like(ym)
  y = y.at[0, 0].set(x[0, 0])  # a coincident pair: Euclidean distance 0
  for cost in ("cosine", "euclidean"):
    for grad in ("envelope", "unrolled"):
      g = jax.jit(jax.grad(lambda xx, yy, cost=cost, grad=grad: ot.sinkhorn_ot(
          xx, yy, xm, ym, cost=cost, grad=grad).sum(), argnums=(0, 1)))(x, y)
      assert all(np.isfinite(np.asarray(t)).all() for t in g), (cost, grad)


def test_bf16_inputs_give_float32_close_to_fp32():
  x, y, xm, ym = _inputs(seed=7)
  for cost in ("attention", "cosine"):
    f32 = _ot(x, y, xm, ym, cost=cost)
    bf = _ot(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), xm, ym, cost=cost)
    assert bf.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf), np.asarray(f32), rtol=2e-2)


def test_fixed_length_scan_no_while_loop():
  x, y, xm, ym = _inputs()
  jaxpr = str(jax.make_jaxpr(lambda xx: ot.sinkhorn_ot(xx, y, xm, ym))(x))
  assert "scan" in jaxpr and "while" not in jaxpr


def test_bad_options_raise():
  x, y, xm, ym = _inputs()
  with pytest.raises(ValueError):
    ot.sinkhorn_ot(x, y, xm, ym, cost="l1")
  with pytest.raises(ValueError):
    ot.sinkhorn_ot(x, y, xm, ym, grad="implicit")
  with pytest.raises(ValueError):
    ot.sinkhorn_ot(x, y, xm, ym, grad="unrolled", lse_mode=False)
  with pytest.raises(TypeError):  # one solver (ott-jax): there is no solver to choose
    ot.OTConfig(solver="jax")
  with pytest.raises(ValueError):
    ot.OTConfig(terms=("same", "cross_c"))


# ---- the CoT2Align OT terms ---------------------------------------------------------------

B, LS, LT, DS, DT = 3, 6, 8, 8, 12


def _view_batch(seed=0):
  rng = np.random.default_rng(seed)
  student, teacher, batch = {}, {}, {"has_pair": jnp.asarray([True, False, True])}
  lens = {("main", "student"): [6, 3, 5], ("main", "teacher"): [8, 2, 7],
          ("pair", "student"): [4, 0, 6], ("pair", "teacher"): [5, 0, 3]}
  for view in spec.VIEWS:
    student[view] = {l: jnp.asarray(rng.normal(size=(B, LS, DS)), jnp.float32) for l in ot.LAYERS}
    teacher[view] = {l: jnp.asarray(rng.normal(size=(B, LT, DT)), jnp.float32) for l in ot.LAYERS}
    batch[spec.key(view, "student", "loss_mask")] = _mask(lens[(view, "student")], LS)
    batch[spec.key(view, "teacher", "loss_mask")] = _mask(lens[(view, "teacher")], LT)
  # row 1 has no pair but (wrongly) non-empty pair masks: has_pair must still zero it
  batch[spec.key("pair", "student", "loss_mask")] = (
      batch[spec.key("pair", "student", "loss_mask")].at[1, :2].set(1))
  batch[spec.key("pair", "teacher", "loss_mask")] = (
      batch[spec.key("pair", "teacher", "loss_mask")].at[1, :2].set(1))
  return student, teacher, batch


def _terms(student, teacher, batch, proj, cfg):
  """ot_view_terms under jit (the projector passes as split graphdef/state)."""
  graphdef, params = nnx.split(proj)
  return _terms_jit(student, teacher, batch, graphdef, params, cfg)


@jax.jit(static_argnums=(3, 5))
def _terms_jit(student, teacher, batch, graphdef, params, cfg):
  return ot.ot_view_terms(student, teacher, batch, nnx.merge(graphdef, params), cfg)


def test_ot_view_terms_match_hand_computation():
  student, teacher, batch = _view_batch()
  proj = Projectors.ot(DT, DS, rngs=nnx.Rngs(0))
  cfg = ot.OTConfig(cost="cosine")
  out = _terms(student, teacher, batch, proj, cfg)
  total = 0.0
  for layer, term in itertools.product(ot.LAYERS, ot.TERMS):
    sv, tv = ot.TERM_VIEWS[term]
    per = _ot(student[sv][layer], proj(teacher[tv][layer]),
                         batch[spec.key(sv, "student", "loss_mask")],
                         batch[spec.key(tv, "teacher", "loss_mask")], cost="cosine")
    if term != "same":
      assert float(per[1]) > 0  # masks were (wrongly) non-empty on the row without a pair...
      per = per.at[1].set(0.0)  # ...but it must count 0, while still dividing by the full B
    want = 0.25 * float(per.sum()) / B
    np.testing.assert_allclose(float(out[f"ot/{term}/{layer}"]), want, rtol=1e-6)
    total += want
  np.testing.assert_allclose(float(out["ot/total"]), total, rtol=1e-6)


def test_ot_view_terms_switches_remove_exactly_their_part():
  student, teacher, batch = _view_batch(1)
  proj = Projectors.ot(DT, DS, rngs=nnx.Rngs(1))
  cfg = ot.OTConfig()
  full = _terms(student, teacher, batch, proj, cfg)
  only_same_final = _terms(student, teacher, batch, proj,
                           ot.OTConfig(terms=("same",), layers=("final",)))
  assert set(only_same_final) == {"ot/same/final", "ot/total"}
  np.testing.assert_allclose(float(only_same_final["ot/total"]),
                             float(full["ot/same/final"]), rtol=1e-6)
  no_b = _terms(student, teacher, batch, proj,
                ot.OTConfig(terms=("same", "cross_a")))
  np.testing.assert_allclose(
      float(no_b["ot/total"]),
      float(full["ot/total"] - full["ot/cross_b/embed"] - full["ot/cross_b/final"]), rtol=1e-6)
  # a batch with no pairs at all: cross terms are exactly 0
  batch0 = dict(batch, has_pair=jnp.zeros((B,), bool))
  none = _terms(student, teacher, batch0, proj, cfg)
  for layer in ot.LAYERS:
    assert float(none[f"ot/cross_a/{layer}"]) == 0.0
    assert float(none[f"ot/cross_b/{layer}"]) == 0.0


def test_ot_view_terms_gradients_reach_student_and_projector():
  student, teacher, batch = _view_batch(2)
  proj = Projectors.ot(DT, DS, rngs=nnx.Rngs(2))
  graphdef, params = nnx.split(proj)

  def loss(s, p):
    return ot.ot_view_terms(s, teacher, batch, nnx.merge(graphdef, p),
                            ot.OTConfig(cost="cosine"))["ot/total"]

  gs, gp = jax.jit(jax.grad(loss, argnums=(0, 1)))(student, params)
  leaves = jax.tree.leaves(gs) + jax.tree.leaves(gp)
  assert all(np.isfinite(np.asarray(t)).all() for t in leaves)
  assert float(jnp.abs(gp["linear"]["kernel"][...]).sum()) > 0
