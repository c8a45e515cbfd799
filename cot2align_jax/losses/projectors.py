"""Trainable projectors between the student's and the teacher's hidden spaces (DSKD family).

DSKD (Zhang et al. 2024) and its cross-model-attention variant DSKD-CMA (docs/METHOD.md §4) learn
small linear maps, trained together with the student (projector lr 1e-3 in the reference):

  query  2·d_S -> 2·d_T  (with bias)  DSKD-CMA only: queries from the student index embeddings
  t2s      d_T ->   d_S  (with bias)  teacher hidden states into the student space
  s2t      d_S ->   d_T  (with bias)  student hidden states into the teacher space

Initialisation follows torch.nn.Linear (what the reference uses): W and b ~ U(-1/sqrt(in),
1/sqrt(in)). Parameters are float32 and carry no sharding annotation (they are tiny; the trainer
replicates them). Apply with `projectors.t2s(x)` etc.; x [..., in] -> [..., out] float32.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32

PROJECTOR_NAMES = ("query", "t2s", "s2t")


class Linear(nnx.Module):
  """y = x·W + b with W [in, out], b [out], float32; torch.nn.Linear's default initialisation."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               use_bias: bool = True):
    bound = 1.0 / math.sqrt(in_features)
    self.in_features = in_features
    self.out_features = out_features
    self.kernel = nnx.Param(jax.random.uniform(
        rngs.params(), (in_features, out_features), F32, -bound, bound))
    self.bias = (nnx.Param(jax.random.uniform(rngs.params(), (out_features,), F32, -bound, bound))
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., in] (any float dtype) -> [..., out] float32."""
    y = jnp.einsum("...i,io->...o", x.astype(F32), self.kernel[...], preferred_element_type=F32)
    if self.bias is not None:
      y = y + self.bias[...]
    return y


def projector_shapes(d_student: int, d_teacher: int) -> dict[str, tuple[int, int]]:
  """(in, out) of every projector for the given hidden sizes."""
  return {
      "query": (2 * d_student, 2 * d_teacher),
      "t2s": (d_teacher, d_student),
      "s2t": (d_student, d_teacher),
  }


class Projectors(nnx.Module):
  """The DSKD projectors for hidden sizes d_student (d_S) and d_teacher (d_T).

  names: which projectors to create (DSKD without CMA and DSKD-ETA need only t2s and s2t; the
  query projector is for DSKD-CMA). Absent ones are None, and a loss that needs one raises.
  """

  def __init__(self, d_student: int, d_teacher: int, *, rngs: nnx.Rngs,
               names: Sequence[str] = PROJECTOR_NAMES):
    unknown = sorted(set(names) - set(PROJECTOR_NAMES))
    if unknown:
      raise ValueError(f"unknown projector(s) {unknown}; known: {', '.join(PROJECTOR_NAMES)}")
    self.d_student = d_student
    self.d_teacher = d_teacher
    shapes = projector_shapes(d_student, d_teacher)
    self.query = Linear(*shapes["query"], rngs=rngs) if "query" in names else None
    self.t2s = Linear(*shapes["t2s"], rngs=rngs) if "t2s" in names else None
    self.s2t = Linear(*shapes["s2t"], rngs=rngs) if "s2t" in names else None

  def require(self, *names: str) -> None:
    """Raises a clear error if one of the named projectors was not created."""
    missing = [n for n in names if getattr(self, n) is None]
    if missing:
      raise ValueError(f"this loss needs projector(s) {missing}; create Projectors with "
                       f"names including them")


def projectors_for_method(method: str, d_student: int, d_teacher: int, *, rngs: nnx.Rngs
                          ) -> Projectors | None:
  """The projectors a KD method trains: dskd_cma -> query/t2s/s2t, dskd/dskd_eta -> t2s/s2t,
  any other method -> None."""
  if method == "dskd_cma":
    return Projectors(d_student, d_teacher, rngs=rngs)
  if method in ("dskd", "dskd_eta"):
    return Projectors(d_student, d_teacher, rngs=rngs, names=("t2s", "s2t"))
  return None
