"""MinED vocabulary map (exact, against brute force), its disk cache, and DTW alignment."""

import random

import numpy as np
import pytest

from cot2align_jax.alignment import mined
from cot2align_jax.alignment.mined import (build_mined_vocab_map, distance_matrix, dtw_align,
                                           dtw_path, edit_distances, encode_strings, mined_arrays,
                                           mined_map, nearest_bruteforce, nearest_by_edit_distance,
                                           one_to_one)
from cot2align_jax.alignment.spans import TokenBytes


def levenshtein(a, b):
  """Plain two-row Levenshtein, the reference for the vectorised kernel."""
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def random_strings(rng, n, alphabet="abcé日\udce6 ", max_len=8):
  return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len))) for _ in range(n)]


@pytest.fixture(scope="module")
def tables(shared):
  """name -> TokenBytes for qwen1.5 (teacher) and gpt2 (student), loaded once."""
  # heavy import, needed only for this reference
  from transformers import AutoTokenizer
  return {name: TokenBytes.from_tokenizer(AutoTokenizer.from_pretrained(
    str(shared / "tokenizers" / name))) for name in ("qwen1.5", "gpt2")}


def test_edit_distance_kernel_matches_reference():
  rng = random.Random(0)
  a, b = random_strings(rng, 400), random_strings(rng, 400, max_len=11)
  ac, al = encode_strings(a, pad=-1)
  bc, bl = encode_strings(b, pad=-2)
  got = edit_distances(ac, al, bc, bl)
  assert got.tolist() == [levenshtein(x, y) for x, y in zip(a, b)]
  grid = distance_matrix(a[:30], b[:40])
  assert grid.tolist() == [[levenshtein(x, y) for y in b[:40]] for x in a[:30]]


def test_nearest_matches_bruteforce_on_random_strings():
  rng = random.Random(1)
  queries, cands = random_strings(rng, 150), random_strings(rng, 500, max_len=10)
  fast = nearest_by_edit_distance(queries, cands, batch=32)
  assert fast.tolist() == nearest_bruteforce(queries, cands).tolist()
  # brute force by the plain reference too, on a few
  for q, k in list(zip(queries, fast))[:20]:
    dists = [levenshtein(q, c) for c in cands]
    assert k == dists.index(min(dists))


def test_mined_map_equals_bruteforce_on_real_vocab_sample(tables):
  teacher, student = tables["qwen1.5"], tables["gpt2"]
  rng = np.random.default_rng(0)
  regular = np.flatnonzero(~teacher.special)
  t_ids = np.concatenate([rng.choice(regular, 300, replace=False), np.flatnonzero(teacher.special)])
  s_ids = np.sort(rng.choice(len(student), 2000, replace=False))
  fast = mined_map(teacher, student, t_ids, s_ids)
  slow = mined_map(teacher, student, t_ids, s_ids, search=nearest_bruteforce)
  assert fast.dtype == np.int32 and fast.tolist() == slow.tolist()
  assert np.array_equal(fast, mined_map(teacher, student, t_ids, s_ids))  # deterministic
  # the rule itself, checked on the first 60 regular teacher tokens of the sample
  cands = [int(s) for s in s_ids if not student.special[s]]
  for tid, sid in list(zip(t_ids, fast))[:60]:
    q = teacher.text_form(tid)
    key = [(levenshtein(q, student.text_form(c)), student.pieces[c] != teacher.pieces[tid], c)
           for c in cands]
    assert sid == min(key)[2]


def test_mined_map_rules(tables):
  teacher, student = tables["qwen1.5"], tables["gpt2"]
  enc = lambda s: [k for k, p in enumerate(teacher.pieces) if p == s.encode()][0]
  senc = lambda s: [k for k, p in enumerate(student.pieces) if p == s.encode()][0]
  t_ids = [enc(" the"), enc("the"), enc("<|endoftext|>"), enc("<|im_start|>")]
  got = mined_map(teacher, student, t_ids).tolist()
  # identical bytes win over a smaller id with the same stripped form; specials by string / EOS
  assert got == [senc(" the"), senc("the"), 50256, 50256]


