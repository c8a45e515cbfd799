"""Properties of the NNX decoder that do not need a PyTorch reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cot2align_jax.models import ModelError, config_from_hf, create_model, init_cache
from cot2align_jax.models.config import ModelConfig
from tests.models.torch_ref import TINY, padded_batch

AXES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "position"}


@pytest.mark.parametrize("name", ["gpt2", "qwen2_bias_padded_vocab", "gemma3"])
def test_every_parameter_has_logical_axes(name):
  model = create_model(config_from_hf(TINY[name]))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  leaves = jax.tree_util.tree_leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  spec_leaves = jax.tree_util.tree_leaves(nnx.to_pure_dict(specs),
                                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(leaves) == len(spec_leaves) > 0
  for value, spec in zip(leaves, spec_leaves):
    assert len(spec) == value.ndim and set(spec) <= AXES, spec


def test_hidden_state_selection_and_last_logits():
  cfg = config_from_hf(TINY["gemma3"])
  model = create_model(cfg, seed=1)
  ids, mask = padded_batch(cfg.vocab_size)
  full = model(ids, mask, hidden_states="all")
  some = model(ids, mask, hidden_states=(0, 2, -1), logits="last")
  assert len(some.hidden_states) == 3
  for got, want in zip(some.hidden_states, (full.hidden_states[0], full.hidden_states[2],
                                            full.hidden_states[-1])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert some.logits.shape == (3, 1, cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(some.logits[:, 0]), np.asarray(full.logits[:, -1]),
                             atol=1e-5)
  none = model(ids, mask, hidden_states="none", logits="none")
  assert none.logits is None and none.hidden_states == ()
  with pytest.raises(ValueError, match="hidden_states"):
    model(ids, mask, hidden_states="middle")


def test_cache_prefill_then_step_equals_full_forward():
  """Writing a prompt into the cache and then one token equals one uncached forward."""
  cfg = config_from_hf(TINY["smollm2_like_tied_llama3_rope"])
  model = create_model(cfg, seed=2)
  ids, mask = padded_batch(cfg.vocab_size)
  mask[1] = 1  # caches are for left-padded prompts: keep rows full or left-padded
  full = model(ids, mask).logits
  cache = init_cache(cfg, batch=3, slots=ids.shape[1])
  out = model(ids[:, :-1], mask, cache=cache)
  assert int(out.cache.index) == ids.shape[1] - 1
  step = model(ids[:, -1:], mask, cache=out.cache)
  np.testing.assert_allclose(np.asarray(step.logits[:, 0]), np.asarray(full[:, -1]), atol=1e-5)
  real = mask[:, :-1, None].astype(bool)  # padded queries see nothing; their values are moot
  np.testing.assert_allclose(np.where(real, np.asarray(out.logits), 0),
                             np.where(real, np.asarray(full[:, :-1]), 0), atol=1e-5)


def test_remat_gives_identical_loss_and_gradients():
  cfg = config_from_hf(TINY["llama_gqa_untied"])
  ids, mask = padded_batch(cfg.vocab_size)

  def loss_and_grads(c):
    graphdef, state = nnx.split(create_model(c, seed=3))

    @jax.jit
    def f(state):
      logits = nnx.merge(graphdef, state)(ids, mask).logits
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
    return jax.value_and_grad(f)(state)

  (l1, g1), (l2, g2) = loss_and_grads(cfg), loss_and_grads(cfg.replace(remat=True))
  assert float(l1) == pytest.approx(float(l2), rel=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_config_validation_errors_are_one_line():
  base = config_from_hf(TINY["llama_gqa_untied"])
  with pytest.raises(ModelError, match="not a multiple"):
    base.replace(num_kv_heads=3)
  with pytest.raises(ModelError, match="layer_types has 1 entries for 2 layers"):
    base.replace(layer_types=("full_attention",))
  with pytest.raises(ModelError, match="unsupported rope_type 'yarn'"):
    config_from_hf({**TINY["llama_gqa_untied"],
                    "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
  assert isinstance(hash(base), int) and base == base.replace()


def test_jit_over_split_state_matches_eager():
  """The pure style the trainer uses: split once, merge inside jit."""
  cfg = ModelConfig(family="llama", model_type="llama", vocab_size=50, hidden_size=16,
                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                    intermediate_size=24, tie_word_embeddings=False)
  model = create_model(cfg, seed=4)
  ids, mask = padded_batch(50)
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m).logits)
  np.testing.assert_allclose(np.asarray(jitted(state, ids, mask)),
                             np.asarray(model(ids, mask).logits), atol=1e-6)
