"""Generation: the KV-cache decoder against full recomputation, padding, seeds, EOS and the
logit processors (no-repeat-ngram, top-k, top-p) against Hugging Face semantics.

Models are tiny random decoders whose matrices are drawn N(0, 0.3) (HF init: 0.02) so that
logits are spread out and greedy/sampled choices are not decided by float noise. Shapes and
configs are shared between tests so that compiled functions are reused.
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from cot2align_jax.models import config_from_hf, create_model
from cot2align_jax.models import generation as G
from cot2align_jax.models.generation import (GenerationConfig, apply_top_k, apply_top_p,
                                             decode_full_recompute, generate,
                                             no_repeat_ngram_banned)
from tests.models.torch_ref import TINY

N = 10                     # max_new_tokens everywhere
LENGTHS = (7, 3, 10)       # real prompt lengths of the left-padded batch (P = 10)

GEMMA3_2L = dict(TINY["gemma3"], num_hidden_layers=2,
                 layer_types=["sliding_attention", "full_attention"])  # window 4 < 20 slots
CONFIGS = {"llama_gqa_untied": TINY["llama_gqa_untied"], "gpt2": TINY["gpt2"],
           "gemma3": GEMMA3_2L}

GREEDY = GenerationConfig(max_new_tokens=N, greedy=True, no_repeat_ngram_size=2)
SAMPLE = GenerationConfig(max_new_tokens=N, temperature=0.8, top_k=20, top_p=0.9,
                          no_repeat_ngram_size=3, seed=7)


def _model(hf: dict, seed: int = 0, std: float = 0.3, **overrides):
  """A model with N(0, std) matrices (numpy-drawn: no per-shape eager compiles), norm scales
  at their identity value plus noise and small random biases."""
  cfg = config_from_hf(hf, **overrides)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: create_model(cfg, 0)))
  rng = np.random.default_rng(seed)

  def fill(tree):
    out = {}
    for k, v in tree.items():
      if isinstance(v, dict):
        out[k] = fill(v)
      elif len(v.shape) >= 2:
        out[k] = (std * rng.normal(size=v.shape)).astype(v.dtype)
      elif k == "scale":
        out[k] = ((0.0 if cfg.norm_offset else 1.0) + 0.1 * rng.normal(size=v.shape)).astype(
            v.dtype)
      else:
        out[k] = (0.1 * rng.normal(size=v.shape)).astype(v.dtype)
    return out

  nnx.replace_by_pure_dict(state, fill(nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


def _prompts(vocab: int, lengths=LENGTHS, width: int | None = None, seed: int = 0):
  """Left-padded ids, mask [len(lengths), width]; pad slots hold random ids (must be ignored)."""
  width = width or max(lengths)
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(len(lengths), width)).astype(np.int32)
  mask = np.zeros_like(ids)
  for row, n in enumerate(lengths):
    mask[row, width - n:] = 1
  return ids, mask


@pytest.fixture(scope="module")
def models():
  return {name: _model(hf) for name, hf in CONFIGS.items()}


def _np(out):
  return tuple(np.asarray(x) for x in out)


# --- KV cache == full recomputation ----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_cache_matches_full_recompute(models, name, mode):
  model = models[name]
  gen = GREEDY if mode == "greedy" else SAMPLE
  ids, mask = _prompts(model.config.vocab_size)
  fast = _np(generate(model, ids, mask, gen))
  slow = _np(decode_full_recompute(model, ids, mask, gen))
  for a, b, what in zip(fast, slow, ("tokens", "mask", "lengths", "steps")):
    np.testing.assert_array_equal(a, b, err_msg=f"{name}/{mode}: {what}")
  tokens, gen_mask, lengths, steps = fast
  assert tokens.shape == gen_mask.shape == (3, N) and tokens.dtype == np.int32
  np.testing.assert_array_equal(lengths, gen_mask.sum(-1))
  assert 1 <= steps <= N and lengths.max() == steps
  # the generated tokens vary (the comparison is not vacuous)
  assert len(np.unique(tokens[gen_mask.astype(bool)])) > 3


def test_compiled_function_is_reused(models):
  model = models["llama_gqa_untied"]
  ids, mask = _prompts(model.config.vocab_size)
  generate(model, ids, mask, SAMPLE)
  size = G._generate_jit._cache_size()
  a = np.asarray(generate(model, ids, mask, SAMPLE, seed=123).tokens)
  b = np.asarray(generate(model, ids + 0, mask, dataclasses.replace(SAMPLE, seed=123)).tokens)
  np.testing.assert_array_equal(a, b)  # seed= and gen_cfg.seed are the same thing
  assert G._generate_jit._cache_size() == size, "a new seed or new arrays recompiled"


# --- padding ---------------------------------------------------------------------------------

def test_left_padding_invariance(models):
  """A greedy row of a left-padded batch equals the same prompt generated alone."""
  model = models["gemma3"]
  ids, mask = _prompts(model.config.vocab_size)
  batch = np.asarray(generate(model, ids, mask, GREEDY).tokens)
  row = 1  # 3 real tokens out of 10
  alone = ids[row:row + 1, mask[row].astype(bool)]
  np.testing.assert_array_equal(np.asarray(generate(model, alone, None, GREEDY).tokens)[0],
                                batch[row])


# --- seeds and padded vocabularies -----------------------------------------------------------

def test_seeds_and_padded_vocab_never_sampled():
  """Sampling at temperature 1 (the rationale-writing setup) on a Qwen-style padded head with
  its default small init (near-uniform distribution over 100 real of 128 rows)."""
  model = _model(TINY["qwen2_bias_padded_vocab"], std=0.02, valid_vocab_size=100)
  gen = GenerationConfig(max_new_tokens=N, temperature=1.0, no_repeat_ngram_size=6,
                         eos_token_ids=())
  ids, mask = _prompts(100, lengths=(4, 10, 6, 8))
  runs = {s: np.asarray(generate(model, ids, mask, gen, seed=s).tokens) for s in (10, 11, 12)}
  np.testing.assert_array_equal(runs[10], np.asarray(generate(model, ids, mask, gen,
                                                              seed=10).tokens))
  assert not np.array_equal(runs[10], runs[11]) and not np.array_equal(runs[11], runs[12])
  allt = np.concatenate(list(runs.values()))
  assert allt.max() < 100 and allt.min() >= 0, "a padded vocabulary row was sampled"
  assert len(np.unique(allt)) > 40  # really sampling


# --- no-repeat-ngram -------------------------------------------------------------------------

def _ngrams(seq, n):
  return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


@pytest.fixture(scope="module")
def small_vocab_model():
  """Vocab 12: greedy decoding of a random model repeats itself quickly."""
  return _model(TINY["llama_gqa_untied"], seed=3, vocab_size=12)


@pytest.mark.parametrize("n", [2, 3])
def test_no_repeat_ngram_property(small_vocab_model, n):
  model = small_vocab_model
  gen = GenerationConfig(max_new_tokens=16, greedy=True, no_repeat_ngram_size=n,
                         eos_token_ids=())
  ids, mask = _prompts(12, lengths=(5, 2, 7), seed=1)

  def repeats(tokens, size):
    count = 0
    for row in range(3):
      seq = list(ids[row, mask[row].astype(bool)]) + list(tokens[row])
      grams = _ngrams(seq, size)
      count += len(grams) - len(set(grams))
    return count

  free = np.asarray(decode_full_recompute(model, ids, mask,
                                          dataclasses.replace(gen, no_repeat_ngram_size=0)).tokens)
  assert repeats(free, n) > 0, "no repeats without the ban: the property test would be vacuous"
  tokens = np.asarray(generate(model, ids, mask, gen).tokens)
  np.testing.assert_array_equal(tokens, np.asarray(decode_full_recompute(model, ids, mask,
                                                                         gen).tokens))
  assert repeats(tokens, n) == 0, f"an {n}-gram repeats"


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_hf(n):
  torch = pytest.importorskip("torch")
  # heavy import, needed only for this reference
  from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor
  vocab, width, end = 6, 24, 20
  rng = np.random.default_rng(n)
  lengths = [20, 14, 9, 3, 1, n - 1 if n > 1 else 1]
  # few distinct values so that (n-1)-gram prefixes recur
  history = rng.integers(0, 3, size=(len(lengths), width)).astype(np.int32)
  history[0, ::5] = 5
  valid = np.zeros_like(history)
  for row, m in enumerate(lengths):
    valid[row, end - m:end] = 1
  valid[:, end:] = 1  # slots >= end must be ignored even if marked
  ours = np.asarray(jax.jit(no_repeat_ngram_banned, static_argnums=(3, 4))(history, valid, end,
                                                                         n, vocab))
  proc = NoRepeatNGramLogitsProcessor(n)
  total = 0
  for row, m in enumerate(lengths):
    seq = torch.as_tensor(history[row:row + 1, end - m:end], dtype=torch.long)
    theirs = torch.isinf(proc(seq, torch.zeros(1, vocab))).numpy()[0]
    np.testing.assert_array_equal(ours[row], theirs, err_msg=f"n={n} row={row} len={m}")
    total += theirs.sum()
  assert total > 0


# --- top-k / top-p ---------------------------------------------------------------------------

def _np_top_k(logits, k):
  kth = np.sort(logits, axis=-1)[:, -k][:, None]
  return np.where(logits < kth, -np.inf, logits)


def _np_top_p(logits, p):
  out = logits.astype(np.float64).copy()
  for row in out:
    order = np.argsort(row, kind="stable")
    srt = row[order]
    finite = np.isfinite(srt)
    probs = np.zeros_like(srt)
    probs[finite] = np.exp(srt[finite] - srt[finite].max())
    cum = np.cumsum(probs / probs.sum())
    drop = cum <= 1 - p
    drop[-1] = False
    row[order[drop]] = -np.inf
  return out


def _random_logits(seed=0):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(8, 50)) * rng.uniform(0.5, 4.0, size=(8, 1))).astype(np.float32)
  logits[:, 45:] = -np.inf  # a padded vocabulary
  logits[3, 10:] = -np.inf  # a row with few finite entries
  return logits


@pytest.mark.parametrize("k", [1, 3, 20, 44, 50, 200])
def test_top_k_matches_reference(k):
  logits = _random_logits(k)
  got = np.asarray(jax.jit(apply_top_k, static_argnums=1)(logits, k))
  want = _np_top_k(logits, min(k, logits.shape[-1]))
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_matches_reference(p):
  logits = _random_logits(int(p * 100))
  got = np.asarray(jax.jit(apply_top_p, static_argnums=1)(logits, p))
  want = _np_top_p(logits, p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])
  assert np.all(np.isfinite(got).sum(-1) >= 1)
  np.testing.assert_array_equal(np.asarray(apply_top_p(logits, 1.0)), logits)


def test_top_k_one_equals_greedy(models):
  model = models["llama_gqa_untied"]
  ids, mask = _prompts(model.config.vocab_size)
  greedy = np.asarray(generate(model, ids, mask, GREEDY).tokens)
  top1 = GenerationConfig(max_new_tokens=N, temperature=1.3, top_k=1, no_repeat_ngram_size=2)
  for seed in (0, 1):
    np.testing.assert_array_equal(np.asarray(generate(model, ids, mask, top1,
                                                      seed=seed).tokens), greedy)


# --- EOS -------------------------------------------------------------------------------------

def test_eos_stops_rows_and_loop(models):
  model = models["llama_gqa_untied"]
  ids, mask = _prompts(model.config.vocab_size)
  base_cfg = GenerationConfig(max_new_tokens=N, greedy=True, eos_token_ids=(), pad_token_id=0)
  base = np.asarray(decode_full_recompute(model, ids, mask, base_cfg).tokens)
  eos = (int(base[0, 3]), int(base[1, 2]), int(base[2, 4]))  # every row meets one early
  cfg = dataclasses.replace(base_cfg, eos_token_ids=eos)
  tokens, gen_mask, lengths, steps = _np(generate(model, ids, mask, cfg))
  for row in range(3):
    stop = int(np.flatnonzero(np.isin(base[row], eos))[0])
    assert stop <= 4
    np.testing.assert_array_equal(tokens[row, :stop + 1], base[row, :stop + 1])
    assert np.all(tokens[row, stop + 1:] == 0), "pad after EOS"
    np.testing.assert_array_equal(gen_mask[row], np.arange(N) <= stop)
    assert lengths[row] == stop + 1
  assert steps == lengths.max() < N, "the loop did not stop when every row had finished"
  ref = _np(decode_full_recompute(model, ids, mask, cfg))
  for a, b in zip((tokens, gen_mask, lengths, steps), ref):
    np.testing.assert_array_equal(a, b)


# --- bad inputs ------------------------------------------------------------------------------

def test_bad_inputs_raise(models):
  model = models["llama_gqa_untied"]  # max_position_embeddings = 64
  ids, mask = _prompts(model.config.vocab_size)
  ok = GenerationConfig(max_new_tokens=4, greedy=True)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    GenerationConfig(max_new_tokens=0)
  with pytest.raises(ValueError, match="temperature"):
    GenerationConfig(temperature=-1.0)
  with pytest.raises(ValueError, match="top_p"):
    GenerationConfig(top_p=0.0)
  with pytest.raises(ValueError, match="top_k"):
    GenerationConfig(top_k=-2)
  with pytest.raises(ValueError, match="no_repeat_ngram_size"):
    GenerationConfig(no_repeat_ngram_size=-1)
  long_ids = np.full((1, 60), 5, np.int32)
  with pytest.raises(ValueError, match="max_position_embeddings=64"):
    generate(model, long_ids, None, GenerationConfig(max_new_tokens=8))
  padded = np.concatenate([np.zeros((1, 8), np.int32), long_ids[:, :56]], axis=1)
  padded_mask = (np.arange(64) >= 8).astype(np.int32)[None]
  G._check_inputs(model, padded, padded_mask, GenerationConfig(max_new_tokens=8))  # 56 + 8 fit
  with pytest.raises(ValueError, match="left-padded"):
    generate(model, ids, mask[:, ::-1], ok)
  with pytest.raises(ValueError, match="shape"):
    generate(model, ids, mask[:, 1:], ok)
  with pytest.raises(ValueError, match=r"\[batch, prompt_len\]"):
    generate(model, ids[0], None, ok)
  empty = mask.copy()
  empty[1] = 0
  with pytest.raises(ValueError, match="no real token"):
    generate(model, ids, empty, ok)
  with pytest.raises(ValueError, match="vocabulary"):
    generate(model, ids, mask, dataclasses.replace(ok, eos_token_ids=(1000,)))
  with pytest.raises(ValueError, match="token ids must lie"):
    generate(model, ids + 1000, mask, ok)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    decode_full_recompute(model, ids, mask, dataclasses.replace(ok, max_new_tokens=0))
