"""Statistics of a multi-seed experiment: pure functions of score arrays (no I/O, no JAX).

    s = summarize([20.5, 22.0, 19.5, 21.0, 23.5])         # mean, sample std, 95% t-interval
    d = paired_difference(run_scores, base_scores)          # per-seed differences, their t-CI
    b = paired_bootstrap(run_items, base_items, seed=0)     # [seeds, items] scores, percentile CI

Conventions: `std` is the sample standard deviation (ddof=1); the confidence interval of a mean
is Student's t-interval mean ± t_{1-α/2, n-1} · std / √n; with fewer than two values the std
and the interval are NaN. The paired bootstrap resamples seeds and test items with replacement
(a crossed design: one draw of item indices is used for every drawn seed, so it needs the same
number of items at every seed, paired by index between the two runs) and reports the
percentile interval of the mean difference.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
BOOTSTRAP_DRAWS = 10000
BOOTSTRAP_SEED = 0
_CHUNK = 1000   # bootstrap draws per vectorised block


@dataclasses.dataclass(frozen=True)
class Summary:
  """A mean over seeds with its spread and t-interval."""

  n: int
  mean: float
  std: float          # sample std (ddof=1); NaN for n < 2
  ci_low: float
  ci_high: float

  def to_json(self) -> dict:
    return {k: _finite_or_none(v) for k, v in dataclasses.asdict(self).items()}


def _finite_or_none(v):
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
  """Student's t-interval of the mean of `values` (NaN, NaN for fewer than two values)."""
  x = np.asarray(values, dtype=np.float64)
  n = x.size
  if n < 2:
    return float("nan"), float("nan")
  mean = float(x.mean())
  half = float(sps.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
  return mean - half, mean + half


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
  """n, mean, sample std and t-interval of per-seed scores."""
  x = np.asarray(values, dtype=np.float64)
  if x.size == 0:
    nan = float("nan")
    return Summary(0, nan, nan, nan, nan)
  std = float(x.std(ddof=1)) if x.size > 1 else float("nan")
  low, high = t_interval(x, confidence)
  return Summary(int(x.size), float(x.mean()), std, low, high)


def paired_difference(run: Sequence[float], baseline: Sequence[float],
                      confidence: float = CONFIDENCE) -> Summary:
  """Summary of the per-seed differences run[s] − baseline[s] (a paired t-interval)."""
  a, b = np.asarray(run, np.float64), np.asarray(baseline, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired scores need the same seeds: {a.shape} vs {b.shape}")
  return summarize(a - b, confidence)


@dataclasses.dataclass(frozen=True)
class Bootstrap:
  """The paired bootstrap of the mean difference over seeds × items."""

  mean: float          # the observed mean difference over all seeds and items
  ci_low: float
  ci_high: float
  draws: int
  seed: int

  def to_json(self) -> dict:
    return {k: _finite_or_none(v) for k, v in dataclasses.asdict(self).items()}


def bootstrap_indices(rng: np.random.Generator, n_seeds: int, n_items: int,
                      draws: int) -> tuple[np.ndarray, np.ndarray]:
  """(seed indices [draws, n_seeds], item indices [draws, n_items]) drawn with replacement:
  first all seed indices of the block, then all item indices (the order the reference test
  reproduces)."""
  return (rng.integers(0, n_seeds, size=(draws, n_seeds)),
          rng.integers(0, n_items, size=(draws, n_items)))


def paired_bootstrap(run_items: np.ndarray | Sequence[Sequence[float]],
                     baseline_items: np.ndarray | Sequence[Sequence[float]], *,
                     draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED,
                     confidence: float = CONFIDENCE) -> Bootstrap:
  """Percentile CI of mean(run − baseline) resampling seeds and items.

  run_items, baseline_items: [n_seeds, n_items] per-item scores, row s of both at the same seed,
  column i the same test item. Draw k picks n_seeds seed rows and n_items item columns with
  replacement (numpy Generator PCG64 with `seed`, blocks of 1000 draws, see bootstrap_indices)
  and takes the mean of the difference over that grid.
  """
  a = np.asarray(run_items, np.float64)
  b = np.asarray(baseline_items, np.float64)
  if a.ndim != 2 or a.shape != b.shape or a.size == 0:
    raise ValueError(f"paired_bootstrap needs two equal [seeds, items] arrays, got "
                     f"{a.shape} and {b.shape}")
  d = a - b
  n_seeds, n_items = d.shape
  rng = np.random.default_rng(seed)
  stats = np.empty(draws, np.float64)
  for start in range(0, draws, _CHUNK):
    k = min(_CHUNK, draws - start)
    s_idx, i_idx = bootstrap_indices(rng, n_seeds, n_items, k)
    # mean over the drawn grid = (seed counts) · d · (item counts) / (n_seeds n_items)
    w = np.zeros((k, n_seeds))
    np.add.at(w, (np.arange(k)[:, None], s_idx), 1.0)
    c = np.zeros((k, n_items))
    np.add.at(c, (np.arange(k)[:, None], i_idx), 1.0)
    stats[start:start + k] = np.einsum("ks,si,ki->k", w, d, c) / (n_seeds * n_items)
  alpha = (1.0 - confidence) / 2
  low, high = np.quantile(stats, [alpha, 1.0 - alpha])
  return Bootstrap(float(d.mean()), float(low), float(high), int(draws), int(seed))
