"""Vocabulary-chunked fused losses: every full-vocabulary term from hidden states and an LM head,
one chunk of the vocabulary at a time, never holding [tokens, V] logits (docs/losses.md,
"Vocabulary chunking").

A `Logits` is a product h·W (+ softcap, −inf past a valid size): the logits a model would return,
described instead of materialised. `vocab_scan` runs a function over the vocabulary in chunks
(a `lax.scan` whose body is `jax.checkpoint`ed, so the backward pass recomputes each chunk's
logits instead of storing them); every term below is one or a few such scans:

  pass 1  per-position statistics: online log-sum-exp (float32, stop-gradient running max),
          running argmax / top-k, label logits, means and variances;
  pass 2  per-position sums Σ_v f(log p_v, log q_v) given the pass-1 normalisers.

Chunk layout: with nc = number of chunks and C = chunk width (nc·C ≥ V, the head zero-padded to
nc·C columns and those columns −inf), chunk j holds the vocabulary ids i·nc + j, i < C (strided),
so a head whose vocabulary axis is sharded in contiguous blocks over `tensor` keeps every chunk
split over the same devices. Ties (argmax, top-k) are broken by the global id, as in the
unchunked code. Shapes: h [..., D] (any leading dims, e.g. [B, T]), W [D, V]; results are
[...] float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cot2align_jax.core.numerics import F32
from cot2align_jax.losses import divergences as dv

sg = jax.lax.stop_gradient


class HeadSpec(NamedTuple):
  """How a model turns h·W into logits: softcap (cap·tanh(x/cap), None = off) and valid (ids ≥
  valid are −inf, None = all rows). From the model config: `head_spec(model_config)`."""
  softcap: float | None = None
  valid: int | None = None


def head_spec(model_config: Any) -> HeadSpec:
  """The HeadSpec of a models.config.ModelConfig (final_logit_softcapping, valid_vocab_size)."""
  cap = getattr(model_config, "final_logit_softcapping", None) or None
  valid = getattr(model_config, "valid_vocab_size", None)
  if valid is not None and valid >= model_config.vocab_size:
    valid = None
  return HeadSpec(None if cap is None else float(cap), valid)


@dataclasses.dataclass(frozen=True)
class Logits:
  """Logits [..., V] = softcap(h·W), −inf at ids ≥ valid, never materialised by the chunked code.

  hidden [..., D]; head [D, V]; cast "hidden": W is cast to h's dtype (models.Transformer.logits),
  "head": h is cast to W's dtype (cross_tokenizer.project_head); the product accumulates in
  float32.
  """
  hidden: jax.Array
  head: jax.Array
  softcap: float | None = None
  valid: int | None = None
  cast: str = "hidden"

  @property
  def vocab(self) -> int:
    return self.head.shape[-1]

  @property
  def limit(self) -> int:
    """Ids below this are finite (valid vocabulary)."""
    return self.vocab if self.valid is None else min(self.valid, self.vocab)

  def stop_gradient(self) -> "Logits":
    return dataclasses.replace(self, hidden=sg(self.hidden), head=sg(self.head))

  def at(self, pos: jax.Array) -> "Logits":
    """The same head on hidden rows gathered at positions pos [B, K] along axis 1 -> [B, K]."""
    idx = pos.reshape(pos.shape + (1,) * (self.hidden.ndim - 2))
    return dataclasses.replace(self, hidden=jnp.take_along_axis(self.hidden, idx, axis=1))

  def product(self, w: jax.Array) -> jax.Array:
    """h·w for columns w [D, K] -> [..., K] float32, with this head's cast and softcap."""
    h = self.hidden
    if self.cast == "hidden":
      z = jnp.einsum("...d,dk->...k", h, w.astype(h.dtype), preferred_element_type=F32)
    else:
      z = jnp.einsum("...d,dk->...k", h.astype(w.dtype), w, preferred_element_type=F32)
    if self.softcap:
      z = jnp.tanh(z / self.softcap) * self.softcap
    return z

  def columns(self, ids: jax.Array) -> jax.Array:
    """The logits at vocabulary ids [K] (any ints; out of [0, limit) -> −inf): [..., K] float32."""
    ok = (ids >= 0) & (ids < self.limit)
    z = self.product(jnp.take(self.head, jnp.clip(ids, 0, self.vocab - 1), axis=1))
    return jnp.where(ok, z, -jnp.inf)

  def full(self) -> jax.Array:
    """The materialised [..., V] float32 logits (the unchunked path; tests)."""
    return self.columns(jnp.arange(self.vocab))


