"""CoT2Align composes a base method's KD term with the OT block and takes over its needs."""

import pytest
from flax import nnx

from cot2align_jax.losses import methods as M
from tests.losses.methods.support import DS, DT

BASES = [n for n, m in M.METHODS.items() if m.kd is not None and not m.ot]


@pytest.mark.parametrize("base", BASES)
def test_composition_keeps_the_base_term_and_requirements(base):
  b = M.get_method(base)
  m = M.get_method("cot2align", base)
  assert m.name == f"cot2align[{base}]"
  assert m.kd is b.kd and m.ot and m.uses_rationales
  assert (m.alignment, m.needs_vocab_map, m.same_vocab, m.projectors, m.params) == (
      b.alignment, b.needs_vocab_map, b.same_vocab, b.projectors, b.params)
  proj = M.build_projectors(m, DS, DT, rngs=nnx.Rngs(0))
  assert proj.ot is not None and (proj.kd is not None) == bool(b.projectors)


def test_default_base_and_bad_bases():
  assert M.get_method("cot2align").name == f"cot2align[{M.DEFAULT_BASE}]"
  assert M.method_from_config(M.KDConfig()).name == "cot2align[dskd_cma]"
  for bad in ("sft", "cot2align", "nope"):
    with pytest.raises(ValueError, match="cot2align needs a base KD method"):
      M.get_method("cot2align", bad)
