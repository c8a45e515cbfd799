"""The registry of KD methods (one file per method; docs/method.md §4, §7, §8).

    method = get_method("cot2align", base="uld")   # unknown names list the known ones
    projectors = build_projectors(method, d_student, d_teacher, rngs=nnx.Rngs(0))
    loss, metrics = objective(method, kd_cfg, inputs, projectors)

Adding a method = a file here declaring `METHOD = Method(...)` + its name in `METHOD_MODULES`
+ a test file tests/losses/methods/test_<name>.py (docs/adding_a_method.md).
"""

from __future__ import annotations

import importlib

from cot2align_jax.losses.methods.base import (DEFAULT_BASE, KDConfig, LossInputs, Method,
                                               MethodProjectors, build_projectors,
                                               check_vocab_chunk, cross_entropy_sum, objective,
                                               ot_config, params_of, side)
from cot2align_jax.losses.methods.base import lookup, registry

# The registry: one line per method, the name of its module in this package (which declares
# `METHOD = Method(...)`).
METHOD_MODULES = (
    "sft",
    "kd",
    "uld",
    "mined",
    "dskd",
    "dskd_cma",
    "dskd_eta",
    "multilevel_ot",
    "kd_topk",
    "cot2align",
    "cot2align_plus",
)

METHODS: dict[str, Method] = registry(
    *(importlib.import_module(f"{__name__}.{name}").METHOD for name in METHOD_MODULES))


def get_method(name: str, base: str | None = None) -> Method:
  """A registered method; a composing one (cot2align) gets `base`'s KD term (default
  dskd_cma) and requirements."""
  return lookup(METHODS, name, base)


def method_from_config(cfg: KDConfig) -> Method:
  """The method of cfg (kd.method, kd.base); ValueError if it cannot run with cfg.vocab_chunk."""
  method = get_method(cfg.method, cfg.base)
  check_vocab_chunk(method, cfg)
  return method


__all__ = ["DEFAULT_BASE", "KDConfig", "LossInputs", "METHODS", "Method", "MethodProjectors",
           "build_projectors", "check_vocab_chunk", "cross_entropy_sum", "get_method",
           "method_from_config", "objective", "ot_config", "params_of", "side"]