def side_logits(hidden: jax.Array, head: jax.Array, spec: HeadSpec | None) -> Logits:
  """A model's own logits (Transformer.logits) from its final normed states and LM head."""
  spec = spec or HeadSpec()
  return Logits(hidden, head, spec.softcap, spec.valid, "hidden")


def projected_logits(hidden: jax.Array, head: jax.Array, valid: int | None) -> Logits:
  """DSKD-style logits project_head(h, W) with another model's −inf rows (like_vocab_mask)."""
  return Logits(hidden, head, None, valid, "head")


# --------------------------------------------------------------------------------------------
# The scan over chunks
# --------------------------------------------------------------------------------------------


class Layout(NamedTuple):
  """nc chunks of width C over a vocabulary of V ids (nc·C ≥ V); chunk j = ids i·nc + j."""
  vocab: int
  n_chunks: int
  width: int

  def ids(self, j: jax.Array) -> jax.Array:
    """The vocabulary ids [C] int32 of chunk j (ids ≥ vocab are padding)."""
    return jnp.arange(self.width, dtype=jnp.int32) * self.n_chunks + j

  def to_vocab(self, per_chunk: jax.Array) -> jax.Array:
    """[nc, C, ...] values per (chunk, slot) -> [V, ...] in vocabulary order."""
    x = jnp.swapaxes(per_chunk, 0, 1)                       # [C, nc, ...]: id = i·nc + j
    return x.reshape((self.n_chunks * self.width,) + per_chunk.shape[2:])[:self.vocab]


def layout(vocab: int, chunk: int) -> Layout:
  """Chunks of at most `chunk` ids; the number of chunks is the smallest one ≥ ⌈V/chunk⌉ (up to
  twice that) that divides V, so no padding is needed when possible."""
  if chunk < 1:
    raise ValueError(f"vocab chunk must be >= 1, got {chunk}")
  nc = max(1, math.ceil(vocab / chunk))
  for cand in range(nc, 2 * nc + 1):
    if vocab % cand == 0:
      return Layout(vocab, cand, vocab // cand)
  return Layout(vocab, nc, math.ceil(vocab / nc))


def _strided_head(head: jax.Array, lay: Layout) -> jax.Array:
  """[D, V] -> [D, C, nc] (zero columns appended up to nc·C); [:, :, j] is chunk j."""
  pad = lay.n_chunks * lay.width - head.shape[-1]
  if pad:
    head = jnp.pad(head, ((0, 0), (0, pad)))
  return head.reshape(head.shape[0], lay.width, lay.n_chunks)


def chunk_fn(lg: Logits, lay: Layout) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """fn(j, ids) -> lg's logits of chunk j, [..., C] float32 (−inf past the valid size)."""
  if lg.vocab != lay.vocab:
    raise ValueError(f"logits over {lg.vocab} ids in a scan over {lay.vocab}")
  w3 = _strided_head(lg.head, lay)

  def fn(j, ids):
    w = jax.lax.dynamic_index_in_dim(w3, j, axis=2, keepdims=False)        # [D, C]
    return jnp.where(ids < lg.limit, lg.product(w), -jnp.inf)
  return fn


Source = Callable[[jax.Array, jax.Array], jax.Array]


def vocab_scan(step: Callable, init: Any, sources: Sequence[Logits | Source], lay: Layout):
  """Folds step(carry, zs, ids) -> (carry, y) over the chunks of `lay`.

  sources: Logits (or ready fn(j, ids) -> [..., C] chunk logits); zs is the tuple of their chunk
  logits [..., C] float32, ids [C] the chunk's vocabulary ids. Returns (carry, ys [nc, ...]).
  The body is rematerialised in the backward pass (no chunk logits are stored).
  """
  fns = [s if callable(s) and not isinstance(s, Logits) else chunk_fn(s, lay) for s in sources]

  def body(carry, j):
    ids = lay.ids(j)
    return step(carry, tuple(f(j, ids) for f in fns), ids)

  return jax.lax.scan(jax.checkpoint(body), init, jnp.arange(lay.n_chunks, dtype=jnp.int32))


# --------------------------------------------------------------------------------------------
# Pass-1 statistics
# --------------------------------------------------------------------------------------------


def _lse_init(shape) -> tuple[jax.Array, jax.Array]:
  return jnp.full(shape, -jnp.inf, F32), jnp.zeros(shape, F32)


def _lse_update(state, z):
  """Online log-sum-exp: state (m running max (stop-gradient), s Σ exp(z − m)); z [..., C]."""
  m, s = state
  m_new = jnp.maximum(m, sg(jnp.max(z, axis=-1)))
  shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(z - shift[..., None]), axis=-1)
  return m_new, s


