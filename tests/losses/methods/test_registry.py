"""Every registered method declares consistent requirements, and its KD term reads only what it
declares (alignment arrays, vocabulary map, teacher)."""

import dataclasses
import pkgutil

import numpy as np
import pytest
from flax import nnx

from cot2align_jax.core import spec
from cot2align_jax.data.pipeline import ALIGNMENTS
from cot2align_jax.losses import methods as M
from cot2align_jax.losses.ot import OTConfig
from cot2align_jax.losses.projectors import PROJECTOR_NAMES
from tests.losses.methods.support import DS, DT, loss_inputs

BASES = [n for n, m in M.METHODS.items() if m.kd is not None and not m.ot]
ALL = list(M.METHODS.values()) + [M.get_method("cot2align", b) for b in BASES]


def test_every_method_file_is_registered_under_its_name():
  files = [m.name for m in pkgutil.iter_modules(M.__path__) if m.name != "base"]
  assert sorted(files) == sorted(M.METHODS)
  for name, method in M.METHODS.items():
    assert method.name == name
    module = __import__(f"cot2align_jax.losses.methods.{name}", fromlist=["METHOD"])
    assert module.METHOD is method


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_requirements_are_consistent(method):
  assert set(method.alignment) <= set(ALIGNMENTS)
  assert len(set(method.alignment)) == len(method.alignment)
  assert set(method.projectors) <= set(PROJECTOR_NAMES)
  assert method.needs_vocab_map == ("mined" in method.alignment)
  if method.projectors or method.same_vocab or method.alignment:
    assert method.kd is not None
  if not method.needs_teacher:
    assert method.kd is None and not method.ot and not method.alignment
  if method.uses_rationales:
    assert method.ot  # rationales feed the paired views of the OT block
  if method.params is not None:
    assert dataclasses.is_dataclass(method.params)
    instance = method.params()
    with pytest.raises(dataclasses.FrozenInstanceError):
      setattr(instance, dataclasses.fields(instance)[0].name, None)
    assert M.params_of(M.KDConfig(), method) == instance


@pytest.mark.parametrize("method", [m for m in M.METHODS.values() if m.kd is not None],
                         ids=lambda m: m.name)
def test_term_reads_only_what_the_method_declares(method):
  inputs = loss_inputs(20, same_vocab=method.same_vocab or method.name == "dskd")
  undeclared = {k for a in ALIGNMENTS if a not in method.alignment
                for k in (spec.align_key(f"{a}_pos"), spec.align_key(f"{a}_mask"))}
  inputs = inputs._replace(
      batch={k: v for k, v in inputs.batch.items() if k not in undeclared},
      vocab_map=inputs.vocab_map if method.needs_vocab_map else None)
  cfg = M.KDConfig(method=method.name, ot=OTConfig(num_iters=2))
  proj = M.build_projectors(method, DS, DT, rngs=nnx.Rngs(0))
  loss, metrics = M.objective(method, cfg, inputs, proj)
  assert np.isfinite(float(loss)) and float(metrics["kd"][0]) != 0.0


def test_mined_term_raises_without_the_vocab_map():
  method = M.get_method("mined")
  with pytest.raises(ValueError, match="needs the MinED vocabulary map"):
    method.kd(loss_inputs(21)._replace(vocab_map=None), None, M.KDConfig(method="mined"))


def test_params_of_checks_the_type():
  method = M.get_method("multilevel_ot")
  cfg = M.KDConfig(method_params=(("multilevel_ot", M.get_method("dskd_eta").params()),))
  with pytest.raises(TypeError, match="expected Params"):
    M.params_of(cfg, method)
  assert M.params_of(cfg, M.get_method("uld")) is None
  assert M.params_of(M.KDConfig(), method) == method.params()
