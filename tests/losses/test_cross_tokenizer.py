"""The cross-tokenizer losses together: one jitted gradient through all of them (padded −inf
vocabulary rows, empty masks), and the shared pairing helpers of losses/cross_tokenizer.py."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cot2align_jax.losses.cross_tokenizer import KDSide, rank_pairs
from cot2align_jax.losses.methods.dskd_cma import dskd_cma_loss
from cot2align_jax.losses.methods.dskd_eta import dskd_eta_loss
from cot2align_jax.losses.methods.mined import mined_loss
from cot2align_jax.losses.methods.multilevel_ot import Params, multilevel_ot_loss
from cot2align_jax.losses.methods.uld import uld_loss
from tests.losses.methods.support import (TAU, all_finite, cma_projectors, eta_inputs, masks,
                                          mined_inputs)


def test_rank_pairs_pair_the_kth_response_tokens():
  ms, mt = masks()
  s_pos, t_pos, pair = rank_pairs(jnp.asarray(ms), jnp.asarray(mt))
  for b in range(ms.shape[0]):
    n = min(ms[b].sum(), mt[b].sum())
    assert int(pair[b].sum()) == n
    np.testing.assert_array_equal(np.asarray(s_pos[b, :n]), np.nonzero(ms[b])[0][:n])
    np.testing.assert_array_equal(np.asarray(t_pos[b, :n]), np.nonzero(mt[b])[0][:n])


# ------------------------------------------------------------------------------------------
# Empty masks, gradients, jit
# ------------------------------------------------------------------------------------------

def _all_losses(params, graphdef, s_logits, s_hidden, x, ms, mt):
  """Sum of every loss (each term once) as a function of the trainable inputs."""
  proj = nnx.merge(graphdef, params)
  student = KDSide(s_logits, s_hidden, x["s_ids"], x["s_labels"], ms, x["s_embed"],
                   x["s_head"])
  teacher = KDSide(x["t_logits"], x["t_hidden"], x["t_ids"], x["t_labels"], mt,
                   x["t_embed"], x["t_head"])
  total = uld_loss(s_logits, x["t_logits"], ms, mt, temperature=TAU)[0]
  total += mined_loss(s_logits, x["t_logits"], x["s_labels"], ms, x["t_labels"],
                      x["mined_pos"], x["mined_mask"] * ms, x["vocab_map"],
                      temperature=TAU)[0]
  total += dskd_cma_loss(proj, student, teacher, divergence="srkl", temperature=TAU)[0]
  total += dskd_eta_loss(proj, student, teacher, x["eta_pos"], x["eta_mask"] * ms,
                         divergence="akl", temperature=TAU)[0]
  total += multilevel_ot_loss(s_logits, x["t_logits"], ms, mt,
                              params=Params(top_k=5, unrolled_grad=True))[0]
  return total


def test_gradients_finite_and_empty_masks_give_zero():
  """One jitted value_and_grad of all losses (padded −inf vocabulary rows on both sides), run
  with the real masks and with every mask empty."""
  x = eta_inputs(13)
  x.update({k: v for k, v in mined_inputs(13).items() if k in ("vocab_map", "mined_pos",
                                                               "mined_mask")})
  x["t_logits"][..., -2:] = -np.inf                     # padded teacher vocabulary rows
  x["s_logits"][..., -1:] = -np.inf                     # padded student vocabulary row
  x = {k: jnp.asarray(v) for k, v in x.items()}
  graphdef, params = nnx.split(cma_projectors(x, seed=4))
  fn = jax.jit(jax.value_and_grad(_all_losses, argnums=(0, 2, 3)), static_argnums=1)

  value, grads = fn(params, graphdef, x["s_logits"], x["s_hidden"], x, x["ms"], x["mt"])
  assert bool(jnp.isfinite(value)) and float(value) > 0
  assert all_finite(grads)
  assert float(jnp.max(jnp.abs(grads[0]["s2t"]["kernel"][...]))) > 0   # projectors learn
  assert float(jnp.max(jnp.abs(grads[0]["t2s"]["kernel"][...]))) > 0
  assert float(jnp.max(jnp.abs(grads[0]["query"]["kernel"][...]))) > 0
  assert float(jnp.max(jnp.abs(grads[1]))) > 0                          # student logits
  assert float(jnp.max(jnp.abs(grads[2]))) > 0                          # student states

  empty_s, empty_t = jnp.zeros_like(x["ms"]), jnp.zeros_like(x["mt"])
  value, grads = fn(params, graphdef, x["s_logits"], x["s_hidden"], x, empty_s, empty_t)
  assert float(value) == 0.0
  assert all_finite(grads)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(grads))