def _lse_final(state) -> jax.Array:
  """log Σ exp from the online state; an all −inf row gives 0 (log_probs then gives −inf)."""
  m, s = state
  return jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(s > 0, s, 1.0))


def _lse_or_neginf(state) -> jax.Array:
  """log Σ exp, −inf (zero gradient) where nothing finite was seen."""
  return jnp.where(state[1] > 0, _lse_final(state), -jnp.inf)


def log_normalisers(sources: Sequence[Logits | Source], temperatures: Sequence[float],
                    lay: Layout, lead: tuple[int, ...]) -> tuple[jax.Array, ...]:
  """log Σ_v exp(z_v / τ_k) per position for each source k: tuple of [...] float32."""
  taus = [float(t) for t in temperatures]

  def step(carry, zs, ids):
    return tuple(_lse_update(c, z / t) for c, z, t in zip(carry, zs, taus)), None

  carry, _ = vocab_scan(step, tuple(_lse_init(lead) for _ in sources), sources, lay)
  return tuple(_lse_final(c) for c in carry)


def _lead(lg: Logits) -> tuple[int, ...]:
  return lg.hidden.shape[:-1]


def cross_entropy(lg: Logits, labels: jax.Array, chunk: int, *, with_argmax: bool = False):
  """−log softmax(logits)[label] per position, [...] float32 (τ = 1), in one scan.

  labels [...] int (clipped to [0, V)). With with_argmax also returns argmax_v logits [...]
  int32 (first maximal id, as jnp.argmax).
  """
  lay = layout(lg.vocab, chunk)
  lead = _lead(lg)
  labels = jnp.clip(labels, 0, lg.vocab - 1)

  def step(carry, zs, ids):
    state, picked, best, best_id = carry
    z = zs[0]
    state = _lse_update(state, z)
    picked = picked + jnp.sum(jnp.where(ids == labels[..., None], z, 0.0), axis=-1)
    zc = sg(z)
    cmax = jnp.max(zc, axis=-1)
    cid = jnp.min(jnp.where(zc == cmax[..., None], ids, jnp.iinfo(jnp.int32).max), axis=-1)
    better = (cmax > best) | ((cmax == best) & (cid < best_id))
    return (state, picked, jnp.where(better, cmax, best), jnp.where(better, cid, best_id)), None

  init = (_lse_init(lead), jnp.zeros(lead, F32), jnp.full(lead, -jnp.inf, F32),
          jnp.full(lead, jnp.iinfo(jnp.int32).max, jnp.int32))
  (state, picked, _, best_id), _ = vocab_scan(step, init, [lg], lay)
  ce = _lse_final(state) - picked
  if with_argmax:
    return ce, jnp.where(best_id < lg.vocab, best_id, 0)
  return ce


# --------------------------------------------------------------------------------------------
# Divergences
# --------------------------------------------------------------------------------------------


