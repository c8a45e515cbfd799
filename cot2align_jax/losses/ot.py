"""Entropic optimal transport between hidden-state sequences and the CoT2Align OT terms
(docs/method.md §4).

One OT problem per sequence pair: X [n, dS] (student states at response positions), Y [m, dS]
(teacher states projected to dS), uniform marginals on the valid positions, a fixed number of
Sinkhorn iterations, and the value is the transport cost <P, C> (by default; not the entropic
objective).
ott's Gibbs kernel is exp(−C/ε): the reference's exp(−0.1·C) is ε = 10. Everything runs in
float32. The solver is ott-jax Sinkhorn (log domain, fixed-length scan); `OTConfig` carries
every solver setting straight to `sinkhorn_plan`, among them

  grad "envelope": value = Σ sg(P)·C (Danskin; the solver is never differentiated);
       "unrolled": backpropagation through every iteration.

Beyond the paper (each an `OTConfig` field whose default is the paper's setting; docs/losses.md,
"OT that aligns"): ε relative to the cost's scale over the valid pairs and an ε schedule within
one solve, the entropic value, the debiased Sinkhorn divergence, unbalanced marginals (per term
kind), intermediate layers and learned layer weights (losses/ot_layers.py).

A side without valid positions gives 0 with a zero gradient. Design notes: docs/losses.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Mapping

import jax
import jax.numpy as jnp
from ott.geometry import epsilon_scheduler
from ott.geometry import geometry as ott_geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn as ott_sinkhorn

from cot2align_jax.core import spec
from cot2align_jax.core.numerics import F32
from cot2align_jax.losses import ot_layers
from cot2align_jax.losses.projectors import Projectors

CostKind = Literal["attention", "cosine", "euclidean"]
GradKind = Literal["envelope", "unrolled"]
RelativeEpsilon = Literal["none", "mean", "std"]
ValueKind = Literal["transport", "entropic"]
RELATIVE_EPSILONS = ("none", "mean", "std")
VALUES = ("transport", "entropic")

_NORM_FLOOR = 1e-8  # smallest vector norm used by the cosine cost
_NEG_LARGE = -1e30  # logit of masked teacher positions in the attention cost
_SCALE_FLOOR = 1e-6  # a cost scale <= this × max |C| (constant cost, empty side) counts as 1

LAYERS = ("embed", "final")  # layer 0 (embedding output) and L (final normed hidden state)
TERMS = ("same", "cross_a", "cross_b")
# term -> (student view, teacher view)
TERM_VIEWS = {"same": ("main", "main"), "cross_a": ("pair", "main"),
              "cross_b": ("main", "pair")}


@dataclasses.dataclass(frozen=True)
class OTConfig:
  """Settings of the OT block and its solver; the paper's values are the defaults.

  cost: one of COSTS. epsilon: ott's ε (kernel exp(−C/ε)). num_iters: Sinkhorn iterations
  (fixed). grad: see the module docstring. lse_mode: ott in log domain (False = kernel mode;
  no faster in ott 0.6, NaN unrolled gradients with padding).
  ot_term_scale: the factor of each term (the reference's 1/4); a term is
    ot_term_scale · (1/B) · Σ_b OT_b over the full batch (rows without a pair count 0 in the
    cross terms). terms: which of TERMS take part. layers: the depths compared, names of
    losses/ot_layers.py ("embed", "final", "mid", "s<i>:t<j>").

  Beyond the paper (the defaults switch each off):
  relative_epsilon: "none" (ε = epsilon), "mean" or "std": ε = epsilon × that statistic of the
    cost matrix over the valid (i, j) pairs (stop-gradient; ott's `relative_epsilon`, computed
    without padding). The self terms of the debiased value reuse the cross problem's ε.
  epsilon_init / epsilon_decay: ott's ε schedule within one solve, ε_t = ε·max(init·decay^t, 1)
    at iteration t (1 / 1: constant ε). The plan is read at ε, so the schedule must reach ε
    within the first half of the iterations (init·decay^(num_iters/2) <= 1, else ValueError).
  value: "transport" (<P, C>) or "entropic" (<P, C> + ε·KL(P‖a⊗b) + ρ_a·KL(P1‖a) +
    ρ_b·KL(Pᵀ1‖b), ott's `kl_reg_cost`; ρ = ε·τ/(1 − τ), the marginal terms only when τ < 1).
  debiased: the Sinkhorn divergence OT(x, y) − ½·OT(x, x) − ½·OT(y, y) of `value`.
  tau_same: ott's τ of both marginals of the same term (1 = balanced; ρ = ε·τ/(1 − τ)).
  tau_cross_cot / tau_cross_plain: τ of the cross terms' CoT side (the main view of a paired
    row: rationale + answer) and plain side (the pair view).
  layer_weighting: "fixed", "learned" or "uncertainty" (losses/ot_layers.py).
  """
  cost: CostKind = "attention"
  epsilon: float = 10.0
  num_iters: int = 100
  grad: GradKind = "envelope"
  lse_mode: bool = True
  ot_term_scale: float = 0.25
  terms: tuple[str, ...] = TERMS
  layers: tuple[str, ...] = LAYERS
  relative_epsilon: RelativeEpsilon = "none"
  epsilon_init: float = 1.0
  epsilon_decay: float = 1.0
  value: ValueKind = "transport"
  debiased: bool = False
  tau_same: float = 1.0
  tau_cross_cot: float = 1.0
  tau_cross_plain: float = 1.0
  layer_weighting: ot_layers.Weighting = "fixed"

  def __post_init__(self):
    if self.cost not in COSTS:
      raise ValueError(f"unknown OT cost {self.cost!r}; known: {', '.join(COSTS)}")
    if self.grad not in ("envelope", "unrolled"):
      raise ValueError(f"unknown OT gradient {self.grad!r}; known: envelope, unrolled")
    if self.grad == "unrolled" and not self.lse_mode:
      raise ValueError("ott kernel mode (lse_mode=False) has NaN unrolled gradients with "
                       "zero-weight padding (log of a zero scaling); use lse_mode=True")
    for t in self.terms:
      if t not in TERMS:
        raise ValueError(f"unknown OT term {t!r}; known: {', '.join(TERMS)}")
    for l in self.layers:
      ot_layers.check_layer(l)
    if len(set(self.layers)) != len(self.layers):
      raise ValueError(f"OT layers repeat: {self.layers}")
    if self.relative_epsilon not in RELATIVE_EPSILONS:
      raise ValueError(f"unknown relative_epsilon {self.relative_epsilon!r}; known: "
                       f"{', '.join(RELATIVE_EPSILONS)}")
    if not self.epsilon > 0:
      raise ValueError(f"OT epsilon must be > 0, got {self.epsilon}")
    if not (self.epsilon_init >= 1.0 and 0.0 < self.epsilon_decay <= 1.0):
      raise ValueError(f"OT epsilon schedule needs epsilon_init >= 1 and 0 < epsilon_decay <= 1"
                       f", got {self.epsilon_init}, {self.epsilon_decay}")
    if self.scheduled and self.epsilon_init * self.epsilon_decay**(self.num_iters / 2) > 1.0:
      raise ValueError(f"OT epsilon schedule (init {self.epsilon_init}, decay "
                       f"{self.epsilon_decay}) does not reach epsilon within half of the "
                       f"{self.num_iters} iterations; lower epsilon_init or epsilon_decay")
    if self.value not in VALUES:
      raise ValueError(f"unknown OT value {self.value!r}; known: {', '.join(VALUES)}")
    for name in ("tau_same", "tau_cross_cot", "tau_cross_plain"):
      if not 0.0 < getattr(self, name) <= 1.0:
        raise ValueError(f"OT {name} must be in (0, 1], got {getattr(self, name)}")
    if self.layer_weighting not in ot_layers.WEIGHTINGS:
      raise ValueError(f"unknown OT layer weighting {self.layer_weighting!r}; known: "
                       f"{', '.join(ot_layers.WEIGHTINGS)}")

  @property
  def scheduled(self) -> bool:
    """Whether ε follows a schedule within a solve (epsilon_init > 1 and epsilon_decay < 1)."""
    return self.epsilon_init > 1.0 and self.epsilon_decay < 1.0

  def term_taus(self, term: str) -> tuple[float, float]:
    """(τ of the student marginal, τ of the teacher marginal) of a term of TERMS."""
    if term == "same":
      return self.tau_same, self.tau_same
    cot, plain = self.tau_cross_cot, self.tau_cross_plain
    # cross A: student plain (pair view) vs teacher CoT (main); cross B the other way round
    return (plain, cot) if term == "cross_a" else (cot, plain)


# --------------------------------------------------------------------------------------------
# Cost matrices (one example; vmapped by the callers)
# --------------------------------------------------------------------------------------------


def attention_cost(x: jax.Array, y: jax.Array, y_mask: jax.Array) -> jax.Array:
  """C_ij = 1 - softmax_j(x_i . y_j / sqrt(d)) over the valid teacher positions.

  x [n, d], y [m, d] float32, y_mask [m] (nonzero = valid) -> C [n, m] float32. Masked columns
  get probability 0 (cost 1); with no valid column every row is uniform (finite, unused).
  """
  logits = x @ y.T / math.sqrt(x.shape[-1])
  valid = (y_mask > 0)[None, :]
  probs = jax.nn.softmax(jnp.where(valid, logits, _NEG_LARGE), axis=-1)
  return 1.0 - jnp.where(valid, probs, 0.0)


def _safe_unit(v: jax.Array) -> jax.Array:
  """Rows of v [k, d] divided by max(||v||, 1e-8); zero rows stay zero with zero gradient."""
  sq = jnp.sum(v * v, axis=-1, keepdims=True)
  return v / jnp.sqrt(jnp.maximum(sq, _NORM_FLOOR**2))


def cosine_cost(x: jax.Array, y: jax.Array, y_mask: jax.Array) -> jax.Array:
  """C_ij = 1 - cos(x_i, y_j); x [n, d], y [m, d] -> [n, m]. Zero vectors give cost 1, no NaN."""
  del y_mask
  return 1.0 - _safe_unit(x) @ _safe_unit(y).T


def euclidean_cost(x: jax.Array, y: jax.Array, y_mask: jax.Array) -> jax.Array:
  """C_ij = ||x_i - y_j||; x [n, d], y [m, d] -> [n, m].

  Built from the Gram matrix (no [n, m, d] tensor); the square root is NaN-safe at 0 (the
  gradient there is 0, the subgradient of the norm at a coincident pair).
  """
  del y_mask
  sq = (jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2.0 * (x @ y.T))
  positive = sq > 1e-12
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


COSTS = {"attention": attention_cost, "cosine": cosine_cost, "euclidean": euclidean_cost}


def cost_matrix(x: jax.Array, y: jax.Array, y_mask: jax.Array, kind: CostKind) -> jax.Array:
  """Cost [n, m] float32 of one example (x [n, d], y [m, d], y_mask [m]); see `COSTS`."""
  if kind not in COSTS:
    raise ValueError(f"unknown OT cost {kind!r}; known: {', '.join(COSTS)}")
  return COSTS[kind](x.astype(F32), y.astype(F32), y_mask)


# --------------------------------------------------------------------------------------------
# Marginals and the solver (one example)
# --------------------------------------------------------------------------------------------


def uniform_marginal(mask: jax.Array) -> jax.Array:
  """mask [k] -> weights [k] float32: 1/n_valid on valid positions, 0 elsewhere (0 if none)."""
  valid = (mask > 0).astype(F32)
  return valid / jnp.maximum(jnp.sum(valid), 1.0)


def cost_scale(c: jax.Array, x_mask: jax.Array, y_mask: jax.Array, kind: str) -> jax.Array:
  """() float32, stop-gradient: the "mean" or "std" (population) of c [n, m] over the valid
  pairs (x_mask [n] × y_mask [m]); 1 when that is <= 1e-6 × max |c| over them (no valid pair,
  a constant cost up to float32 rounding)."""
  c = jax.lax.stop_gradient(c.astype(F32))
  w = (x_mask > 0).astype(F32)[:, None] * (y_mask > 0).astype(F32)[None, :]
  count = jnp.maximum(jnp.sum(w), 1.0)
  mean = jnp.sum(w * c) / count
  if kind == "mean":
    scale = mean
  elif kind == "std":
    scale = jnp.sqrt(jnp.sum(w * jnp.square(c - mean)) / count)
  else:
    raise ValueError(f"unknown cost scale {kind!r}; known: mean, std")
  floor = _SCALE_FLOOR * jnp.max(jnp.abs(w * c))
  return jnp.where(scale > floor, scale, 1.0)


def resolve_epsilon(c: jax.Array, x_mask: jax.Array, y_mask: jax.Array,
                    cfg: OTConfig) -> float | jax.Array:
  """The target ε of one problem: cfg.epsilon (a Python float, the paper's path) or, with
  cfg.relative_epsilon, cfg.epsilon × `cost_scale` over the valid pairs (a () array)."""
  if cfg.relative_epsilon == "none":
    return cfg.epsilon
  return cfg.epsilon * cost_scale(c, x_mask, y_mask, cfg.relative_epsilon)


def sinkhorn_plan(c: jax.Array, a: jax.Array, b: jax.Array,
                  cfg: OTConfig = OTConfig(), *, epsilon: float | jax.Array | None = None,
                  tau_a: float = 1.0, tau_b: float = 1.0) -> jax.Array:
  """Entropic OT plan P [n, m] float32 for cost c [n, m] and marginals a [n], b [m].

  epsilon: the target ε (default: `resolve_epsilon` over the pairs with a, b > 0). tau_a /
  tau_b: ott's marginal relaxations (1 = balanced).

  ott-jax Sinkhorn with the ε given explicitly (never ott's default, which scales with the
  padded cost), a fixed-length scan (min_iterations == max_iterations: `threshold` is never
  consulted), no implicit differentiation, inner_iterations = 1 (halves the unrolled backward,
  measured on CPU). ott updates the column potential before the row potential in each
  iteration.
  """
  if epsilon is None:
    epsilon = resolve_epsilon(c, a, b, cfg)
  eps = (epsilon_scheduler.Epsilon(epsilon, init=cfg.epsilon_init, decay=cfg.epsilon_decay)
         if cfg.scheduled else epsilon)
  geom = ott_geometry.Geometry(cost_matrix=c, epsilon=eps)
  prob = linear_problem.LinearProblem(geom, a=a, b=b, tau_a=tau_a, tau_b=tau_b)
  solver = ott_sinkhorn.Sinkhorn(lse_mode=cfg.lse_mode, min_iterations=cfg.num_iters,
                                 max_iterations=cfg.num_iters, inner_iterations=1,
                                 implicit_diff=None)
  return solver(prob).matrix


def _generalised_kl(p: jax.Array, q: jax.Array) -> jax.Array:
  """Σ p·log(p/q) − p + q over the entries (p, q >= 0; 0·log 0 = 0), NaN-free gradients."""
  pos = jnp.logical_and(p > 0, q > 0)
  ratio = jnp.where(pos, p, 1.0) / jnp.where(pos, q, 1.0)
  return jnp.sum(jnp.where(pos, p * jnp.log(ratio), 0.0)) - jnp.sum(p) + jnp.sum(q)


def entropic_terms(plan: jax.Array, a: jax.Array, b: jax.Array, epsilon: float | jax.Array,
                   tau_a: float = 1.0, tau_b: float = 1.0) -> jax.Array:
  """() float32: ε·KL(P‖a⊗b) + ρ_a·KL(P1‖a) + ρ_b·KL(Pᵀ1‖b) (generalised KL; a marginal term
  only when its τ < 1, ρ = ε·τ/(1 − τ)); plan [n, m], a [n], b [m]. The entropic value is
  <P, C> plus this."""
  out = epsilon * _generalised_kl(plan, a[:, None] * b[None, :])
  if tau_a < 1.0:
    out = out + epsilon * tau_a / (1.0 - tau_a) * _generalised_kl(jnp.sum(plan, axis=1), a)
  if tau_b < 1.0:
    out = out + epsilon * tau_b / (1.0 - tau_b) * _generalised_kl(jnp.sum(plan, axis=0), b)
  return out


def sinkhorn_value(c: jax.Array, x_mask: jax.Array, y_mask: jax.Array,
                   cfg: OTConfig = OTConfig(), *, epsilon: float | jax.Array | None = None,
                   tau_a: float = 1.0, tau_b: float = 1.0) -> jax.Array:
  """OT value () float32 of one problem: cost c [n, m], x_mask [n], y_mask [m].

  cfg.value "transport": <P, C>; "entropic": <P, C> + `entropic_terms`. Uniform marginals on the
  valid positions; epsilon: the target ε (default `resolve_epsilon`); tau_a / tau_b: marginal
  relaxations. 0 (zero gradient) when a side is empty. Not debiased (see `sinkhorn_ot`).
  """
  c = c.astype(F32)
  a, b = uniform_marginal(x_mask), uniform_marginal(y_mask)
  nonempty = jnp.logical_and(jnp.sum(a) > 0, jnp.sum(b) > 0)
  if epsilon is None:
    epsilon = resolve_epsilon(c, x_mask, y_mask, cfg)
  # Dummy uniform marginals keep the solver finite on an empty side; the result is masked out.
  a = jnp.where(nonempty, a, 1.0 / a.shape[0])
  b = jnp.where(nonempty, b, 1.0 / b.shape[0])
  envelope = cfg.grad == "envelope"
  plan = sinkhorn_plan(jax.lax.stop_gradient(c) if envelope else c, a, b, cfg,
                       epsilon=epsilon, tau_a=tau_a, tau_b=tau_b)
  if envelope:
    plan = jax.lax.stop_gradient(plan)
  value = jnp.sum(plan * c)
  if cfg.value == "entropic":
    value = value + entropic_terms(plan, a, b, epsilon, tau_a, tau_b)
  return jnp.where(nonempty, value, 0.0)


def sinkhorn_ot(x: jax.Array, y: jax.Array, x_mask: jax.Array, y_mask: jax.Array,
                cfg: OTConfig | None = None, *, tau_a: float = 1.0, tau_b: float = 1.0,
                **overrides) -> jax.Array:
  """Per-sequence OT value: x [B, n, d], y [B, m, d], masks [B, n] / [B, m] -> [B] float32.

  The value of `sinkhorn_value` (0 where a side has no valid position) on the cost of
  cfg.cost; with cfg.debiased, OT(x, y) − ½·OT(x, x) − ½·OT(y, y): the self terms use the same
  cost function, the cross problem's ε, and τ of their side on both marginals (tau_a for x,
  tau_b for y). cfg: the OTConfig (default OTConfig()); `overrides` replace some of its fields
  (e.g. cost="cosine"). Vmapped over B.
  """
  cfg = dataclasses.replace(cfg or OTConfig(), **overrides) if overrides else (cfg or OTConfig())
  if x.shape[-1] != y.shape[-1]:
    raise ValueError(f"OT needs equal feature sizes, got {x.shape[-1]} and {y.shape[-1]}")

  def one(xi, yi, xm, ym):
    c = cost_matrix(xi, yi, ym, cfg.cost)
    eps = resolve_epsilon(c, xm, ym, cfg)
    value = sinkhorn_value(c, xm, ym, cfg, epsilon=eps, tau_a=tau_a, tau_b=tau_b)
    if not cfg.debiased:
      return value
    self_x = sinkhorn_value(cost_matrix(xi, xi, xm, cfg.cost), xm, xm, cfg, epsilon=eps,
                            tau_a=tau_a, tau_b=tau_a)
    self_y = sinkhorn_value(cost_matrix(yi, yi, ym, cfg.cost), ym, ym, cfg, epsilon=eps,
                            tau_a=tau_b, tau_b=tau_b)
    both = jnp.logical_and(jnp.any(xm > 0), jnp.any(ym > 0))
    return jnp.where(both, value - 0.5 * (self_x + self_y), 0.0)

  return jax.vmap(one)(x, y, x_mask, y_mask)


def plan_peak(plan: jax.Array, x_mask: jax.Array, y_mask: jax.Array) -> jax.Array:
  """How far a plan is from uniform: max over the valid (i, j) of P_ij·n·m, () float32 (n, m:
  the valid counts of x_mask [n], y_mask [m]; plan [n, m]). 1 for the uniform coupling a⊗b;
  a balanced plan reaches at most min(n, m) (P_ij <= min(1/n, 1/m)); 0 when a side is empty.
  Batch it with jax.vmap."""
  xv, yv = (x_mask > 0).astype(F32), (y_mask > 0).astype(F32)
  valid = xv[:, None] * yv[None, :]
  scaled = jnp.where(valid > 0, plan.astype(F32), 0.0) * jnp.sum(xv) * jnp.sum(yv)
  return jnp.max(scaled)


# --------------------------------------------------------------------------------------------
# The CoT2Align OT terms
# --------------------------------------------------------------------------------------------


def ot_view_terms(student_states: Mapping[str, Mapping[str, jax.Array]],
                  teacher_states: Mapping[str, Mapping[str, jax.Array]],
                  batch: Mapping[str, jax.Array], projector: Projectors,
                  cfg: OTConfig = OTConfig()) -> dict[str, jax.Array]:
  """The OT part of the CoT2Align objective (docs/method.md §4), before the λ weight.

  student_states[view][layer]: [B, Ls_view, d_S]; teacher_states[view][layer]: [B, Lt_view, d_T]
  for view in {"main", "pair"} ("pair" only needed when a cross term is on) and layer in
  `cfg.layers`. `batch` supplies the response masks `{view}/{side}/loss_mask` and `has_pair` [B]
  (core/spec.py). The teacher states of every (view, layer) go through the same `projector`
  (`Projectors.ot`, d_T -> d_S, or `ot_layers.OTProjectors` for learned layer weights), once
  each.

  Returns {"ot/{term}/{layer}": () float32 for each enabled pair, "ot/total"}. Each term =
  cfg.ot_term_scale · mean over the B rows of the per-sequence OT value (`sinkhorn_ot` with the
  term's τ, `OTConfig.term_taus`); cross terms are multiplied by has_pair (rows without a pair
  contribute exactly 0). "ot/total" is their sum ("fixed" layer weights) or the weighted
  combination of the per-layer sums (`ot_layers.combine_layers`), whose weights are then also
  returned as "ot/weight/{layer}".
  """
  has_pair = batch["has_pair"].astype(F32)
  masks = {(v, s): batch[spec.key(v, s, "loss_mask")]
           for v, s in {(TERM_VIEWS[t][0], "student") for t in cfg.terms} |
           {(TERM_VIEWS[t][1], "teacher") for t in cfg.terms}}
  projected: dict[tuple[str, str], jax.Array] = {}
  out: dict[str, jax.Array] = {}
  total = jnp.zeros((), F32)
  per_layer = []
  for layer in cfg.layers:
    layer_sum = jnp.zeros((), F32)
    for term in cfg.terms:
      s_view, t_view = TERM_VIEWS[term]
      if (t_view, layer) not in projected:
        projected[(t_view, layer)] = projector(teacher_states[t_view][layer])
      operands = (student_states[s_view][layer], projected[(t_view, layer)],
                  masks[(s_view, "student")], masks[(t_view, "teacher")])
      tau_a, tau_b = cfg.term_taus(term)
      if term == "same":
        per_seq = sinkhorn_ot(*operands, cfg, tau_a=tau_a, tau_b=tau_b)
      else:  # a batch without pairs (data.group_by_pair) skips the solver entirely
        per_seq = jax.lax.cond(
            jnp.any(has_pair > 0),
            lambda *o: sinkhorn_ot(*o, cfg, tau_a=tau_a, tau_b=tau_b) * has_pair,
            lambda *o: jnp.zeros_like(has_pair), *operands)
      value = cfg.ot_term_scale * jnp.mean(per_seq)
      out[f"ot/{term}/{layer}"] = value
      total = total + value
      layer_sum = layer_sum + value
    per_layer.append(layer_sum)
  if cfg.layer_weighting != "fixed":
    params = getattr(projector, "layer_params", None)
    total, weights = ot_layers.combine_layers(
        jnp.stack(per_layer), cfg.layer_weighting, None if params is None else params[...])
    out.update({f"ot/weight/{layer}": weights[i] for i, layer in enumerate(cfg.layers)})
  out["ot/total"] = total
  return out
