"""MinED: teacher -> student vocabulary map by minimum edit distance, and DTW token alignment.

Token strings are compared in their text form (`TokenBytes.text_form`): the bytes the token stands
for, decoded as UTF-8 with stray bytes of split characters kept as one symbol each, and one leading
space (the Ġ / ▁ marker) removed. Edit distance = Levenshtein over code points.

Vocabulary map rule (exact, deterministic): for each non-special teacher token, the non-special
student token minimising (edit distance, 0 if the raw bytes are identical else 1, student id).
Special teacher tokens map to the student token with the same string, else to the student EOS.
Padding rows of the teacher head (ids >= the tokenizer's size) map to the student EOS as well.
The search is exact (`nearest_by_edit_distance`); maps are cached on disk (`build_mined_vocab_map`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import sparse

from cot2align_jax.alignment.spans import TokenBytes, pairs_to_arrays
from cot2align_jax.core.paths import cache_dir as default_cache_dir

MAP_VERSION = b"mined-map-v1"
_PAD = -1  # padding code of the first string of a pair
_PAD2 = -2  # padding code of the second string (never equal to _PAD)


def encode_strings(strings: Sequence[str], pad: int = _PAD) -> tuple[np.ndarray, np.ndarray]:
  """Code points of each string: (codes [N, M] int32 padded with `pad`, lengths [N] int64)."""
  lens = np.array([len(s) for s in strings], dtype=np.int64)
  width = int(lens.max(initial=0))
  codes = np.full((len(strings), max(width, 1)), pad, dtype=np.int32)
  flat = np.frombuffer("".join(strings).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
  if len(flat):
    rows = np.repeat(np.arange(len(strings)), lens)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    codes[rows, cols] = flat.astype(np.int32)
  return codes, lens


def edit_distances(a: np.ndarray, a_len: np.ndarray, b: np.ndarray,
                   b_len: np.ndarray) -> np.ndarray:
  """Levenshtein distance of row pairs: a [P or 1, Ma], b [P, Mb] code arrays -> [P] int64.

  Padding codes of `a` and `b` must differ (see `encode_strings`). One DP row per character of `a`;
  inside a row, the insertion chain cur[j] = min(x[j], cur[j-1] + 1) is solved in one step as
  j + running-min(x[k] - k).
  """
  a = np.asarray(a)
  b = np.asarray(b)
  n_pairs = len(b)
  a_len = np.broadcast_to(np.asarray(a_len, dtype=np.int64), (n_pairs,))
  b_len = np.asarray(b_len, dtype=np.int64)
  width = b.shape[1]
  cols = np.arange(width + 1, dtype=np.int64)
  prev = np.broadcast_to(cols, (n_pairs, width + 1)).copy()
  out = np.take_along_axis(prev, b_len[:, None], axis=1)[:, 0].copy()
  rows = int(a_len.max(initial=0))
  for i in range(1, rows + 1):
    sub = prev[:, :-1] + (a[:, i - 1:i] != b)
    x = np.empty_like(prev)
    x[:, 0] = i
    np.minimum(prev[:, 1:] + 1, sub, out=x[:, 1:])
    cur = np.minimum.accumulate(x - cols, axis=1) + cols
    done = a_len == i
    if done.any():
      out[done] = cur[done, b_len[done]]
    prev = cur
  return out


def _levels_search(q_codes: np.ndarray, n: int, lower: np.ndarray, upper: np.ndarray,
                   cand_codes: np.ndarray, cand_len: np.ndarray, cand_key: np.ndarray) -> int:
  """Position of the candidate with minimal (edit distance, key) for one query.

  lower [C], upper [C]: bounds of the distances (where lower == upper the distance is known
  without DP); cand_key [C]: distinct tie-break keys. Candidates are visited by increasing lower
  bound until it exceeds the best distance found.
  """
  best, best_key, best_pos = np.iinfo(np.int32).max, np.iinfo(np.int64).max, -1
  level = int(lower.min()) - 1
  while level < best:
    level += 1
    idx = np.flatnonzero(lower == level)
    if level == best:
      idx = idx[cand_key[idx] < best_key]
    if not len(idx):
      continue
    dist = upper[idx].copy()
    need = np.flatnonzero(lower[idx] < upper[idx])
    if len(need):
      sel = idx[need]
      width = int(cand_len[sel].max())
      dist[need] = edit_distances(q_codes[None, :max(n, 1)], n, cand_codes[sel, :max(width, 1)],
                                  cand_len[sel])
    low = dist.min()
    tied = idx[dist == low]
    k = int(tied[np.argmin(cand_key[tied])])
    if low < best or (low == best and cand_key[k] < best_key):
      best, best_key, best_pos = int(low), int(cand_key[k]), k
  return best_pos


def _char_features(strings: Sequence[str], vocab: dict | None = None):
  """Multiset features: (char, k) present when the char occurs at least k times.

  Returns (rows, cols) of a binary matrix and the feature vocabulary; with a given `vocab`,
  features not in it are dropped (they cannot be shared).
  """
  grow = vocab is None
  vocab = {} if grow else vocab
  rows, cols = [], []
  for r, s in enumerate(strings):
    seen: dict[str, int] = {}
    for ch in s:
      k = seen.get(ch, 0) + 1
      seen[ch] = k
      f = vocab.get((ch, k))
      if f is None:
        if not grow:
          continue
        f = vocab[(ch, k)] = len(vocab)
      rows.append(r)
      cols.append(f)
  return np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64), vocab


def nearest_by_edit_distance(queries: Sequence[str], cands: Sequence[str],
                             batch: int = 64) -> np.ndarray:
  """For each query, the index of the candidate of minimum edit distance (ties: smallest index).

  queries [Q] str, cands [C] str (C >= 1). Returns [Q] int64. Exact.

  Candidates are sorted by length: since ed(q, s) >= |s| - |q| and some candidate is within
  max(|q|, shortest) of q, a query of length n only looks at candidates of length <= n +
  max(n, shortest). Queries are processed in batches of similar length.
  """
  if not len(cands):
    raise ValueError("no candidates")
  lens = np.array([len(c) for c in cands], dtype=np.int64)
  order = np.lexsort((np.arange(len(cands)), lens))  # by length, then index
  cands = [cands[i] for i in order]
  c_codes, c_len = encode_strings(cands, pad=_PAD2)
  c_len32 = c_len.astype(np.int32)
  shortest = int(c_len[0])
  r, c, vocab = _char_features(cands)
  c_feat = sparse.csr_matrix((np.ones(len(r), np.float32), (r, c)),
                             shape=(len(cands), max(len(vocab), 1)))
  q_order = np.argsort([len(q) for q in queries], kind="stable")
  out = np.zeros(len(queries), dtype=np.int64)
  for lo in range(0, len(queries), batch):
    rows = q_order[lo:lo + batch]
    chunk = [queries[i] for i in rows]
    q_codes, q_len = encode_strings(chunk, pad=_PAD)
    reach = np.searchsorted(c_len, q_len + np.maximum(q_len, shortest), side="right")
    qr, qc, _ = _char_features(chunk, vocab)
    q_dense = np.zeros((c_feat.shape[1], len(chunk)), dtype=np.float32)
    q_dense[qc, qr] = 1.0
    common = (c_feat[:int(reach.max())] @ q_dense).astype(np.int32)  # [C', batch], exact
    for k in range(len(chunk)):
      n, hi = int(q_len[k]), int(reach[k])
      upper = np.maximum(c_len32[:hi], n)
      lower = upper - common[:hi, k]
      pos = _levels_search(q_codes[k], n, lower, upper, c_codes[:hi], c_len[:hi], order[:hi])
      out[rows[k]] = order[pos]
  return out


def nearest_bruteforce(queries: Sequence[str], cands: Sequence[str]) -> np.ndarray:
  """Reference for `nearest_by_edit_distance`: every distance computed (for tests)."""
  c_codes, c_len = encode_strings(cands, pad=_PAD2)
  out = np.zeros(len(queries), dtype=np.int64)
  for k, q in enumerate(queries):
    q_codes, q_len = encode_strings([q], pad=_PAD)
    dist = edit_distances(q_codes, q_len, c_codes, c_len)
    out[k] = int(np.argmin(dist))
  return out


def mined_map(teacher: TokenBytes, student: TokenBytes,
              teacher_ids: Sequence[int] | None = None,
              student_ids: Sequence[int] | None = None,
              search=nearest_by_edit_distance) -> np.ndarray:
  """Student id for each teacher id in `teacher_ids` (default: all) -> [len] int32.

  Candidates are the non-special ids of `student_ids` (default: all). See the module docstring for
  the rule. `search` is the nearest-string routine (the brute force in tests).
  """
  t_ids = np.arange(len(teacher)) if teacher_ids is None else np.asarray(teacher_ids, np.int64)
  s_ids = np.arange(len(student)) if student_ids is None else np.asarray(student_ids, np.int64)
  s_ids = np.unique(s_ids[~student.special[s_ids]])
  if not len(s_ids):
    raise ValueError("the student vocabulary subset has no regular tokens")
  fallback = student.eos_id if student.eos_id is not None else 0
  by_raw_all = {}
  for sid in range(len(student) - 1, -1, -1):
    by_raw_all[student.pieces[sid]] = sid
  by_raw, by_form = {}, {}
  for sid in s_ids[::-1]:  # descending, so the smallest id wins
    by_raw[student.pieces[sid]] = int(sid)
    by_form[student.text_form(int(sid))] = int(sid)
  out = np.full(len(t_ids), fallback, dtype=np.int64)
  pending: dict[str, list[int]] = {}
  for k, tid in enumerate(t_ids):
    tid = int(tid)
    piece = teacher.pieces[tid]
    if teacher.special[tid]:
      out[k] = by_raw_all.get(piece, fallback)
      continue
    hit = by_raw.get(piece)
    if hit is None:
      hit = by_form.get(teacher.text_form(tid))
    if hit is not None:
      out[k] = hit
    else:
      pending.setdefault(teacher.text_form(tid), []).append(k)
  if pending:
    forms = list(by_form)
    form_ids = np.array([by_form[f] for f in forms], dtype=np.int64)
    order = np.argsort(form_ids, kind="stable")  # candidate index order = student id order
    forms = [forms[i] for i in order]
    form_ids = form_ids[order]
    queries = list(pending)
    nearest = search(queries, forms)
    for q, idx in zip(queries, nearest):
      out[pending[q]] = form_ids[idx]
  return out.astype(np.int32)


def vocab_key(teacher: TokenBytes, student: TokenBytes, teacher_vocab_size: int) -> str:
  """sha256 over both vocabularies (bytes, special flags, EOS) and the map version."""
  h = hashlib.sha256(MAP_VERSION)
  for table in (teacher, student):
    h.update(len(table.pieces).to_bytes(8, "little"))
    for piece in table.pieces:
      h.update(len(piece).to_bytes(4, "little"))
      h.update(piece)
    h.update(np.packbits(table.special).tobytes())
    h.update(str(table.eos_id).encode())
  h.update(str(teacher_vocab_size).encode())
  return h.hexdigest()[:32]


def _atomic_save(path: Path, array: np.ndarray) -> None:
  """np.save to a temporary file beside `path`, then rename over it."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, array)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _as_table(tok: Any) -> TokenBytes:
  return tok if isinstance(tok, TokenBytes) else TokenBytes.from_tokenizer(tok)