def divergence(name: str, student: Logits | Source, teacher: Logits | Source, *,
               temperature: float, chunk: int, vocab: int | None = None,
               lead: tuple[int, ...] | None = None, **params) -> jax.Array:
  """Per-position D(student ‖ sg(teacher)) at τ, [...] float32: losses.divergences.token_divergence
  of the two logits, in chunks (pass 1: both log-normalisers, pass 2: Σ of the divergence's
  columns; AKL: the head/tail weights from `akl_weights`). The teacher is stop-gradient
  (a Logits is stopped here; a Source fn must already be). vocab / lead: needed when both are
  Source fns."""
  if isinstance(teacher, Logits):
    teacher = teacher.stop_gradient()
  ref = student if isinstance(student, Logits) else teacher
  vocab = vocab if vocab is not None else ref.vocab
  lead = lead if lead is not None else _lead(ref)
  lay = layout(vocab, chunk)
  tau = float(temperature)
  l_s, l_t = log_normalisers([student, teacher], [tau, tau], lay, lead)
  l_t = sg(l_t)
  cols = dv.divergence_columns(name if name != "akl" else "fkl_rkl", **params)

  def step(carry, zs, ids):
    lq = zs[0] / tau - l_s[..., None]
    lp = zs[1] / tau - l_t[..., None]
    return tuple(c + jnp.sum(part, axis=-1) for c, part in zip(carry, cols.parts(lq, lp))), None

  init = tuple(jnp.zeros(lead, F32) for _ in range(cols.n_parts))
  sums, _ = vocab_scan(step, init, [student, teacher], lay)
  if name == "akl":
    w_fkl, w_rkl = akl_weights(_stopped(student), teacher, l_s, l_t, lay, lead, tau,
                               mu=float(params.get("mu", 0.5)))
    return w_fkl * sums[0] + w_rkl * sums[1]
  return cols.combine(sums)


def _stopped(src: Logits | Source) -> Logits | Source:
  """src under stop_gradient."""
  if isinstance(src, Logits):
    return src.stop_gradient()
  return lambda j, ids: sg(src(j, ids))


def _key_bits(p: jax.Array) -> jax.Array:
  """float32 p ≥ 0 -> int32 keys with the same order (the IEEE bit pattern)."""
  return jax.lax.bitcast_convert_type(jnp.maximum(p, 0.0).astype(F32), jnp.int32)


