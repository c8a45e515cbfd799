"""Trainable linear projectors between the student's and the teacher's hidden spaces.

`Projectors` is a named set of float32 linear maps, applied as `projectors.<name>(x)`
(x [..., in] -> [..., out] float32). Two sets are used:

  Projectors.dskd(d_S, d_T)   DSKD family (docs/method.md §4, §8), torch.nn.Linear init:
      query  2·d_S -> 2·d_T   DSKD-CMA only: queries from the student index embeddings
      t2s      d_T ->   d_S   teacher hidden states into the student space
      s2t      d_S ->   d_T   student hidden states into the teacher space
  Projectors.ot(d_T, d_S)     the OT block's shared teacher -> student map `linear`
                              (lecun-normal kernel, zero bias); calling the set applies it.

Parameters are float32 and unsharded (the trainer replicates them).
"""

from __future__ import annotations

import math
from typing import Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cot2align_jax.core.numerics import F32

PROJECTOR_NAMES = ("query", "t2s", "s2t")  # the DSKD family's maps
Init = Literal["torch", "lecun"]


class Linear(nnx.Module):
  """y = x·W + b with W [in, out], b [out], float32.

  init "torch": W, b ~ U(−1/√in, 1/√in) (torch.nn.Linear, the DSKD reference); "lecun": W
  lecun-normal, b = 0 (flax's nnx.Linear default). Both draw two keys from rngs.params().
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               init: Init = "torch"):
    self.in_features = in_features
    self.out_features = out_features
    kernel_key, bias_key = rngs.params(), rngs.params()
    if init == "torch":
      bound = 1.0 / math.sqrt(in_features)
      kernel = jax.random.uniform(kernel_key, (in_features, out_features), F32, -bound, bound)
      bias = jax.random.uniform(bias_key, (out_features,), F32, -bound, bound)
    elif init == "lecun":
      kernel = nnx.initializers.lecun_normal()(kernel_key, (in_features, out_features), F32)
      bias = nnx.initializers.zeros_init()(bias_key, (out_features,), F32)
    else:
      raise ValueError(f"unknown projector init {init!r}; known: torch, lecun")
    self.kernel = nnx.Param(kernel)
    self.bias = nnx.Param(bias)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., in] (any float dtype) -> [..., out] float32."""
    y = jnp.einsum("...i,io->...o", x.astype(F32), self.kernel[...], preferred_element_type=F32)
    return y + self.bias[...]


def projector_shapes(d_student: int, d_teacher: int) -> dict[str, tuple[int, int]]:
  """(in, out) of every DSKD projector for the given hidden sizes."""
  return {
      "query": (2 * d_student, 2 * d_teacher),
      "t2s": (d_teacher, d_student),
      "s2t": (d_student, d_teacher),
  }


class Projectors(nnx.Module):
  """Named linear maps: shapes {name: (in, out)} (None = an absent map, attribute None).

  Maps are created in the order of `shapes` (that fixes the RNG draws).
  """

  def __init__(self, shapes: Mapping[str, tuple[int, int] | None], *, rngs: nnx.Rngs,
               init: Init = "torch"):
    self.names = tuple(n for n, s in shapes.items() if s is not None)
    for name, shape in shapes.items():
      setattr(self, name, None if shape is None else Linear(*shape, rngs=rngs, init=init))

  @classmethod
  def dskd(cls, d_student: int, d_teacher: int, *, rngs: nnx.Rngs,
           names: Sequence[str] = PROJECTOR_NAMES) -> Projectors:
    """The DSKD projectors `names` (a subset of PROJECTOR_NAMES; the others are None)."""
    unknown = sorted(set(names) - set(PROJECTOR_NAMES))
    if unknown:
      raise ValueError(f"unknown projector(s) {unknown}; known: {', '.join(PROJECTOR_NAMES)}")
    shapes = projector_shapes(d_student, d_teacher)
    return cls({n: shapes[n] if n in names else None for n in PROJECTOR_NAMES}, rngs=rngs)

  @classmethod
  def ot(cls, d_teacher: int, d_student: int, *, rngs: nnx.Rngs) -> Projectors:
    """The OT block's teacher -> student map d_T -> d_S, named `linear`."""
    return cls({"linear": (d_teacher, d_student)}, rngs=rngs, init="lecun")

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the set's only map: x [..., in] -> [..., out] float32."""
    if len(self.names) != 1:
      raise ValueError(f"call a map by name, one of {', '.join(self.names)}")
    return getattr(self, self.names[0])(x)

  def require(self, *names: str) -> None:
    """Raises a clear error if one of the named maps was not created."""
    missing = [n for n in names if getattr(self, n, None) is None]
    if missing:
      raise ValueError(f"this loss needs projector(s) {missing}; create Projectors with "
                       f"names including them")
