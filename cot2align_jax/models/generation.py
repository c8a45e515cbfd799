"""Batched sampling and greedy decoding with a KV cache, compiled end to end.

    gen = GenerationConfig(max_new_tokens=256, temperature=1.0, no_repeat_ngram_size=6)
    out = generate(model, prompt_ids, prompt_mask, gen, seed=10)   # prompts: [B, P], left-padded
    out.tokens    # [B, N] int32 generated ids, pad_token_id after a row's EOS
    out.mask      # [B, N] int32, 1 for real generated tokens (the EOS included)
    out.lengths   # [B] int32, real generated tokens per row
    out.steps     # int32 scalar, token positions the decode loop produced (<= N)

`generate` splits the model (`nnx.split`) and runs one jitted function (graphdef and the
generation config static, so a call with the same shapes and config reuses the compiled code;
the seed is a traced key and never triggers a recompile). It prefills the prompt into a cache of
P + N slots, then decodes one token per `lax.while_loop` iteration until every row has emitted
an EOS or N tokens exist.

Token selection (`select_tokens`) works on float32 logits in Hugging Face's order: the
no-repeat-ngram ban, then (sampling only) temperature, top-k, top-p, and a categorical draw.
Greedy decoding (`greedy=True` or `temperature=0`) takes the argmax after the ban. The key of
step t is `fold_in(key(seed), t)`, and row b draws with `fold_in(step_key, b)`, so a row's draw
does not depend on the batch size.

`decode_full_recompute` is the slow reference used by the tests: each step runs the whole
sequence through the model without a cache and selects with the same function and keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cot2align_jax.core.numerics import F32
from cot2align_jax.models.config import ModelConfig
from cot2align_jax.models.transformer import Transformer, init_cache


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """How to pick tokens.

  max_new_tokens: N, the number of tokens to generate at most (>= 1).
  temperature: softmax temperature; 0 means greedy decoding.
  greedy: argmax decoding regardless of temperature / top-k / top-p.
  top_k: keep only the k largest logits (0 = off).
  top_p: nucleus sampling, keep the smallest set of tokens whose probability mass reaches p
    (1.0 = off).
  no_repeat_ngram_size: n; a token that would complete an n-gram already present in the row's
    real prompt tokens plus its generated tokens is banned (0 = off). Applies to greedy too.
  eos_token_ids: tokens that end a row; None = the model config's `eos_ids`; () = never stop.
  pad_token_id: written after a row's EOS; None = the model's pad, else its first EOS, else 0.
  seed: default seed of the sampler (`generate(..., seed=)` overrides it).
  """

  max_new_tokens: int = 256
  temperature: float = 1.0
  greedy: bool = False
  top_k: int = 0
  top_p: float = 1.0
  no_repeat_ngram_size: int = 0
  eos_token_ids: tuple[int, ...] | None = None
  pad_token_id: int | None = None
  seed: int = 0

  def __post_init__(self):
    if isinstance(self.eos_token_ids, (int, np.integer)):
      object.__setattr__(self, "eos_token_ids", (int(self.eos_token_ids),))
    elif self.eos_token_ids is not None:
      object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))
    if int(self.max_new_tokens) < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not math.isfinite(self.temperature) or self.temperature < 0:
      raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
    if self.no_repeat_ngram_size < 0:
      raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 = off), got "
                       f"{self.no_repeat_ngram_size}")

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0

  def resolve(self, model_cfg: ModelConfig) -> GenerationConfig:
    """A copy with eos_token_ids and pad_token_id filled in from the model config."""
    eos = self.eos_token_ids if self.eos_token_ids is not None else tuple(model_cfg.eos_ids)
    pad = self.pad_token_id
    if pad is None:
      pad = (model_cfg.pad_token_id if model_cfg.pad_token_id is not None
             else (eos[0] if eos else 0))
    vocab = model_cfg.vocab_size
    for name, ids in (("eos_token_ids", eos), ("pad_token_id", (pad,))):
      bad = [i for i in ids if not 0 <= i < vocab]
      if bad:
        raise ValueError(f"{name} {bad} outside the model's vocabulary [0, {vocab})")
    return dataclasses.replace(self, eos_token_ids=tuple(eos), pad_token_id=int(pad))


class GenerationOutput(NamedTuple):
  tokens: jax.Array    # [B, N] int32, pad after EOS and after the last step
  mask: jax.Array      # [B, N] int32, 1 = real generated token (EOS included)
  lengths: jax.Array   # [B] int32, = mask.sum(-1)
  steps: jax.Array     # int32 scalar, token positions produced before the loop stopped


# ---------------------------------------------------------------------------------------------
# Logit processing and token selection (pure functions, usable inside jit)
# ---------------------------------------------------------------------------------------------

def no_repeat_ngram_banned(history: jax.Array, valid: jax.Array, end, n: int,
                           vocab_size: int) -> jax.Array:
  """Tokens that would repeat an n-gram: [B, V] bool (Hugging Face NoRepeatNGram semantics).

  history: [B, L] token ids; valid: [B, L] true at real tokens. A row's real tokens must be
  contiguous and end at slot `end - 1` (left-padded prompt followed by generated tokens);
  `end` is a scalar int (traced or static), the slot of the token being chosen. Slots >= end
  are ignored. With m = the number of real tokens, nothing is banned while m < n - 1;
  otherwise every token that followed an earlier occurrence of the last n - 1 tokens is banned
  (n = 1: every token already present).
  """
  b, length = history.shape
  if n <= 0 or length < n:
    return jnp.zeros((b, vocab_size), bool)
  n1 = n - 1
  slots = jnp.arange(length)
  valid = valid.astype(bool) & (slots < end)[None, :]
  real = valid.sum(-1)                                            # [B]
  # the current (n-1)-token prefix: slots end - n + 1 .. end - 1
  idx = jnp.clip(end - n1 + jnp.arange(n1), 0, length - 1)
  prefix = jnp.take(history, idx, axis=1)                         # [B, n-1]
  starts = length - n + 1                                         # n-grams at slots i..i+n-1
  windows = jnp.stack([history[:, k:k + starts] for k in range(n)], axis=-1)  # [B, starts, n]
  match = jnp.all(windows[..., :n1] == prefix[:, None, :], axis=-1)           # [B, starts]
  match &= valid[:, :starts] & (jnp.arange(starts) <= end - n)[None, :]
  match &= (real >= n1)[:, None]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], match.shape)
  banned = jnp.zeros((b, vocab_size), jnp.int32).at[rows, windows[..., n1]].max(
      match.astype(jnp.int32), mode="drop")
  return banned > 0


def apply_top_k(logits: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest logits of each row ([B, V]), the rest -inf (ties at the k-th value are
  all kept, as in Hugging Face's TopKLogitsWarper). k <= 0 or k >= V: unchanged."""
  vocab = logits.shape[-1]
  if k <= 0 or k >= vocab:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def apply_top_p(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus filter of [B, V] logits (Hugging Face TopPLogitsWarper semantics, min 1 token).

  Sorted ascending, a token is dropped when the cumulative probability up to and including it is
  <= 1 - p; the most likely token is always kept. Tokens tied with the smallest kept logit are
  kept too. p >= 1: unchanged.
  """
  if p >= 1.0:
    return logits
  logits = logits.astype(F32)
  ascending = jnp.sort(logits, axis=-1)
  cum = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
  drop = cum <= (1.0 - p)
  drop = drop.at[..., -1].set(False)
  first_kept = jnp.sum(drop, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(ascending, first_kept, axis=-1)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def process_logits(logits: jax.Array, history: jax.Array, valid: jax.Array, end,
                   cfg: GenerationConfig, valid_vocab_size: int | None = None) -> jax.Array:
  """float32 [B, V] logits after the ban, temperature, top-k and top-p (the last three only
  when sampling). Columns >= valid_vocab_size are -inf. See `no_repeat_ngram_banned` for
  history [B, L], valid [B, L] and end."""
  logits = logits.astype(F32)
  vocab = logits.shape[-1]
  if valid_vocab_size is not None and valid_vocab_size < vocab:
    logits = jnp.where(jnp.arange(vocab) < valid_vocab_size, logits, -jnp.inf)
  if cfg.no_repeat_ngram_size > 0:
    banned = no_repeat_ngram_banned(history, valid, end, cfg.no_repeat_ngram_size, vocab)
    logits = jnp.where(banned, -jnp.inf, logits)
  if cfg.is_greedy:
    return logits
  if cfg.temperature != 1.0:
    logits = logits / jnp.asarray(cfg.temperature, F32)
  logits = apply_top_k(logits, cfg.top_k)
  return apply_top_p(logits, cfg.top_p)


def select_tokens(logits: jax.Array, step_key: jax.Array, history: jax.Array,
                  valid: jax.Array, end, cfg: GenerationConfig,
                  valid_vocab_size: int | None = None) -> jax.Array:
  """The next token of each row: [B] int32 from [B, V] logits.

  Greedy: argmax of the processed logits. Sampling: row b draws from softmax(processed logits)
  with key `fold_in(step_key, b)`. -inf logits are never drawn.
  """
  processed = process_logits(logits, history, valid, end, cfg, valid_vocab_size)
  if cfg.is_greedy:
    return jnp.argmax(processed, axis=-1).astype(jnp.int32)
  rows = jnp.arange(processed.shape[0])
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, rows)
  draw = jax.vmap(lambda k, lg: jax.random.categorical(k, lg, axis=-1))
  return draw(keys, processed).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# generate: prefill + while_loop decode, one compiled function
# ---------------------------------------------------------------------------------------------

def _check_inputs(model: Transformer, prompt_ids, prompt_mask,
                  gen_cfg: GenerationConfig | None):
  """Host-side validation. Returns (ids int32 [B, P], mask int32 [B, P], resolved config)."""
  if gen_cfg is None:
    gen_cfg = GenerationConfig()
  if not isinstance(gen_cfg, GenerationConfig):
    raise ValueError(f"gen_cfg must be a GenerationConfig, got {type(gen_cfg).__name__}")
  mcfg = model.config
  cfg = gen_cfg.resolve(mcfg)
  ids = np.asarray(prompt_ids)
  if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
    raise ValueError(f"prompt_ids must be [batch, prompt_len] with both >= 1, got shape "
                     f"{ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"prompt_ids must be integer token ids, got dtype {ids.dtype}")
  mask = np.ones(ids.shape, np.int32) if prompt_mask is None else np.asarray(prompt_mask)
  if mask.shape != ids.shape:
    raise ValueError(f"prompt_mask shape {mask.shape} differs from prompt_ids shape {ids.shape}")
  mask = (mask != 0).astype(np.int32)
  lengths = mask.sum(-1)
  if np.any(lengths == 0):
    raise ValueError(f"prompt rows {np.flatnonzero(lengths == 0).tolist()} have no real token "
                     "(prompt_mask all 0)")
  if np.any(np.diff(mask, axis=-1) < 0):
    rows = np.flatnonzero(np.any(np.diff(mask, axis=-1) < 0, axis=-1)).tolist()
    raise ValueError(f"prompts must be left-padded (mask 0...0 1...1); rows {rows} are not")
  real = ids[mask.astype(bool)]
  if real.size and (real.min() < 0 or real.max() >= mcfg.vocab_size):
    raise ValueError(f"prompt token ids must lie in [0, {mcfg.vocab_size}), got "
                     f"[{real.min()}, {real.max()}]")
  longest = int(lengths.max())
  if longest + cfg.max_new_tokens > mcfg.max_position_embeddings:
    raise ValueError(f"prompt of {longest} tokens + max_new_tokens={cfg.max_new_tokens} exceeds "
                     f"the model's max_position_embeddings={mcfg.max_position_embeddings}; "
                     "truncate the prompt or lower max_new_tokens")
  ids = np.where(mask.astype(bool), ids, cfg.pad_token_id).astype(np.int32)
  return ids, mask, cfg


def _static(cfg: GenerationConfig) -> GenerationConfig:
  """The part of a resolved config that shapes the compiled code (the seed is traced)."""
  return dataclasses.replace(cfg, seed=0)


def _is_eos(tokens: jax.Array, eos: tuple[int, ...]) -> jax.Array:
  if not eos:
    return jnp.zeros(tokens.shape, bool)
  return jnp.any(tokens[..., None] == jnp.asarray(eos, jnp.int32), axis=-1)


def _generate_impl(graphdef, state, prompt_ids, prompt_mask, key, *, cfg: GenerationConfig):
  """prompt_ids, prompt_mask: [B, P] int32 (left-padded); returns tokens, mask [B, N], steps."""
  model = nnx.merge(graphdef, state)
  mcfg = model.config
  b, p = prompt_ids.shape
  n = cfg.max_new_tokens
  pad = cfg.pad_token_id
  history = jnp.concatenate([prompt_ids, jnp.full((b, n), pad, jnp.int32)], axis=1)  # [B, S]
  valid = jnp.concatenate([prompt_mask.astype(bool), jnp.zeros((b, n), bool)], axis=1)
  cache = init_cache(mcfg, b, p + n)
  out = model(prompt_ids, valid.astype(jnp.int32), cache=cache, hidden_states="none",
              logits="last")

  def emit(logits, t, history, valid, done):
    """Chooses token t (slot p + t) of every row and records it."""
    slot = p + t
    tok = select_tokens(logits, jax.random.fold_in(key, t), history, valid, slot, cfg,
                        mcfg.valid_vocab_size)
    tok = jnp.where(done, pad, tok)
    history = jax.lax.dynamic_update_slice(history, tok[:, None], (0, slot))
    valid = jax.lax.dynamic_update_slice(valid, ~done[:, None], (0, slot))
    return history, valid, done | _is_eos(tok, cfg.eos_token_ids)

  history, valid, done = emit(out.logits[:, -1], 0, history, valid, jnp.zeros((b,), bool))

  def cond(carry):
    t, _, _, done, _ = carry
    return (t < n) & ~jnp.all(done)

  def body(carry):
    t, history, valid, done, cache = carry
    step_model = nnx.merge(graphdef, state)
    last = jax.lax.dynamic_slice_in_dim(history, p + t - 1, 1, axis=1)      # [B, 1]
    step = step_model(last, valid.astype(jnp.int32), cache=cache, hidden_states="none",
                      logits="last")
    history, valid, done = emit(step.logits[:, -1], t, history, valid, done)
    return t + 1, history, valid, done, step.cache

  carry = (jnp.asarray(1, jnp.int32), history, valid, done, out.cache)
  steps, history, valid, _, _ = jax.lax.while_loop(cond, body, carry)
  return history[:, p:], valid[:, p:].astype(jnp.int32), steps


_generate_jit = jax.jit(_generate_impl, static_argnames=("graphdef", "cfg"))


def generate(model: Transformer, prompt_ids, prompt_mask=None,
             gen_cfg: GenerationConfig | None = None, *, seed: int | None = None
             ) -> GenerationOutput:
  """Generates up to N = gen_cfg.max_new_tokens tokens after left-padded prompts.

  Args:
    model: a `Transformer`.
    prompt_ids: [B, P] int token ids, left-padded (ids under mask 0 are ignored).
    prompt_mask: [B, P], 1 at real tokens (0...0 1...1 per row); None = all real.
    gen_cfg: a `GenerationConfig` (default: sampling at temperature 1, N = 256).
    seed: overrides gen_cfg.seed; changing it does not recompile.

  Returns:
    GenerationOutput(tokens [B, N], mask [B, N], lengths [B], steps []), all int32 jax arrays.

  Raises:
    ValueError: bad shapes, right-padded or empty rows, ids outside the vocabulary, or a prompt
      whose real length + N exceeds the model's max_position_embeddings.
  """
  ids, mask, cfg = _check_inputs(model, prompt_ids, prompt_mask, gen_cfg)
  key = jax.random.key(cfg.seed if seed is None else int(seed))
  graphdef, state = nnx.split(model)
  tokens, gen_mask, steps = _generate_jit(graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
                                          key, cfg=_static(cfg))
  return GenerationOutput(tokens, gen_mask, gen_mask.sum(-1), steps)


# ---------------------------------------------------------------------------------------------
# Reference decoder: full recomputation at every step, no cache
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits_at(graphdef, state, ids, mask, slot):
  """Full forward without a cache of ids, mask [B, S]; float32 logits [B, V] at `slot`."""
  model = nnx.merge(graphdef, state)
  logits = model(ids, mask, hidden_states="none", logits="all").logits
  return jax.lax.dynamic_index_in_dim(logits, slot, axis=1, keepdims=False)


_select_jit = jax.jit(select_tokens, static_argnames=("cfg", "valid_vocab_size"))


def decode_full_recompute(model: Transformer, prompt_ids, prompt_mask=None,
                          gen_cfg: GenerationConfig | None = None, *, seed: int | None = None
                          ) -> GenerationOutput:
  """The slow reference for `generate` (same arguments, same output).

  A Python loop over steps: step t runs the sequence [prompt (left-padded), generated tokens
  0..t-1, masked padding] of fixed length P + N through the model without a cache, takes the
  logits at slot P + t - 1 (the last real token; later slots are masked and causally invisible)
  and selects token t with `select_tokens` and the key `fold_in(key(seed), t)`, as `generate`.
  """
  ids, mask, cfg = _check_inputs(model, prompt_ids, prompt_mask, gen_cfg)
  key = jax.random.key(cfg.seed if seed is None else int(seed))
  graphdef, state = nnx.split(model)
  b, p = ids.shape
  n = cfg.max_new_tokens
  history = np.concatenate([ids, np.full((b, n), cfg.pad_token_id, np.int32)], axis=1)
  valid = np.concatenate([mask, np.zeros((b, n), np.int32)], axis=1)
  done = np.zeros((b,), bool)
  eos = np.asarray(cfg.eos_token_ids, np.int64)
  static = _static(cfg)
  steps = 0
  for t in range(n):
    if done.all():
      break
    logits = _logits_at(graphdef, state, jnp.asarray(history), jnp.asarray(valid), p + t - 1)
    tok = np.asarray(_select_jit(logits, jax.random.fold_in(key, t), jnp.asarray(history),
                                 jnp.asarray(valid), p + t, cfg=static,
                                 valid_vocab_size=model.config.valid_vocab_size))
    tok = np.where(done, cfg.pad_token_id, tok)
    history[:, p + t] = tok
    valid[:, p + t] = ~done
    done |= np.isin(tok, eos)
    steps = t + 1
  gen_mask = valid[:, p:].astype(np.int32)
  return GenerationOutput(jnp.asarray(history[:, p:]), jnp.asarray(gen_mask),
                          jnp.asarray(gen_mask.sum(-1)), jnp.asarray(steps, jnp.int32))