def akl_weights(student, teacher, l_s, l_t, lay: Layout, lead, tau: float, *, mu: float
                ) -> tuple[jax.Array, jax.Array]:
  """AKL's (w_fkl, w_rkl) [...] float32 (stop-gradient) without a full-vocabulary sort.

  The head of divergences.akl_weights is the teacher's top tokens (descending p, ties by id)
  whose preceding mass is < μ: every token with p above a threshold t_a, plus the first
  ⌈(μ − M_>)/t_a⌉ (by id) of those with p = t_a, M_> the mass above t_a. t_a is the largest p
  with Σ_{p_u ≥ p} p_u ≥ μ, found exactly by a radix search on the float32 bit pattern of p:
  4 passes of 256-bin mass histograms (8 bits each, a scatter-add per chunk), then a pass
  counting ties per chunk slot and a pass summing the gaps |p − q|. Boundary tokens can differ
  from the sorted cumulative sum only where their preceding mass is within float32 rounding of μ.
  """
  l_s, l_t = sg(l_s), sg(l_t)
  n_bins = 256
  n_rows = int(np.prod(lead)) if lead else 1
  rows = jnp.arange(n_rows)[:, None]

  def probs(zs):
    p = jnp.exp(sg(zs[1]) / tau - l_t[..., None])
    q = jnp.exp(sg(zs[0]) / tau - l_s[..., None])
    return p, q, _key_bits(p)

  prefix = jnp.zeros(lead, jnp.int32)      # the high bits of t_a's key found so far
  above = jnp.zeros(lead, F32)             # mass of tokens whose key is above t_a's group
  found = None                             # Σ p ≥ μ (else every token is in the head)
  for shift in (24, 16, 8, 0):
    high = shift + 8

    def hist_step(hist, zs, ids, shift=shift, high=high, prefix=prefix):
      p, _, key = probs(zs)
      if high < 32:
        in_group = (key >> high) == (prefix >> high)[..., None]
        p = jnp.where(in_group, p, 0.0)
      bins = (key >> shift) & (n_bins - 1)
      flat = hist.reshape(n_rows, n_bins).at[rows, bins.reshape(n_rows, -1)].add(
          p.reshape(n_rows, -1))
      return flat.reshape(hist.shape), None

    hist, _ = vocab_scan(hist_step, jnp.zeros(lead + (n_bins,), F32), [student, teacher], lay)
    # suffix[k] = above + Σ_{k' ≥ k} hist[k']; t_a lies in the largest bin k with suffix ≥ μ
    suffix = above[..., None] + jnp.flip(jnp.cumsum(jnp.flip(hist, -1), -1), -1)
    k_a = jnp.max(jnp.where(suffix >= mu, jnp.arange(n_bins), -1), axis=-1)
    if found is None:
      found = k_a >= 0
    k_a = jnp.maximum(k_a, 0)
    above = above + jnp.sum(jnp.where(jnp.arange(n_bins) > k_a[..., None], hist, 0.0), -1)
    prefix = prefix | (k_a << shift)
  t_a = jax.lax.bitcast_convert_type(prefix, F32)
  n_head_ties = jnp.where(t_a > 0, jnp.ceil((mu - above) / jnp.where(t_a > 0, t_a, 1.0)), 1.0)
  n_head_ties = jnp.maximum(n_head_ties, 1.0)

  # ties (p = t_a) in id order: id i·nc + j has rank Σ_{i' < i} T[i'] + #{j' < j: tie at i}, with
  # T[i] the number of ties at slot i over all chunks (first pass), the second count carried
  # through the chunks in order j (second pass)
  def tie_step(count, zs, ids):
    return count + (probs(zs)[2] == prefix[..., None]).astype(jnp.int32), None

  per_slot, _ = vocab_scan(tie_step, jnp.zeros(lead + (lay.width,), jnp.int32),
                           [student, teacher], lay)
  before = jnp.cumsum(per_slot, axis=-1) - per_slot

  def gap_step(carry, zs, ids):
    g_head, g_tail, seen = carry
    p, q, key = probs(zs)
    gap = jnp.abs(p - q)
    tie = key == prefix[..., None]
    head = (key > prefix[..., None]) | (tie & ((before + seen) < n_head_ties[..., None]))
    head = head | ~found[..., None]
    return (g_head + jnp.sum(jnp.where(head, gap, 0.0), -1),
            g_tail + jnp.sum(jnp.where(head, 0.0, gap), -1), seen + tie.astype(jnp.int32)), None

  init = (jnp.zeros(lead, F32), jnp.zeros(lead, F32), jnp.zeros(lead + (lay.width,), jnp.int32))
  (g_head, g_tail, _), _ = vocab_scan(gap_step, init, [student, teacher], lay)
  total = g_head + g_tail
  w_fkl = jnp.where(total > 0, g_head / jnp.where(total > 0, total, 1.0), 0.5)
  return sg(w_fkl), sg(1.0 - w_fkl)


# --------------------------------------------------------------------------------------------
# Top-k pieces (kd_topk, MultiLevelOT)
# --------------------------------------------------------------------------------------------


def running_top_k(lg: Logits | Source, k: int, lay: Layout, lead, *, scale: float = 1.0
                  ) -> tuple[jax.Array, jax.Array]:
  """The k largest logits·scale per position and their ids ([..., k] float32, int32), descending,
  ties by the smaller id (as lax.top_k over the full vocabulary); stop-gradient values."""
  def step(carry, zs, ids):
    vals, top = carry
    z = sg(zs[0]) * scale
    all_v = jnp.concatenate([vals, z], axis=-1)
    all_i = jnp.concatenate([top, jnp.broadcast_to(ids, z.shape)], axis=-1)
    neg, idx = jax.lax.sort((-all_v, all_i), dimension=-1, num_keys=2)
    return (-neg[..., :k], idx[..., :k]), None

  init = (jnp.full(lead + (k,), -jnp.inf, F32),
          jnp.full(lead + (k,), jnp.iinfo(jnp.int32).max, jnp.int32))
  (vals, top), _ = vocab_scan(step, init, [lg], lay)
  return vals, top


