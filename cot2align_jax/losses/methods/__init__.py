"""The registry of KD methods (one file per method; docs/method.md §4, §7, §8).

    method = get_method("cot2align", base="uld")   # unknown names list the known ones
    projectors = build_projectors(method, d_student, d_teacher, rngs=nnx.Rngs(0))
    loss, metrics = objective(method, kd_cfg, inputs, projectors)

Adding a method = a file here declaring `METHOD = Method(...)` + one entry in `METHODS` + a test
file tests/losses/methods/test_<name>.py.
"""

from __future__ import annotations

from cot2align_jax.losses.methods import (cot2align, cot2align_plus, dskd, dskd_cma, dskd_eta,
                                          kd, mined, multilevel_ot, sft, uld)
from cot2align_jax.losses.methods.base import (DEFAULT_BASE, KDConfig, LossInputs, Method,
                                               MethodProjectors, build_projectors,
                                               cross_entropy_sum, objective, ot_config,
                                               params_of, side)
from cot2align_jax.losses.methods.base import lookup, registry

METHODS: dict[str, Method] = registry(
    sft.METHOD,
    kd.METHOD,
    uld.METHOD,
    mined.METHOD,
    dskd.METHOD,
    dskd_cma.METHOD,
    dskd_eta.METHOD,
    multilevel_ot.METHOD,
    cot2align.METHOD,
    cot2align_plus.METHOD,
)


def get_method(name: str, base: str | None = None) -> Method:
  """A registered method; a composing one (cot2align) gets `base`'s KD term (default
  dskd_cma) and requirements."""
  return lookup(METHODS, name, base)


def method_from_config(cfg: KDConfig) -> Method:
  return get_method(cfg.method, cfg.base)


__all__ = ["DEFAULT_BASE", "KDConfig", "LossInputs", "METHODS", "Method", "MethodProjectors",
           "build_projectors", "cross_entropy_sum", "get_method", "method_from_config",
           "objective", "ot_config", "params_of", "side"]