def test_cache_roundtrip_without_recompute(tables, tmp_path, monkeypatch):
  full_t, full_s = tables["qwen1.5"], tables["gpt2"]
  # small vocabularies cut from the real ones (regular tokens only, plus one EOS)
  t = TokenBytes(pieces=full_t.pieces[1000:1600] + [b"<|endoftext|>"],
                 special=np.r_[np.zeros(600, bool), True], kind="byte_level", eos_id=600)
  s = TokenBytes(pieces=full_s.pieces[2000:3500] + [b"<|endoftext|>"],
                 special=np.r_[np.zeros(1500, bool), True], kind="byte_level", eos_id=1500)
  info = {}
  first = build_mined_vocab_map(t, s, cache_dir=tmp_path, teacher_vocab_size=608, info=info)
  assert not info["cache_hit"] and first.shape == (608,) and first.dtype == np.int32
  assert first[600] == 1500 and np.all(first[601:] == 1500)  # EOS and padding rows
  assert info["seconds"] >= 0 and list(tmp_path.glob("*.tmp")) == []

  def boom(*a, **k):
    raise AssertionError("recomputed despite the cache")

  monkeypatch.setattr(mined, "nearest_by_edit_distance", boom)
  info2 = {}
  second = build_mined_vocab_map(t, s, cache_dir=tmp_path, teacher_vocab_size=608, info=info2)
  assert info2["cache_hit"] and info2["path"] == info["path"] and np.array_equal(first, second)
  # another vocabulary is another key
  s2 = TokenBytes(pieces=s.pieces[:-2] + s.pieces[-1:], special=s.special[1:], kind="byte_level",
                  eos_id=1499)
  assert mined.vocab_key(t, s2, 608) != mined.vocab_key(t, s, 608)


def brute_dtw_cost(cost):
  """Minimal cost over all monotone (1,1)/(1,0)/(0,1) paths, by enumeration."""
  n, m = cost.shape
  best = None
  steps = [(1, 1), (1, 0), (0, 1)]
  def walk(i, j, acc):
    nonlocal best
    acc += cost[i, j]
    if (i, j) == (n - 1, m - 1):
      best = acc if best is None else min(best, acc)
      return
    for di, dj in steps:
      if i + di < n and j + dj < m:
        walk(i + di, j + dj, acc)
  walk(0, 0, 0)
  return best


def check_path(path, n, m):
  assert path[0] == (0, 0) and path[-1] == (n - 1, m - 1)
  for (a, b), (c, d) in zip(path[:-1], path[1:]):
    assert (c - a, d - b) in {(1, 1), (1, 0), (0, 1)}
  assert {i for i, _ in path} == set(range(n)) and {j for _, j in path} == set(range(m))


def test_dtw_matches_bruteforce():
  rng = np.random.default_rng(3)
  for _ in range(40):
    n, m = rng.integers(1, 6, size=2)
    cost = rng.integers(0, 5, size=(n, m))
    path = dtw_path(cost)
    check_path(path, n, m)
    assert sum(cost[i, j] for i, j in path) == brute_dtw_cost(cost)
  a, b = ["Hello", "wor", "ld", "!"], ["Hel", "lo", "world", "!"]
  path = dtw_align(a, b)  # costs 2 + 2 + 3 + 0 on the diagonal; any detour costs more
  grid = np.array([[levenshtein(x, y) for y in b] for x in a])
  assert sum(grid[i, j] for i, j in path) == brute_dtw_cost(grid) == 7
  assert path == [(0, 0), (1, 1), (2, 2), (3, 3)]
  path = dtw_align(["a", "bc", "d"], ["a", "b", "c", "d"])  # "bc" spans "b" and "c"
  assert path in ([(0, 0), (1, 1), (1, 2), (2, 3)], [(0, 0), (0, 1), (1, 2), (2, 3)])
  assert path == dtw_align(["a", "bc", "d"], ["a", "b", "c", "d"])  # deterministic
  # equal total cost: the path with fewer steps wins
  assert dtw_path(np.array([[0, 1], [1, 0]])) == [(0, 0), (1, 1)]
  assert dtw_path(np.zeros((3, 3), int)) == [(0, 0), (1, 1), (2, 2)]
  assert dtw_align([], ["a"]) == []


def test_dtw_long_sequences_and_mined_arrays(tables):
  teacher, student = tables["qwen1.5"], tables["gpt2"]
  rng = random.Random(5)
  words = ["the", " answer", " is", " 42", ".", " naïve", " 日本", "\n", " café", "ing"]
  a = [rng.choice(words) for _ in range(500)]
  b = [rng.choice(words) for _ in range(480)]
  path = dtw_align(a, b)
  check_path(path, 500, 480)
  # mined_arrays: label forms with None for EOS, EOS <-> EOS paired explicitly
  s_forms = ["x", "y", "Hello", "world", None]
  t_forms = ["p", "Hello", "world", None]
  s_mask = np.array([0, 0, 1, 1, 1])
  t_mask = np.array([0, 1, 1, 1])
  pos, mask = mined_arrays(s_forms, t_forms, s_mask, t_mask, L_s=8)
  assert pos.tolist() == [0, 0, 1, 2, 3, 0, 0, 0] and mask.tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
  assert teacher.text_forms([0])[0] == "!" and student.text_form(220) == ""