def gather_and_rest(sources: Sequence[Logits | Source], top: jax.Array, scales, lay: Layout,
                    lead) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """For each source: its logits·scale at the ids `top` [..., k] ([..., k] float32) and the
  log Σ exp(logits·scale) over the ids not in `top` ([...], −inf if none finite)."""
  k = top.shape[-1]
  n_rows = int(np.prod(lead)) if lead else 1
  rows = jnp.arange(n_rows)[:, None]
  chunk_of, slot_of = top % lay.n_chunks, top // lay.n_chunks

  def step(carry, zs, ids):
    j = ids[0]                                  # chunk j's first id is j
    here = chunk_of == j                        # [..., k]
    slot = jnp.where(here, slot_of, 0)
    out = []
    for (picked, rest), z, sc in zip(carry, zs, scales):
      z = z * sc
      got = jnp.take_along_axis(z, slot, axis=-1)
      picked = jnp.where(here, got, picked)
      in_top = jnp.zeros((n_rows, lay.width), bool).at[rows, slot.reshape(n_rows, k)].max(
          here.reshape(n_rows, k)).reshape(z.shape)                          # [..., C]
      rest = _lse_update(rest, jnp.where(in_top, -jnp.inf, z))
      out.append((picked, rest))
    return tuple(out), None

  init = tuple((jnp.zeros(lead + (k,), F32), _lse_init(lead)) for _ in sources)
  carry, _ = vocab_scan(step, init, sources, lay)
  return tuple(c[0] for c in carry), tuple(_lse_or_neginf(c[1]) for c in carry)


# --------------------------------------------------------------------------------------------
# MinED: teacher logits moved into the student vocabulary, chunk by chunk
# --------------------------------------------------------------------------------------------


def mined_table(vocab_map: np.ndarray, lay: Layout) -> tuple[np.ndarray, np.ndarray]:
  """Host-side: for each student chunk j, the teacher ids mapped into it and their slot in the
  chunk, padded to one width K (teacher id −1, slot C): ([nc, K] int32, [nc, K] int32).

  vocab_map [Vt] int (teacher id -> student id; ids outside [0, Vs) are dropped)."""
  vmap = np.asarray(vocab_map).astype(np.int64)
  ok = (vmap >= 0) & (vmap < lay.vocab)
  t_ids = np.nonzero(ok)[0]
  s_ids = vmap[ok]
  chunk, slot = s_ids % lay.n_chunks, s_ids // lay.n_chunks
  counts = np.bincount(chunk, minlength=lay.n_chunks)
  k = max(1, int(counts.max()) if len(counts) else 1)
  ids = np.full((lay.n_chunks, k), -1, np.int32)
  slots = np.full((lay.n_chunks, k), lay.width, np.int32)
  order = np.argsort(chunk, kind="stable")
  start = np.concatenate([[0], np.cumsum(counts)[:-1]])
  for j in range(lay.n_chunks):
    sel = order[start[j]:start[j] + counts[j]]
    ids[j, :len(sel)] = t_ids[sel]
    slots[j, :len(sel)] = slot[sel]
  return ids, slots


def mined_source(teacher: Logits, table: tuple[np.ndarray, np.ndarray], lay: Layout,
                 floor: float) -> Source:
  """fn(j, ids) -> [..., C]: max of the teacher's logits over the teacher ids mapped to each
  student id of chunk j, floored at `floor` (−inf at padded student ids); stop-gradient."""
  teacher = teacher.stop_gradient()
  t_ids, slots = jnp.asarray(table[0]), jnp.asarray(table[1])

  def fn(j, ids):
    z = teacher.columns(t_ids[j])                                     # [..., K]
    lead = z.shape[:-1]
    flat = z.reshape(-1, z.shape[-1]).T                               # [K, N]
    out = jax.ops.segment_max(flat, slots[j], num_segments=lay.width + 1)[:lay.width]
    out = jnp.maximum(out.T.reshape(lead + (lay.width,)), floor)
    return jnp.where(ids < lay.vocab, out, -jnp.inf)
  return fn
