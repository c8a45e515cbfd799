"""The registry of KD methods: each is a named composition of loss terms (METHOD.md §4, §7, §8).

    method = get_method("cot2align")          # unknown names list the known ones
    projectors = build_projectors(method, cfg, d_student, d_teacher, rngs=nnx.Rngs(0))
    loss, metrics = objective(method, cfg, inputs, projectors)

A method says which base KD term it uses on the main view (none for SFT), whether it adds the
CoT2Align OT block, and which trainable projectors it needs. The objective is the same for all:

    loss = [(1 − λ)·CE_sum + λ·KD_sum] / N_tok  +  λ·OT_total          (λ = kd_rate)

with CE_sum and KD_sum summed over the student's main-view response tokens of the (global) batch,
N_tok their number, and OT_total from `ot.ot_view_terms` (per-sequence means, ot_term_scale).
SFT is CE_sum / N_tok. Adding a method = a term function in its own file + one line in
`METHODS` + a test file.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cot2align_jax.data import spec
from cot2align_jax.losses import cross_tokenizer as xt
from cot2align_jax.losses import divergences as dv
from cot2align_jax.losses.ot import LAYERS, OTConfig, OTProjector, ot_view_terms
from cot2align_jax.losses.projectors import Projectors

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KDConfig:
  """Loss settings shared by every method (the paper's values as defaults).

  method: a name in METHODS. base: the base KD term of `cot2align` (a METHODS name with a KD
  term). kd_rate: λ. temperature: τ. divergence / divergence_params: D of the KD terms (e.g.
  ("srkl", (("lam", 0.1),)) for the skewed RKL). ot: the OT block of `cot2align`.
  """
  method: str = "cot2align"
  base: str = "dskd_cma"
  kd_rate: float = 0.5
  temperature: float = 2.0
  divergence: str = "fkl"
  divergence_params: tuple[tuple[str, float], ...] = ()
  ot: OTConfig = OTConfig()

  @property
  def div_params(self) -> dict:
    return dict(self.divergence_params)


class LossInputs(NamedTuple):
  """What a train step hands to the objective.

  batch: the data/spec.py batch. student / teacher: {"main": ModelOutput, "pair": ModelOutput
  or None}, each run with hidden_states="ends" (embedding output, final normed state).
  *_embed [V, D] embedding tables and *_head [D, V] LM heads (`output_matrix()`), used by the
  DSKD family. vocab_map [Vt] int32: the MinED teacher->student map (mined only).
  """
  batch: Mapping[str, jax.Array]
  student: Mapping[str, object]
  teacher: Mapping[str, object]
  student_embed: jax.Array | None = None
  student_head: jax.Array | None = None
  teacher_embed: jax.Array | None = None
  teacher_head: jax.Array | None = None
  vocab_map: jax.Array | None = None


TermFn = Callable[[LossInputs, "MethodProjectors", KDConfig], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Method:
  """kd: the base KD term (returns KD_sum and logging parts) or None; ot: adds the OT block;
  projectors: DSKD projector names it trains; needs_teacher / needs_pair: forwards required."""
  name: str
  kd: TermFn | None
  ot: bool = False
  projectors: tuple[str, ...] = ()
  needs_teacher: bool = True


def _side(inputs: LossInputs, who: str) -> xt.KDSide:
  out = (inputs.student if who == "student" else inputs.teacher)["main"]
  b = inputs.batch
  return xt.KDSide(
      logits=out.logits, hidden=out.hidden_states[-1],
      input_ids=b[spec.key("main", who, "input_ids")], labels=b[spec.key("main", who, "labels")],
      mask=b[spec.key("main", who, "loss_mask")],
      embed=inputs.student_embed if who == "student" else inputs.teacher_embed,
      head=inputs.student_head if who == "student" else inputs.teacher_head)


def _kd_term(inputs, projectors, cfg):
  s, t = _side(inputs, "student"), _side(inputs, "teacher")
  total, _ = dv.kd_loss(cfg.divergence, s.logits, t.logits, s.mask,
                        temperature=cfg.temperature, **cfg.div_params)
  return total, {}


def _uld_term(inputs, projectors, cfg):
  s, t = _side(inputs, "student"), _side(inputs, "teacher")
  total, _ = xt.uld_loss(s.logits, t.logits, s.mask, t.mask, temperature=cfg.temperature)
  return total, {}


def _mined_term(inputs, projectors, cfg):
  if inputs.vocab_map is None:
    raise ValueError("method 'mined' needs the MinED vocabulary map (LossInputs.vocab_map)")
  s, t = _side(inputs, "student"), _side(inputs, "teacher")
  b = inputs.batch
  total, _ = xt.mined_loss(s.logits, t.logits, s.labels, s.mask, t.labels,
                           b[spec.align_key("mined_pos")], b[spec.align_key("mined_mask")],
                           inputs.vocab_map, temperature=cfg.temperature,
                           divergence=cfg.divergence, **cfg.div_params)
  return total, {}


def _dskd_family(loss_fn, *extra_keys):
  def term(inputs, projectors, cfg):
    s, t = _side(inputs, "student"), _side(inputs, "teacher")
    extra = [inputs.batch[spec.align_key(k)] for k in extra_keys]
    total, _, parts = loss_fn(projectors.kd, s, t, *extra, divergence=cfg.divergence,
                              temperature=cfg.temperature, **cfg.div_params)
    return total, parts
  return term


def _multilevel_ot_term(inputs, projectors, cfg):
  s, t = _side(inputs, "student"), _side(inputs, "teacher")
  total, _, parts = xt.multilevel_ot_loss(s.logits, t.logits, s.mask, t.mask,
                                          temperature=cfg.temperature)
  return total, parts


METHODS: dict[str, Method] = {
    "sft": Method("sft", kd=None, needs_teacher=False),
    "kd": Method("kd", kd=_kd_term),
    "uld": Method("uld", kd=_uld_term),
    "mined": Method("mined", kd=_mined_term),
    "dskd": Method("dskd", kd=_dskd_family(xt.dskd_loss), projectors=("t2s", "s2t")),
    "dskd_cma": Method("dskd_cma", kd=_dskd_family(xt.dskd_cma_loss),
                       projectors=("query", "t2s", "s2t")),
    "dskd_eta": Method("dskd_eta", kd=_dskd_family(xt.dskd_eta_loss, "eta_pos", "eta_mask"),
                       projectors=("t2s", "s2t")),
    "multilevel_ot": Method("multilevel_ot", kd=_multilevel_ot_term),
}


def get_method(name: str, base: str | None = None) -> Method:
  """A registered method; "cot2align" = `base`'s KD term (default dskd_cma) + the OT block."""
  if name == "cot2align":
    base_method = get_method(base or "dskd_cma")
    if base_method.kd is None or base_method.ot:
      raise ValueError(f"cot2align needs a base KD method, got {base!r}; choose from "
                       f"{', '.join(k for k, m in METHODS.items() if m.kd is not None)}")
    return dataclasses.replace(base_method, name=f"cot2align[{base_method.name}]", ot=True)
  if name not in METHODS:
    raise ValueError(f"unknown KD method {name!r}; known: "
                     f"{', '.join(sorted([*METHODS, 'cot2align']))}")
  return METHODS[name]


def method_from_config(cfg: KDConfig) -> Method:
  return get_method(cfg.method, cfg.base)


class MethodProjectors(nnx.Module):
  """The trainable projectors of a method: `kd` (DSKD family) and `ot` (OT block), or None."""

  def __init__(self, method: Method, d_student: int, d_teacher: int, *, rngs: nnx.Rngs):
    self.kd = (Projectors(d_student, d_teacher, rngs=rngs, names=method.projectors)
               if method.projectors else None)
    self.ot = OTProjector(d_teacher, d_student, rngs=rngs) if method.ot else None


def build_projectors(method: Method, d_student: int, d_teacher: int, *,
                     rngs: nnx.Rngs) -> MethodProjectors:
  return MethodProjectors(method, d_student, d_teacher, rngs=rngs)


def cross_entropy_sum(logits: jax.Array, labels: jax.Array, mask: jax.Array):
  """Σ over mask of −log softmax(logits)[label] (float32): logits [B, L, V], labels/mask [B, L].
  Returns (sum, count)."""
  logp = dv.log_probs(logits, 1.0)
  nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return dv.masked_sum(nll, mask)


def _states(outputs: Mapping[str, object], views) -> dict:
  return {v: {LAYERS[0]: outputs[v].hidden_states[0], LAYERS[1]: outputs[v].hidden_states[-1]}
          for v in views if outputs.get(v) is not None}


def objective(method: Method, cfg: KDConfig, inputs: LossInputs,
              projectors: MethodProjectors | None) -> tuple[jax.Array, dict]:
  """The training loss of `method` and its metrics as {name: (sum, count)} float32 pairs.

  Returns (loss scalar float32, metrics) with metrics "ce", "kd" (per response token), each OT
  term "ot/{term}/{layer}" and "ot/total" (per batch), "loss", and the KD term's parts.
  """
  b = inputs.batch
  student = inputs.student["main"]
  ce_sum, n_tok = cross_entropy_sum(student.logits, b[spec.key("main", "student", "labels")],
                                    b[spec.key("main", "student", "loss_mask")])
  denom = jnp.maximum(n_tok, 1.0)
  metrics = {"ce": (ce_sum, n_tok)}
  if method.kd is None and not method.ot:
    loss = ce_sum / denom
    metrics["loss"] = (loss, jnp.ones((), F32))
    return loss, metrics
  lam = cfg.kd_rate
  kd_sum = jnp.zeros((), F32)
  if method.kd is not None:
    kd_sum, parts = method.kd(inputs, projectors, cfg)
    metrics["kd"] = (kd_sum, n_tok)
    metrics.update({f"kd/{k}": (v, jnp.ones((), F32)) for k, v in parts.items()})
  loss = ((1.0 - lam) * ce_sum + lam * kd_sum) / denom
  if method.ot:
    views = ("main", "pair")
    ot = ot_view_terms(_states(inputs.student, views), _states(inputs.teacher, views), b,
                       projectors.ot, cfg.ot)
    batch_size = jnp.asarray(b["has_pair"].shape[0], F32)
    metrics.update({k: (v * batch_size, batch_size) for k, v in ot.items()})
    loss = loss + lam * ot["ot/total"]
  metrics["loss"] = (loss, jnp.ones((), F32))
  return loss, metrics
