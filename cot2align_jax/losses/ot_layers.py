"""The depths the OT block compares, and their weights (docs/losses.md, "OT that aligns").

A layer of `OTConfig.layers` names one student depth and one teacher depth, as Hugging Face
hidden-state indices (0 = embedding output, L = final normed state, i = output of block i):

  "embed"       student 0 vs teacher 0 (the paper's layer 0)
  "final"       student L_S vs teacher L_T (the paper's layer L)
  "mid"         student ⌊L_S/2⌋ vs teacher ⌊L_T/2⌋ (the middle blocks, whatever the depths)
  "s<i>:t<j>"   student index i vs teacher index j; negative counts from the end (−1 = final)

"embed" and "final" need only the forwards' default hidden states ("ends"); any other layer
makes the forwards return all of them (`hidden_states_request`).

Layer weights (`OTConfig.layer_weighting`), with OT_l the sum of the enabled terms at layer l:
  "fixed"        Σ_l OT_l (the paper);
  "learned"      Σ_l w_l·OT_l, w = n_layers·softmax(θ), θ [n_layers] trainable (zeros: = fixed);
  "uncertainty"  Σ_l exp(−s_l)·OT_l + s_l, s = clip(θ, ±LOGVAR_BOUND) trainable log-variances
                 (Kendall et al. 2018; zeros: = fixed).
θ lives in the OT projector set (`OTProjectors.layer_params`), so it trains with proj_lr.
"""

from __future__ import annotations

import re
from typing import Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cot2align_jax.core.numerics import F32
from cot2align_jax.losses.projectors import Projectors

Weighting = Literal["fixed", "learned", "uncertainty"]
WEIGHTINGS = ("fixed", "learned", "uncertainty")
NAMED_LAYERS = ("embed", "final", "mid")
ENDS = ("embed", "final")  # the layers the default ("ends") hidden states cover
LOGVAR_BOUND = 5.0  # |s_l| <= 5: uncertainty weights exp(−s_l) stay in [e^−5, e^5]

_PAIR = re.compile(r"^s(-?\d+):t(-?\d+)$")


def check_layer(name: str) -> None:
  """Raises ValueError unless `name` is a layer name of the module docstring."""
  if name not in NAMED_LAYERS and _PAIR.match(name) is None:
    raise ValueError(f"unknown OT layer {name!r}; known: {', '.join(NAMED_LAYERS)} or "
                     f"'s<i>:t<j>' (student / teacher hidden-state indices)")


def hidden_states_request(layers: Sequence[str]) -> str:
  """The forwards' `hidden_states` argument for these OT layers: "ends" or "all"."""
  return "ends" if all(l in ENDS for l in layers) else "all"


def state_index(name: str, who: str, num_states: int) -> int:
  """Index into a forward's hidden_states tuple (num_states entries) of layer `name` for `who`
  ("student" or "teacher"). With the "ends" tuple (2 states) only embed / final exist."""
  if name == "embed":
    return 0
  if name == "final":
    return num_states - 1
  if num_states == 2:
    raise ValueError(f"OT layer {name!r} needs all hidden states (hidden_states='all'), the "
                     f"forward returned 2")
  if name == "mid":
    return (num_states - 1) // 2
  s, t = _PAIR.match(name).groups()
  i = int(s if who == "student" else t)
  if not -num_states <= i < num_states:
    raise ValueError(f"OT layer {name!r}: {who} hidden-state index {i} is out of range for a "
                     f"model with {num_states - 1} blocks")
  return i % num_states


def select_states(outputs: Mapping[str, object], views: Sequence[str], who: str,
                  layers: Sequence[str]) -> dict[str, dict[str, jax.Array]]:
  """{view: {layer: [B, L, d]}} from ModelOutputs (outputs[view].hidden_states), for the views
  present (not None) in `outputs`."""
  out = {}
  for v in views:
    if outputs.get(v) is None:
      continue
    states = outputs[v].hidden_states
    out[v] = {l: states[state_index(l, who, len(states))] for l in layers}
  return out


class OTProjectors(Projectors):
  """The OT block's map `linear` (as `Projectors.ot`) plus the trainable per-layer parameters
  `layer_params` [n_layers] float32 (zeros: the layer weights start equal to "fixed").

  Zero initialisation draws no key, so `linear` is initialised exactly as `Projectors.ot`.
  """

  def __init__(self, d_teacher: int, d_student: int, n_layers: int, *, rngs: nnx.Rngs):
    super().__init__({"linear": (d_teacher, d_student)}, rngs=rngs, init="lecun")
    self.layer_params = nnx.Param(jnp.zeros((n_layers,), F32))


def ot_projectors(d_teacher: int, d_student: int, *, rngs: nnx.Rngs,
                  layers: Sequence[str] = ENDS, weighting: str = "fixed") -> Projectors:
  """The OT projector set: `Projectors.ot` for "fixed" weights (the paper's parameters, nothing
  more), `OTProjectors` with one parameter per layer otherwise."""
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown OT layer weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")
  if weighting == "fixed":
    return Projectors.ot(d_teacher, d_student, rngs=rngs)
  return OTProjectors(d_teacher, d_student, len(layers), rngs=rngs)


def combine_layers(per_layer: jax.Array, weighting: str,
                   params: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(total () float32, weights [n_layers] float32) of per-layer OT values per_layer
  [n_layers] under `weighting` (module docstring); params [n_layers]: θ (unused by "fixed")."""
  per_layer = per_layer.astype(F32)
  n = per_layer.shape[0]
  if weighting == "fixed":
    return jnp.sum(per_layer), jnp.ones((n,), F32)
  if params is None:
    raise ValueError(f"OT layer weighting {weighting!r} needs the OT projector set built "
                     f"with the config (build_projectors(..., kd=kd_cfg)), which holds its "
                     f"parameters")
  theta = params.astype(F32)
  if theta.shape != (n,):
    raise ValueError(f"{n} OT layers but {theta.shape[0]} layer parameters")
  if weighting == "learned":
    w = n * jax.nn.softmax(theta)
    return jnp.sum(w * per_layer), w
  if weighting == "uncertainty":
    s = jnp.clip(theta, -LOGVAR_BOUND, LOGVAR_BOUND)
    w = jnp.exp(-s)
    return jnp.sum(w * per_layer + s), w
  raise ValueError(f"unknown OT layer weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")