def build_mined_vocab_map(teacher_tok: Any, student_tok: Any, cache_dir: str | Path | None = None,
                          *, teacher_vocab_size: int | None = None,
                          info: dict | None = None) -> np.ndarray:
  """`mined_vocab_map` [Vt] int32: teacher id -> student id of minimum edit distance.

  teacher_tok / student_tok: HF fast tokenizers, `tokenizers.Tokenizer`s or `TokenBytes` (a bare
  `tokenizers.Tokenizer` has no EOS: set `TokenBytes.eos_id`, else the fallback id is 0).
  cache_dir: where maps are cached (default `paths.cache_dir() / "mined"`), one `<key>.npy` per
  pair of vocabularies, written atomically. teacher_vocab_size: rows of the teacher's LM head when
  larger than the tokenizer (Qwen: 151936 > 151646); the extra rows map to the student EOS.
  info: if given, filled with seconds, cache_hit, path, n_exact, n_searched.
  """
  t0 = time.perf_counter()
  teacher, student = _as_table(teacher_tok), _as_table(student_tok)
  vt = len(teacher) if teacher_vocab_size is None else int(teacher_vocab_size)
  if vt < len(teacher):
    raise ValueError(f"teacher_vocab_size {vt} < tokenizer size {len(teacher)}")
  folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "mined"
  path = folder / f"{vocab_key(teacher, student, vt)}.npy"
  stats = {"path": str(path), "cache_hit": False}
  result = None
  if path.exists():
    try:
      loaded = np.load(path)
      if loaded.shape == (vt,) and loaded.dtype == np.int32:
        result, stats["cache_hit"] = loaded, True
    except (OSError, ValueError):
      result = None
  if result is None:
    counter = {}

    def search(queries, cands):
      counter["n_searched"] = len(queries)
      return nearest_by_edit_distance(queries, cands)

    mapped = mined_map(teacher, student, search=search)
    fallback = student.eos_id if student.eos_id is not None else 0
    result = np.full(vt, fallback, dtype=np.int32)
    result[:len(mapped)] = mapped
    _atomic_save(path, result)
    stats["n_searched"] = counter.get("n_searched", 0)
  stats["seconds"] = time.perf_counter() - t0
  if info is not None:
    info.update(stats)
  return result


