"""The projector set: shapes, missing maps, and the initialisations checkpoints depend on."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cot2align_jax.losses.projectors import Projectors

DS, DT = 8, 12


def test_projectors_shapes():
  proj = Projectors.dskd(DS, DT, rngs=nnx.Rngs(0))
  assert proj.query(jnp.ones((2, 2 * DS))).shape == (2, 2 * DT)
  assert proj.t2s(jnp.ones((2, DT))).shape == (2, DS)
  assert proj.s2t(jnp.ones((2, DS))).shape == (2, DT)
  only = Projectors.dskd(DS, DT, rngs=nnx.Rngs(0), names=("t2s", "s2t"))
  with pytest.raises(ValueError, match="query"):
    only.require("query")
  assert only.query is None
  with pytest.raises(ValueError, match="unknown projector"):
    Projectors.dskd(DS, DT, rngs=nnx.Rngs(0), names=("t2s", "q"))


def test_ot_projector_is_flax_linear_bit_for_bit():
  """Same parameter names, init and outputs as the nnx.Linear it replaces (checkpoints)."""
  ours = Projectors.ot(DT, DS, rngs=nnx.Rngs(3))
  ref = nnx.Linear(DT, DS, use_bias=True, rngs=nnx.Rngs(3))
  state = nnx.state(ours, nnx.Param)
  assert set(state["linear"].keys()) == {"kernel", "bias"}
  np.testing.assert_array_equal(np.asarray(ours.linear.kernel[...]), np.asarray(ref.kernel[...]))
  np.testing.assert_array_equal(np.asarray(ours.linear.bias[...]), np.asarray(ref.bias[...]))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, DT)), jnp.bfloat16)
  got = ours(x)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref(x.astype(jnp.float32))))


def test_dskd_init_is_torch_uniform_in_a_fixed_order():
  rngs = nnx.Rngs(5)
  proj = Projectors.dskd(DS, DT, rngs=rngs, names=("s2t", "t2s"))
  for layer, fan_in in ((proj.t2s, DT), (proj.s2t, DS)):
    for p in (layer.kernel[...], layer.bias[...]):
      assert float(jnp.max(jnp.abs(p))) <= 1.0 / np.sqrt(fan_in)
  # maps are created query, t2s, s2t whatever the order of `names`
  again = Projectors.dskd(DS, DT, rngs=nnx.Rngs(5), names=("t2s", "s2t"))
  np.testing.assert_array_equal(np.asarray(proj.s2t.kernel[...]),
                                np.asarray(again.s2t.kernel[...]))
  with pytest.raises(ValueError, match="by name"):
    proj(jnp.ones((1, DT)))
