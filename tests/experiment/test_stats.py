"""experiment/stats.py against reference values and independent numpy / scipy computations."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from cot2align_jax.experiment import stats


def test_t_interval_reference_values():
  # mean 3, s = sqrt(2.5), sem = s / sqrt(5) = 0.70711; t_{0.975, 4} = 2.7764451051977987
  low, high = stats.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
  half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
  assert low == pytest.approx(3.0 - half, abs=1e-12)
  assert high == pytest.approx(3.0 + half, abs=1e-12)
  assert (low, high) == pytest.approx((1.0367568385224393, 4.963243161477561), abs=1e-12)


def test_summarize_matches_scipy():
  x = np.array([20.5, 22.0, 19.5, 21.0, 23.5, 18.0])
  s = stats.summarize(x)
  ref = sps.t.interval(0.95, df=x.size - 1, loc=x.mean(), scale=sps.sem(x))
  assert s.n == 6
  assert s.mean == pytest.approx(x.mean(), abs=1e-12)
  assert s.std == pytest.approx(np.std(x, ddof=1), abs=1e-12)
  assert (s.ci_low, s.ci_high) == pytest.approx(ref, abs=1e-10)
  s90 = stats.summarize(x, confidence=0.9)
  assert s90.ci_high - s90.ci_low < s.ci_high - s.ci_low


def test_one_value_has_no_interval():
  s = stats.summarize([4.0])
  assert s.mean == 4.0 and math.isnan(s.std) and math.isnan(s.ci_low)
  assert s.to_json()["std"] is None and s.to_json()["mean"] == 4.0


def test_paired_difference_matches_ttest_rel():
  a = np.array([30.0, 28.5, 33.0, 31.0, 29.0])
  b = np.array([27.0, 28.0, 30.5, 29.5, 26.0])
  d = stats.paired_difference(a, b)
  ref = sps.ttest_rel(a, b).confidence_interval(0.95)
  assert d.mean == pytest.approx(np.mean(a - b), abs=1e-12)
  assert (d.ci_low, d.ci_high) == pytest.approx((ref.low, ref.high), abs=1e-10)
  with pytest.raises(ValueError):
    stats.paired_difference(a, b[:4])


def _reference_bootstrap(a, b, draws, seed, confidence=0.95):
  """The same draws as stats.paired_bootstrap, the statistic by explicit indexing."""
  d = np.asarray(a, float) - np.asarray(b, float)
  n_s, n_i = d.shape
  rng = np.random.default_rng(seed)
  out = []
  for start in range(0, draws, 1000):
    k = min(1000, draws - start)
    s_idx = rng.integers(0, n_s, size=(k, n_s))
    i_idx = rng.integers(0, n_i, size=(k, n_i))
    for j in range(k):
      out.append(d[np.ix_(s_idx[j], i_idx[j])].mean())
  alpha = (1 - confidence) / 2
  return np.quantile(out, [alpha, 1 - alpha])


def test_paired_bootstrap_equals_explicit_resampling():
  rng = np.random.default_rng(5)
  a = (rng.random((4, 30)) < 0.4) * 100.0      # exact match per item, 4 seeds, 30 items
  b = (rng.random((4, 30)) < 0.3) * 100.0
  got = stats.paired_bootstrap(a, b, draws=2500, seed=3)
  low, high = _reference_bootstrap(a, b, 2500, 3)
  assert got.mean == pytest.approx((a - b).mean(), abs=1e-12)
  assert (got.ci_low, got.ci_high) == pytest.approx((low, high), abs=1e-9)
  assert got.draws == 2500 and got.seed == 3
  again = stats.paired_bootstrap(a, b, draws=2500, seed=3)
  assert (again.ci_low, again.ci_high) == (got.ci_low, got.ci_high)   # fixed RNG


def test_paired_bootstrap_one_seed_is_the_item_bootstrap_of_scipy():
  rng = np.random.default_rng(11)
  a = rng.normal(1.0, 2.0, size=80)
  b = a - rng.normal(0.5, 1.0, size=80)
  got = stats.paired_bootstrap(a[None], b[None], draws=10000, seed=0)
  ref = sps.bootstrap((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True,
                      method="percentile", n_resamples=10000, random_state=1)
  width = ref.confidence_interval.high - ref.confidence_interval.low
  assert abs(got.ci_low - ref.confidence_interval.low) < 0.05 * width
  assert abs(got.ci_high - ref.confidence_interval.high) < 0.05 * width


def test_paired_bootstrap_identical_runs_and_shape_errors():
  a = np.arange(12.0).reshape(3, 4)
  same = stats.paired_bootstrap(a, a, draws=100)
  assert same.mean == same.ci_low == same.ci_high == 0.0
  with pytest.raises(ValueError):
    stats.paired_bootstrap(a, a[:, :3])