def distance_matrix(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
  """Edit distances between every a[i] and b[j]: [len(a), len(b)] int64 (unique pairs only)."""
  ua, ia = np.unique(np.array(list(a), dtype=object), return_inverse=True)
  ub, ib = np.unique(np.array(list(b), dtype=object), return_inverse=True)
  ua, ub = [str(s) for s in ua], [str(s) for s in ub]
  a_codes, a_len = encode_strings(ua, pad=_PAD)
  b_codes, b_len = encode_strings(ub, pad=_PAD2)
  grid = np.zeros((len(ua), len(ub)), dtype=np.int64)
  a_bucket = np.ceil(np.log2(np.maximum(a_len, 1))).astype(int)
  b_bucket = np.ceil(np.log2(np.maximum(b_len, 1))).astype(int)
  for ga in np.unique(a_bucket):
    ra = np.flatnonzero(a_bucket == ga)
    wa = max(int(a_len[ra].max()), 1)
    for gb in np.unique(b_bucket):
      rb = np.flatnonzero(b_bucket == gb)
      wb = max(int(b_len[rb].max()), 1)
      pa = np.repeat(ra, len(rb))
      pb = np.tile(rb, len(ra))
      d = edit_distances(a_codes[pa, :wa], a_len[pa], b_codes[pb, :wb], b_len[pb])
      grid[pa, pb] = d
  return grid[np.ravel(ia)][:, np.ravel(ib)]


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
  """Minimum-cost monotone path through cost [n, m] from (0, 0) to (n-1, m-1).

  Steps (1,1), (1,0), (0,1); among paths of equal cost the one with fewest steps (most diagonal,
  so most 1:1 pairs) wins. Rows are filled in one vector step each: D[i, j] = cs[j] +
  running-min(a[k] - cs[k]) with cs the row's cumulative cost and a[k] the cost entering from row
  i-1. Backtracking prefers the diagonal, then (i-1, j), then (i, j-1).
  """
  cost = np.asarray(cost, dtype=np.int64)
  n, m = cost.shape
  if n == 0 or m == 0:
    return []
  if cost.min() < 0:
    raise ValueError("DTW costs must be non-negative")
  cost = cost * (n + m) + 1  # lexicographic (total cost, number of steps): equal cost -> shorter
  big = np.iinfo(np.int64).max // 4
  acc = np.empty((n, m), dtype=np.int64)
  acc[0] = np.cumsum(cost[0])
  for i in range(1, n):
    up = acc[i - 1]
    diag = np.concatenate([[big], acc[i - 1, :-1]])
    enter = cost[i] + np.minimum(up, diag)
    cs = np.cumsum(cost[i])
    acc[i] = cs + np.minimum.accumulate(enter - cs)
  path = [(n - 1, m - 1)]
  i, j = n - 1, m - 1
  while i > 0 or j > 0:
    steps = [(i - 1, j - 1), (i - 1, j), (i, j - 1)]
    steps = [(a, b) for a, b in steps if a >= 0 and b >= 0]
    i, j = min(steps, key=lambda p: acc[p])
    path.append((i, j))
  return path[::-1]


def dtw_align(student_tokens: Sequence[str],
              teacher_tokens: Sequence[str]) -> list[tuple[int, int]]:
  """DTW path [(i, j), ...] between two token-string sequences (edit-distance cost).

  Pass text forms (`TokenBytes.text_forms`: space marker already stripped). Monotone, starts at
  (0, 0), ends at (len-1, len-1); [] if either side is empty.
  """
  if not len(student_tokens) or not len(teacher_tokens):
    return []
  return dtw_path(distance_matrix(student_tokens, teacher_tokens))


def one_to_one(path: Sequence[tuple[int, int]]) -> np.ndarray:
  """Pairs [P, 2] of a path where i appears once and j appears once (the 1:1 steps)."""
  p = np.asarray(path, dtype=np.int64).reshape(-1, 2)
  if not len(p):
    return p
  ci = np.bincount(p[:, 0])[p[:, 0]]
  cj = np.bincount(p[:, 1])[p[:, 1]]
  return p[(ci == 1) & (cj == 1)]


def mined_arrays(student_forms: Sequence[str | None], teacher_forms: Sequence[str | None],
                 student_mask: Any, teacher_mask: Any, L_s: int) -> tuple[np.ndarray, np.ndarray]:
  """`main/align/mined_pos` and `mined_mask` ([L_s] int32 each) of one sequence.

  student_forms [ns], teacher_forms [nt]: text form of each *label* token (`TokenBytes.text_forms
  (labels)`; None for special tokens such as EOS). The masks are the loss masks. DTW runs over the
  masked labels with text on each side; student label i gets the teacher label j where the path
  is 1:1; the final masked labels are paired when both are textless (EOS <-> EOS).
  """
  sm = np.asarray(student_mask).reshape(-1)[:len(student_forms)].astype(bool)
  tm = np.asarray(teacher_mask).reshape(-1)[:len(teacher_forms)].astype(bool)
  s_pos = [i for i in np.flatnonzero(sm) if student_forms[i] is not None]
  t_pos = [j for j in np.flatnonzero(tm) if teacher_forms[j] is not None]
  path = dtw_align([student_forms[i] for i in s_pos], [teacher_forms[j] for j in t_pos])
  pairs = one_to_one(path)
  pairs = np.stack([np.asarray(s_pos, np.int64)[pairs[:, 0]],
                    np.asarray(t_pos, np.int64)[pairs[:, 1]]], axis=1) if len(pairs) else pairs
  s_last = np.flatnonzero(sm)
  t_last = np.flatnonzero(tm)
  if len(s_last) and len(t_last):
    i, j = int(s_last[-1]), int(t_last[-1])
    if student_forms[i] is None and teacher_forms[j] is None:
      pairs = np.concatenate([pairs.reshape(-1, 2), [[i, j]]])
  return pairs_to_arrays(pairs, sm, tm, L_s)
