"""Same-vocabulary KD divergences against float64 numpy re-computations of their formulas,
plus sanity properties, −inf (padded vocabulary) handling, gradients, masks and bf16 input.

Shapes are tiny ([2, 3, 11]) so that the whole file runs in a few seconds on a shared CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cot2align_jax.core.numerics import masked_mean, masked_sum
from cot2align_jax.losses import divergences as D
from cot2align_jax.losses.divergences import DIVERGENCES, LOG_FLOOR, kd_loss, token_divergence

B, T, V = 2, 3, 11
TAU = 2.0
MASK = np.array([[1, 1, 0], [0, 1, 1]], np.int32)

# (name, params) pairs covering every divergence and the non-default parameters.
CASES = [
    ("fkl", {}), ("rkl", {}), ("js", {}), ("tvd", {}),
    ("skl", {}), ("skl", {"lam": 0.3}), ("srkl", {}), ("srkl", {"lam": 0.3}),
    ("akl", {}), ("akl", {"mu": 0.3}), ("akl", {"mu": 0.8}),
    ("gjsd", {}), ("gjsd", {"beta": 0.2}), ("gjsd", {"beta": 0.7, "normalize": True}),
    ("gjsd", {"beta": 0.0}), ("gjsd", {"beta": 1.0}),
]
CASE_IDS = [n + "".join(f"-{k}={v}" for k, v in p.items()) for n, p in CASES]


def _logits(seed, scale=3.0, shape=(B, T, V)):
  rng = np.random.default_rng(seed)
  return (scale * rng.standard_normal(shape)).astype(np.float32)


# ------------------------------------------------------------------------------------------
# float64 numpy reference, written from the formulas (finite logits only)
# ------------------------------------------------------------------------------------------

def _np_softmax(logits, tau):
  z = logits.astype(np.float64) / tau
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_kl(a, b):
  return np.sum(a * (np.log(a) - np.log(b)), -1)


def _np_akl(p, q, mu):
  out = np.zeros(p.shape[:-1])
  for idx in np.ndindex(*p.shape[:-1]):
    order = np.argsort(-p[idx], kind="stable")
    ps, qs = p[idx][order], q[idx][order]
    # smallest head (a prefix of the descending order) whose teacher mass reaches mu
    k = int(np.searchsorted(np.cumsum(ps), mu, side="left")) + 1 if mu > 0 else 0
    g_head = np.abs(ps[:k] - qs[:k]).sum()
    g_tail = np.abs(ps[k:] - qs[k:]).sum()
    fkl, rkl = _np_kl(p[idx], q[idx]), _np_kl(q[idx], p[idx])
    out[idx] = (g_head * fkl + g_tail * rkl) / (g_head + g_tail)
  return out


def _np_divergence(name, p, q, **params):
  """Per-token value of divergence `name` for teacher p and student q (float64)."""
  if name == "fkl":
    return _np_kl(p, q)
  if name == "rkl":
    return _np_kl(q, p)
  if name == "js":
    m = 0.5 * (p + q)
    return 0.5 * _np_kl(p, m) + 0.5 * _np_kl(q, m)
  if name == "tvd":
    return 0.5 * np.abs(p - q).sum(-1)
  if name == "skl":
    lam = params.get("lam", 0.1)
    return _np_kl(p, lam * p + (1 - lam) * q)
  if name == "srkl":
    lam = params.get("lam", 0.1)
    return _np_kl(q, (1 - lam) * p + lam * q)
  if name == "akl":
    return _np_akl(p, q, params.get("mu", 0.5))
  if name == "gjsd":
    beta = params.get("beta", 0.5)
    if beta == 0.0:
      return _np_kl(p, q)
    if beta == 1.0:
      return _np_kl(q, p)
    m = beta * p + (1 - beta) * q
    value = beta * _np_kl(p, m) + (1 - beta) * _np_kl(q, m)
    return value / (beta * (1 - beta)) if params.get("normalize", False) else value
  raise KeyError(name)


# ------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------

def test_registry_and_unknown_name():
  assert set(DIVERGENCES) == {"fkl", "rkl", "js", "tvd", "skl", "srkl", "akl", "gjsd"}
  s, t = _logits(0), _logits(1)
  with pytest.raises(ValueError, match="known: akl, fkl, gjsd, js, rkl, skl, srkl, tvd"):
    token_divergence("kl", s, t)
  with pytest.raises(ValueError):
    D.gjsd(jnp.zeros((1, 3)), jnp.zeros((1, 3)), beta=1.5)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_matches_numpy_reference(name, params):
  s, t = _logits(10), _logits(11)
  got = token_divergence(name, s, t, temperature=TAU, **params)
  assert got.shape == (B, T) and got.dtype == jnp.float32
  want = _np_divergence(name, _np_softmax(t, TAU), _np_softmax(s, TAU), **params)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
  total, count = kd_loss(name, s, t, MASK, temperature=TAU, **params)
  assert total.dtype == jnp.float32 and count.dtype == jnp.float32
  np.testing.assert_allclose(float(total), float((want * MASK).sum()), rtol=1e-5)
  assert float(count) == MASK.sum()


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_zero_when_identical_and_nonnegative(name, params):
  s, t = _logits(20), _logits(21)
  same = token_divergence(name, s, s, temperature=TAU, **params)
  assert float(jnp.max(jnp.abs(same))) <= 1e-6
  diff = token_divergence(name, s, t, temperature=TAU, **params)
  assert float(jnp.min(diff)) > 0.0


def test_temperature_no_tau_squared():
  s, t = _logits(30), _logits(31)
  # τ only rescales the logits: fkl(s, t, τ) == fkl(s/τ, t/τ, 1), with no τ² factor.
  np.testing.assert_allclose(token_divergence("fkl", s, t, temperature=TAU),
                             token_divergence("fkl", s / TAU, t / TAU), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Sanity properties
# ------------------------------------------------------------------------------------------

def test_js_symmetry_and_gjsd_half_is_js():
  s, t = _logits(40), _logits(41)
  js = token_divergence("js", s, t, temperature=TAU)
  np.testing.assert_allclose(js, token_divergence("js", t, s, temperature=TAU), rtol=1e-6)
  assert float(jnp.max(js)) <= np.log(2) + 1e-6
  np.testing.assert_allclose(token_divergence("gjsd", s, t, temperature=TAU, beta=0.5), js,
                             rtol=1e-6)
  np.testing.assert_allclose(
      token_divergence("gjsd", s, t, temperature=TAU, beta=0.5, normalize=True), 4 * js,
      rtol=1e-6)


def test_gjsd_limits():
  # unit-scale logits: the β → 0 error of the normalised value grows with max p/q
  s, t = _logits(50, scale=1.0), _logits(51, scale=1.0)
  f = token_divergence("fkl", s, t)
  r = token_divergence("rkl", s, t)
  np.testing.assert_array_equal(token_divergence("gjsd", s, t, beta=0.0), f)
  np.testing.assert_array_equal(token_divergence("gjsd", s, t, beta=1.0), r)
  # normalised GJSD / (β(1−β)) is continuous: → FKL as β → 0, → RKL as β → 1
  near0 = token_divergence("gjsd", s, t, beta=1e-3, normalize=True)
  near1 = token_divergence("gjsd", s, t, beta=1 - 1e-3, normalize=True)
  np.testing.assert_allclose(near0, f, rtol=1e-2)
  np.testing.assert_allclose(near1, r, rtol=1e-2)
  # the raw value tends to 0 at both ends
  assert float(jnp.max(token_divergence("gjsd", s, t, beta=1e-3))) < 2e-2 * float(jnp.max(f))


def test_tvd_bounds():
  s, t = _logits(60), _logits(61)
  assert float(jnp.max(token_divergence("tvd", s, t))) <= 1.0
  # nearly disjoint supports → TVD ≈ 1
  far_s = np.full((1, 1, V), -50.0, np.float32)
  far_t = far_s.copy()
  far_s[..., 0] = 50.0
  far_t[..., 1] = 50.0
  got = float(token_divergence("tvd", far_s, far_t)[0, 0])
  assert 0.999 < got <= 1.0


def test_skew_limits():
  s, t = _logits(70), _logits(71)
  for name in ("skl", "srkl"):
    assert float(jnp.max(jnp.abs(token_divergence(name, s, t, lam=1.0)))) <= 1e-6
  np.testing.assert_allclose(token_divergence("skl", s, t, lam=0.0),
                             token_divergence("fkl", s, t), rtol=1e-6)
  np.testing.assert_allclose(token_divergence("srkl", s, t, lam=0.0),
                             token_divergence("rkl", s, t), rtol=1e-6)
  # skewing bounds the divergence: KL(p ‖ λp + (1−λ)q) ≤ log(1/λ)
  assert float(jnp.max(token_divergence("skl", s, t, lam=0.1))) <= np.log(10.0) + 1e-5


def test_akl_limits():
  s, t = _logits(80), _logits(81)
  f = token_divergence("fkl", s, t)
  r = token_divergence("rkl", s, t)
  # μ = 0: empty head → all weight on RKL; μ > 1: whole vocabulary is head → FKL
  np.testing.assert_allclose(token_divergence("akl", s, t, mu=0.0), r, rtol=1e-6)
  np.testing.assert_allclose(token_divergence("akl", s, t, mu=2.0), f, rtol=1e-6)
  a = token_divergence("akl", s, t)
  assert bool(jnp.all(a >= jnp.minimum(f, r) - 1e-6) & jnp.all(a <= jnp.maximum(f, r) + 1e-6))


# ------------------------------------------------------------------------------------------
# −inf logits (padded vocabulary)
# ------------------------------------------------------------------------------------------

PAD = 3  # trailing padded vocabulary columns


def _padded(logits, student_only_col=None):
  out = np.concatenate([logits, np.full(logits.shape[:-1] + (PAD,), -np.inf, np.float32)], -1)
  if student_only_col is not None:
    out[..., student_only_col] = -np.inf
  return out


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_shared_padded_columns_are_excluded(name, params):
  s, t = _logits(90), _logits(91)
  want = token_divergence(name, s, t, temperature=TAU, **params)
  got = token_divergence(name, _padded(s), _padded(t), temperature=TAU, **params)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_one_sided_inf_is_finite_and_uses_floor():
  s, t = _logits(100), _logits(101)
  s_pad = _padded(s, student_only_col=0)  # student −inf where the teacher has mass
  for name, params in CASES:
    got = token_divergence(name, s_pad, _padded(t), temperature=TAU, **params)
    assert bool(jnp.all(jnp.isfinite(got))), name
    got = token_divergence(name, _padded(t), s_pad, temperature=TAU, **params)
    assert bool(jnp.all(jnp.isfinite(got))), name
  # FKL there = Σ p (log p − max(log q, floor)), q = 0 in column 0
  p = _np_softmax(t, TAU)
  s64 = s.astype(np.float64) / TAU
  s64[..., 0] = -np.inf
  z = s64 - s64[..., 1:].max(-1, keepdims=True)
  logq = z - np.log(np.exp(z).sum(-1, keepdims=True))
  want = np.sum(p * (np.log(p) - np.maximum(logq, LOG_FLOOR)), -1)
  got = token_divergence("fkl", s_pad, _padded(t), temperature=TAU)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(jnp.min(got)) > 1.0  # large penalty, not silently dropped


def test_all_inf_row_is_finite():
  s, t = _logits(110), _logits(111)
  s[0, 0] = -np.inf
  t[1, 2] = -np.inf
  for name, params in CASES:
    got = token_divergence(name, s, t, **params)
    assert bool(jnp.all(jnp.isfinite(got))), name


# ------------------------------------------------------------------------------------------
# Gradients and masks
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_gradients_finite_with_masked_rows_and_inf_columns(name, params):
  s = _padded(_logits(120), student_only_col=1)
  t = _padded(_logits(121))
  t[0, 0, 2] = -np.inf  # teacher-only −inf column
  mask = np.array([[1, 0, 1], [0, 0, 0]], np.int32)  # second row fully masked

  def loss(s_, t_):
    total, count = kd_loss(name, s_, t_, mask, temperature=TAU, **params)
    return total / count

  value, (gs, gt) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
  assert np.isfinite(float(value))
  assert bool(jnp.all(jnp.isfinite(gs)))
  assert float(jnp.max(jnp.abs(gt))) == 0.0  # the teacher is a constant
  assert float(jnp.max(jnp.abs(gs[1]))) == 0.0  # masked row gets no gradient
  assert float(jnp.max(jnp.abs(gs[..., V:]))) == 0.0  # padded columns get no gradient
  assert float(jnp.max(jnp.abs(gs[0, 0]))) > 0.0


def test_fkl_gradient_is_q_minus_p_over_tau():
  s, t = _logits(125), _logits(126)
  grad = jax.grad(lambda s_: jnp.sum(token_divergence("fkl", s_, t, temperature=TAU)))(s)
  want = (_np_softmax(s, TAU) - _np_softmax(t, TAU)) / TAU
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)


def test_masked_sum_and_mean():
  values = jnp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
  total, count = masked_sum(values, MASK)
  assert float(total) == 0 + 1 + 4 + 5 and float(count) == 4.0
  assert float(masked_mean(values, MASK)) == 2.5
  # masked positions holding inf/NaN do not leak
  bad = values.at[0, 2].set(jnp.nan).at[1, 0].set(jnp.inf)
  assert float(masked_sum(bad, MASK)[0]) == 10.0
  # float weights and bool masks
  assert float(masked_sum(values, MASK.astype(bool))[0]) == 10.0
  assert float(masked_sum(values, 0.5 * MASK)[1]) == 2.0


def test_masked_mean_empty_mask_is_zero_with_zero_gradient():
  zeros = np.zeros((2, 3), np.int32)
  value, grad = jax.value_and_grad(lambda v: masked_mean(v, zeros))(jnp.ones((2, 3)))
  assert float(value) == 0.0
  assert bool(jnp.all(grad == 0.0))
  s, t = _logits(130), _logits(131)

  def loss(s_):
    return masked_mean(token_divergence("akl", s_, t, temperature=TAU), zeros)

  value, grad = jax.value_and_grad(loss)(jnp.asarray(s))
  assert float(value) == 0.0 and bool(jnp.all(grad == 0.0))


def test_jit():
  s, t = _logits(140), _logits(141)
  f = jax.jit(lambda a, b, m: kd_loss("srkl", a, b, m, temperature=TAU, lam=0.1))
  total, _ = f(s, t, MASK)
  np.testing.assert_allclose(float(total),
                             float(kd_loss("srkl", s, t, MASK, temperature=TAU)[0]), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# bf16 input
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_bf16_logits(name, params):
  s, t = _logits(150), _logits(151)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = token_divergence(name, s16, t16, temperature=TAU, **params)
  assert got.dtype == jnp.float32
  # computed in float32: identical to the float32 result on the bf16-rounded logits
  ref_rounded = token_divergence(name, s16.astype(jnp.float32), t16.astype(jnp.float32),
                                 temperature=TAU, **params)
  np.testing.assert_array_equal(got, ref_rounded)
  # and close to the float32 result on the original logits (bf16 keeps ~3 digits)
  ref = token_divergence(name, s, t, temperature=TAU, **params)
  np.testing.assert_allclose(got, ref, rtol=3e-2, atol=1e-3)
  assert bool(jnp.all(got >= 0.0))
