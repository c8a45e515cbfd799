"""Parity of every decoder family with the PyTorch implementations in `transformers`.

A tiny random transformers model is saved as safetensors, loaded with `from_pretrained`, and
run on a padded batch (one full row, one right-padded, one left-padded). Logits and the hidden
states must agree to 1e-4 (float32) at every real token.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cot2align_jax.models import config_from_hf, from_pretrained  # noqa: E402
from tests.models.torch_ref import TINY, padded_batch, torch_forward, torch_model  # noqa: E402

TOL = 1e-4


def _max_diff(a, b, mask):
  return float(np.max(np.abs(a - b) * mask[..., None]))


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request, tmp_path_factory):
  ref = torch_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  ref.save_pretrained(path)
  return request.param, ref, from_pretrained(path)


def test_logits_and_hidden_states_match(pair):
  name, ref, ours = pair
  ids, mask = padded_batch(ours.config.vocab_size)
  ref_logits, ref_states = torch_forward(ref, ids, mask)
  out = ours(ids, mask, hidden_states="all")
  assert out.logits.dtype == np.float32
  assert len(out.hidden_states) == len(ref_states) == ours.config.num_layers + 1
  assert _max_diff(np.asarray(out.logits), ref_logits, mask) <= TOL, name
  for i, (mine, theirs) in enumerate(zip(out.hidden_states, ref_states)):
    assert _max_diff(np.asarray(mine), theirs, mask) <= TOL, (name, i)
  ends = ours(ids, mask)  # the default: embedding output and final normed state
  assert len(ends.hidden_states) == 2
  np.testing.assert_array_equal(np.asarray(ends.hidden_states[1]),
                                np.asarray(out.hidden_states[-1]))


def test_padding_does_not_change_real_tokens(pair):
  """A padded row gives the same logits as the row alone (left and right padding)."""
  _, _, ours = pair
  ids, mask = padded_batch(ours.config.vocab_size, seed=3)
  batch = np.asarray(ours(ids, mask).logits)
  for row in (1, 2):
    keep = mask[row].astype(bool)
    alone = np.asarray(ours(ids[row:row + 1, keep]).logits)[0]
    np.testing.assert_allclose(batch[row, keep], alone, atol=TOL, rtol=0)


def test_explicit_position_ids_are_used(pair):
  _, ref, ours = pair
  ids, mask = padded_batch(ours.config.vocab_size, seed=5)
  mask[:] = 1
  # a gap in the positions changes relative distances (RoPE is blind to a constant shift)
  pos = np.arange(ids.shape[1], dtype=np.int32)
  pos = np.tile(np.where(pos < 5, pos, pos + 7), (3, 1))
  ref_logits, _ = torch_forward(ref, ids, mask, pos)
  mine = np.asarray(ours(ids, mask, pos).logits)
  assert _max_diff(mine, ref_logits, mask) <= TOL
  shifted = np.asarray(ours(ids, mask).logits)
  assert _max_diff(mine, shifted, mask) > 1e-3  # positions matter


def test_gqa_tied_bias_and_padding_switches_are_covered():
  """The tiny configs really exercise what the issue lists (guards against config drift)."""
  cfgs = {k: config_from_hf(v) for k, v in TINY.items()}
  assert any(c.num_kv_heads < c.num_heads for c in cfgs.values())
  assert {c.tie_word_embeddings for c in cfgs.values()} == {True, False}
  assert cfgs["qwen2_bias_padded_vocab"].qkv_bias and not cfgs["qwen2_bias_padded_vocab"].o_bias
  assert cfgs["mistral_sliding"].window_for(0) == 4
  assert cfgs["gemma3"].window_for(0) == 4 and cfgs["gemma3"].window_for(1) is None
  assert cfgs["smollm2_like_tied_llama3_rope"].rope_for("full_attention").rope_type == "llama3"


def test_padded_vocabulary_rows_masked(tmp_path):
  """Qwen-style head with more rows than tokens: rows past valid_vocab_size get -inf."""
  ref = torch_model("qwen2_bias_padded_vocab")
  ref.save_pretrained(tmp_path)
  ours = from_pretrained(tmp_path, valid_vocab_size=100)
  ids, mask = padded_batch(100)
  ref_logits, _ = torch_forward(ref, ids, mask)
  logits = np.asarray(ours(ids, mask).logits)
  assert logits.shape[-1] == 128
  assert np.all(np.isneginf(logits[..., 100:]))
  assert _max_diff(logits[..., :100], ref_logits[..., :100], mask) <= TOL
