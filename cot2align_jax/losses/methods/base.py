"""What every KD method shares: its declaration (`Method`), the loss settings (`KDConfig`), the
inputs of a step (`LossInputs`), its projectors and the objective (docs/method.md §4):

    loss = [(1 − λ)·CE_sum + λ·KD_sum] / N_tok  +  λ·OT_total          (λ = kd_rate)

CE_sum and KD_sum are summed over the student's main-view response tokens of the (global)
batch, N_tok is their number, OT_total comes from `ot.ot_view_terms`. SFT is CE_sum / N_tok.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cot2align_jax.core import spec
from cot2align_jax.core.numerics import F32, log_probs, masked_sum
from cot2align_jax.losses import vocab_chunk as vc
from cot2align_jax.losses.cross_tokenizer import KDSide
from cot2align_jax.losses.ot import OTConfig, ot_view_terms
from cot2align_jax.losses.ot_layers import ot_projectors, select_states
from cot2align_jax.losses.projectors import Projectors

DEFAULT_BASE = "dskd_cma"  # the base KD term of a composing method (cot2align) by default


@dataclasses.dataclass(frozen=True)
class KDConfig:
  """Loss settings shared by every method (the paper's values as defaults).

  method: a name in METHODS. base: the base KD term of a composing method (cot2align).
  kd_rate: λ. temperature: τ. divergence / divergence_params: D of the KD terms (e.g.
  ("srkl", (("lam", 0.1),))). ot: the OT block. method_params: (method name, its Params
  instance) pairs; read them with `params_of`. vocab_chunk: 0 = the models return full logits;
  C > 0 = every full-vocabulary term is computed from hidden states and LM heads in chunks of
  at most C vocabulary ids (losses/vocab_chunk.py; methods with `vocab_chunk=False` refuse it).
  """
  method: str = "cot2align"
  base: str = DEFAULT_BASE
  kd_rate: float = 0.5
  temperature: float = 2.0
  divergence: str = "fkl"
  divergence_params: tuple[tuple[str, float], ...] = ()
  ot: OTConfig = OTConfig()
  method_params: tuple[tuple[str, Any], ...] = ()
  vocab_chunk: int = 0

  def __post_init__(self):
    if self.vocab_chunk < 0:
      raise ValueError(f"vocab_chunk must be >= 0 (0 = off), got {self.vocab_chunk}")

  @property
  def div_params(self) -> dict:
    return dict(self.divergence_params)


class LossInputs(NamedTuple):
  """What a train step hands to the objective.

  batch: the core/spec.py batch. student / teacher: {"main": ModelOutput, "pair": ModelOutput
  or None}, each run with hidden_states="ends" (embedding output, final normed state), or "all"
  when the OT block compares other layers (`ot_layers.hidden_states_request`).
  *_embed [V, D] embedding tables and *_head [D, V] LM heads (`output_matrix()`), used by the
  DSKD family. vocab_map [Vt] int32: the MinED teacher->student map. student_lm /
  teacher_lm: how each model turns h·W into logits (softcap, valid rows), read by the chunked
  losses (KDConfig.vocab_chunk > 0, when the forwards return no logits).
  """
  batch: Mapping[str, jax.Array]
  student: Mapping[str, object]
  teacher: Mapping[str, object]
  student_embed: jax.Array | None = None
  student_head: jax.Array | None = None
  teacher_embed: jax.Array | None = None
  teacher_head: jax.Array | None = None
  vocab_map: jax.Array | None = None
  student_lm: vc.HeadSpec | None = None
  teacher_lm: vc.HeadSpec | None = None


TermFn = Callable[[LossInputs, "MethodProjectors", KDConfig], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Method:
  """A KD method and what it needs from the rest of the trainer.

  kd: its KD term fn(inputs, projectors, cfg) -> (KD_sum, logging parts), or None (SFT, or a
    composing method that takes `base`'s). ot: adds the OT block. projectors: DSKD projector
    names it trains. needs_teacher: runs the teacher forward. alignment: host-side alignment
    arrays the pipeline must build ("eta", "mined"). needs_vocab_map: the MinED teacher->student
    vocabulary map. same_vocab: teacher and student must share one vocabulary. uses_rationales:
    trains on CoT records with paired views. params: a frozen dataclass of its own settings
    (defaults = the paper's), or None. ot_settings: fn(cfg) -> the OTConfig of its OT block
    (None: cfg.ot); read it with `ot_config`. vocab_chunk: its KD term runs on chunked
    logits (KDConfig.vocab_chunk > 0); False for a term that needs the whole distribution
    at once (ULD's full sort).
  """
  name: str
  kd: TermFn | None
  ot: bool = False
  projectors: tuple[str, ...] = ()
  needs_teacher: bool = True
  alignment: tuple[str, ...] = ()
  needs_vocab_map: bool = False
  same_vocab: bool = False
  uses_rationales: bool = False
  params: type | None = None
  ot_settings: Callable[[KDConfig], OTConfig] | None = None
  vocab_chunk: bool = True

  @property
  def composes(self) -> bool:
    """A method without its own KD term that adds to another's (cot2align adds the OT block)."""
    return self.kd is None and self.needs_teacher


def params_of(cfg: KDConfig, method: Method) -> Any:
  """The Params instance of `method` in cfg.method_params; its defaults when absent (None for
  a method without parameters)."""
  given = dict(cfg.method_params).get(method.name)
  if given is not None:
    if method.params is not None and not isinstance(given, method.params):
      raise TypeError(f"kd.method_params[{method.name!r}] is a {type(given).__name__}, "
                      f"expected {method.params.__name__}")
    return given
  return None if method.params is None else method.params()


def ot_config(cfg: KDConfig, method: Method) -> OTConfig:
  """The settings of `method`'s OT block: method.ot_settings(cfg), or cfg.ot."""
  return cfg.ot if method.ot_settings is None else method.ot_settings(cfg)


# --------------------------------------------------------------------------------------------
# Registry helpers
# --------------------------------------------------------------------------------------------


def registry(*methods: Method) -> dict[str, Method]:
  """{name: method} in the given order; names must be unique."""
  out: dict[str, Method] = {}
  for m in methods:
    if m.name in out:
      raise ValueError(f"method {m.name!r} registered twice")
    out[m.name] = m
  return out


def compose(outer: Method, base: Method) -> Method:
  """`base`'s KD term and requirements plus those of `outer` (a composing method)."""
  if base.kd is None or base.ot:
    raise ValueError(f"{outer.name} needs a base KD method, got {base.name!r}")
  return dataclasses.replace(
      base, name=f"{outer.name}[{base.name}]", ot=base.ot or outer.ot,
      projectors=base.projectors + tuple(p for p in outer.projectors
                                         if p not in base.projectors),
      alignment=base.alignment + tuple(a for a in outer.alignment if a not in base.alignment),
      needs_vocab_map=base.needs_vocab_map or outer.needs_vocab_map,
      same_vocab=base.same_vocab or outer.same_vocab,
      uses_rationales=base.uses_rationales or outer.uses_rationales,
      ot_settings=outer.ot_settings)


def lookup(methods: Mapping[str, Method], name: str, base: str | None = None) -> Method:
  """methods[name]; a composing method is composed with methods[base] (default DEFAULT_BASE).
  Unknown names raise a ValueError listing the known ones."""
  if name not in methods:
    raise ValueError(f"unknown KD method {name!r}; known: {', '.join(sorted(methods))}")
  method = methods[name]
  if not method.composes:
    return method
  base_name = base or DEFAULT_BASE
  bases = [k for k, m in methods.items() if m.kd is not None and not m.ot]
  if base_name not in bases:
    raise ValueError(f"{name} needs a base KD method, got {base!r}; choose from "
                     f"{', '.join(bases)}")
  return compose(method, methods[base_name])


# --------------------------------------------------------------------------------------------
# Projectors and the objective
# --------------------------------------------------------------------------------------------


class MethodProjectors(nnx.Module):
  """The trainable projectors of a method: `kd` (DSKD family) and `ot` (OT block), or None."""

  def __init__(self, method: Method, d_student: int, d_teacher: int, *, rngs: nnx.Rngs,
               kd: KDConfig | None = None):
    self.kd = (Projectors.dskd(d_student, d_teacher, rngs=rngs, names=method.projectors)
               if method.projectors else None)
    ot = ot_config(kd or KDConfig(), method) if method.ot else None
    self.ot = (ot_projectors(d_teacher, d_student, rngs=rngs, layers=ot.layers,
                             weighting=ot.layer_weighting) if ot is not None else None)


def build_projectors(method: Method, d_student: int, d_teacher: int, *, rngs: nnx.Rngs,
                     kd: KDConfig | None = None) -> MethodProjectors:
  """kd: the KD config (default KDConfig(), the method's defaults); its OT layer weighting
  decides whether the OT set holds layer parameters besides the paper's single map."""
  return MethodProjectors(method, d_student, d_teacher, rngs=rngs, kd=kd)


def side(inputs: LossInputs, who: str) -> KDSide:
  """The main-view KDSide of "student" or "teacher"."""
  out = (inputs.student if who == "student" else inputs.teacher)["main"]
  b = inputs.batch
  return KDSide(
      logits=out.logits, hidden=out.hidden_states[-1],
      input_ids=b[spec.key("main", who, "input_ids")], labels=b[spec.key("main", who, "labels")],
      mask=b[spec.key("main", who, "loss_mask")],
      embed=inputs.student_embed if who == "student" else inputs.teacher_embed,
      head=inputs.student_head if who == "student" else inputs.teacher_head,
      lm=inputs.student_lm if who == "student" else inputs.teacher_lm)


def check_vocab_chunk(method: Method, cfg: KDConfig) -> None:
  """ValueError (one line) if cfg.vocab_chunk > 0 and the method's KD term cannot be chunked."""
  if cfg.vocab_chunk > 0 and not method.vocab_chunk:
    raise ValueError(f"kd.vocab_chunk={cfg.vocab_chunk} is not supported by {method.name}: its "
                     "KD term needs the whole distribution at once (docs/losses.md, Vocabulary "
                     "chunking); set kd.vocab_chunk=0")


def cross_entropy_sum(logits: jax.Array, labels: jax.Array, mask: jax.Array):
  """Σ over mask of −log softmax(logits)[label] (float32): logits [B, L, V], labels/mask [B, L].
  Returns (sum, count)."""
  logp = log_probs(logits, 1.0)
  nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return masked_sum(nll, mask)


def objective(method: Method, cfg: KDConfig, inputs: LossInputs,
              projectors: MethodProjectors | None) -> tuple[jax.Array, dict]:
  """The training loss of `method` and its metrics as {name: (sum, count)} float32 pairs.

  Returns (loss scalar float32, metrics) with metrics "ce", "kd" (per response token), each OT
  term "ot/{term}/{layer}" and "ot/total" (per batch), "loss", and the KD term's parts.
  """
  b = inputs.batch
  student = inputs.student["main"]
  labels, mask = b[spec.key("main", "student", "labels")], b[spec.key("main", "student",
                                                                      "loss_mask")]
  if cfg.vocab_chunk > 0:
    check_vocab_chunk(method, cfg)
    lg = vc.side_logits(student.hidden_states[-1], inputs.student_head, inputs.student_lm)
    ce_sum, n_tok = masked_sum(vc.cross_entropy(lg, labels, cfg.vocab_chunk), mask)
  else:
    ce_sum, n_tok = cross_entropy_sum(student.logits, labels, mask)
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
    views, ot_cfg = ("main", "pair"), ot_config(cfg, method)
    ot = ot_view_terms(select_states(inputs.student, views, "student", ot_cfg.layers),
                       select_states(inputs.teacher, views, "teacher", ot_cfg.layers), b,
                       projectors.ot, ot_cfg)
    batch_size = jnp.asarray(b["has_pair"].shape[0], F32)
    metrics.update({k: (v * batch_size, batch_size) for k, v in ot.items()})
    loss = loss + lam * ot["ot/total"]
  metrics["loss"] = (loss, jnp.ones((), F32))
  return loss, metrics
