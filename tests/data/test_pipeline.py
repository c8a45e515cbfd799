"""The grain pipeline: spec.py batches, buckets, resume, shuffle, sharding, alignment adapter."""

import dataclasses

import numpy as np
import pytest
from transformers import AutoTokenizer

from cot2align_jax.data import pipeline as pl
from cot2align_jax.core import spec


@dataclasses.dataclass
class Rec:
  """A stand-in for data.records.Record."""
  example_id: int
  kind: str
  prompt: str
  response: str
  pair_prompt: str | None = None
  pair_response: str | None = None

  @property
  def has_pair(self):
    return self.pair_prompt is not None


def make_records(n, long_every=0):
  """n records, every third a CoT record with a pair; every `long_every`-th has a long response."""
  recs = []
  for i in range(n):
    resp = f"Answer {i}." + (" more words" * 80 if long_every and i % long_every == 0 else "")
    if i % 3 == 1:
      recs.append(Rec(i, "cot", f"Q{i}: think.\n", f"Step {i}. Therefore, the answer is: {resp}",
                      f"Q{i}:\n", resp))
    else:
      recs.append(Rec(i, "plain", f"Q{i}:\n", resp))
  return recs


@pytest.fixture(scope="module")
def toks(shared):
  """(student gpt2, teacher qwen1.5), loaded once for this module."""
  load = lambda n: AutoTokenizer.from_pretrained(str(shared / "tokenizers" / n))
  return load("gpt2"), load("qwen1.5")


def cfg(**kw):
  base = dict(batch_size=4, seed=1, shard_index=0, shard_count=1, alignment=())
  base.update(kw)
  return pl.PipelineConfig(**base)


def batches(records, toks, **kw):
  return list(pl.Pipeline(records, *toks, cfg(**kw)))


def test_batches_match_spec(toks):
  out = batches(make_records(10), toks)
  assert len(out) == 3
  for b in out:
    assert sorted(b) == sorted(spec.all_keys())
    ls = b[spec.key("main", "student", "input_ids")].shape[1]
    lt = b[spec.key("main", "teacher", "input_ids")].shape[1]
    for k, v in b.items():
      if k in ("has_pair", "example_id"):
        assert v.shape == (4,) and v.dtype == (np.bool_ if k == "has_pair" else np.int32)
      else:
        assert v.dtype == np.int32 and v.shape == (4, lt if "/teacher/" in k else ls), k
  ids = np.concatenate([b["example_id"] for b in out])
  assert sorted(ids[ids >= 0].tolist()) == list(range(10)) and (ids == -1).sum() == 2


def test_rows_content(toks):
  student, teacher = toks
  recs = make_records(6)
  out = batches(recs, toks, batch_size=6, shuffle=False)[0]
  for r, rec in enumerate(recs):
    assert out["has_pair"][r] == rec.has_pair
    n = len(student(rec.prompt + rec.response, add_special_tokens=False)["input_ids"])
    assert out[spec.key("main", "student", "attention_mask")][r].sum() == n  # n + EOS - 1
    lm = out[spec.key("main", "student", "loss_mask")][r]
    lab = out[spec.key("main", "student", "labels")][r]
    assert lab[lm.sum() - 1 + (n - lm.sum())] == student.eos_token_id
    assert (lab[lm == 0] == 0).all()
    pad_ids = out[spec.key("main", "student", "input_ids")][r][n:]
    assert (pad_ids == student.eos_token_id).all()  # gpt2 has no pad token
    assert (out[spec.key("main", "teacher", "input_ids")][r][out[spec.key(
        "main", "teacher", "attention_mask")][r] == 0] == teacher.pad_token_id).all()
    for s in spec.SIDES:
      if not rec.has_pair:
        for f in ("labels", "loss_mask", "attention_mask"):
          assert not out[spec.key("pair", s, f)][r].any()
      else:
        assert out[spec.key("pair", s, "loss_mask")][r].sum() > 0


def test_bucket_lengths(toks):
  short = batches(make_records(8), toks, shuffle=False)
  assert all(b[spec.key("main", "student", "input_ids")].shape[1] == 64 for b in short)
  long = batches(make_records(8, long_every=4), toks, shuffle=False,
                 buckets=(32, 64, 128, 256, 512))
  widths = [b[spec.key("main", "teacher", "labels")].shape[1] for b in long]
  assert all(w in (128, 256) for w in widths)
  with pytest.raises(ValueError, match="largest bucket"):
    pl.PipelineConfig(buckets=(64, 128)).validate()


def test_drop_remainder(toks):
  assert len(batches(make_records(10), toks, drop_remainder=True)) == 2


def test_resume_exactly(toks):
  recs = make_records(23)
  c = cfg(num_epochs=3)
  it = iter(pl.Pipeline(recs, *toks, c))
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(7)]  # crosses the epoch boundary
  fresh = iter(pl.Pipeline(recs, *toks, c))
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for k in spec.all_keys():
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _order(toks, **kw):
  out = batches(make_records(12), toks, batch_size=12, **kw)
  return [int(i) for b in out for i in b["example_id"] if i >= 0]


def test_shuffle_seeded(toks):
  a, b, c = _order(toks, seed=3), _order(toks, seed=3), _order(toks, seed=4)
  assert a == b and a != c and sorted(a) == sorted(c) == list(range(12))
  two = _order(toks, seed=3, num_epochs=2)
  assert two[:12] == a and two[12:] != a and sorted(two[12:]) == list(range(12))


def test_host_sharding(toks):
  """Host i of 5 takes rows [2i, 2i+2) of every global batch of 10: every record once, the same
  batch count on every host (padding rows past the short last batch), and the hosts' batches
  concatenated in order are the one-host global batches."""
  parts = [batches(make_records(12), toks, batch_size=2, shard_index=i, shard_count=5)
           for i in range(5)]
  one = batches(make_records(12), toks, batch_size=10)
  assert {len(p) for p in parts} == {len(one)} == {2}
  flat = [int(i) for p in parts for b in p for i in b["example_id"] if i >= 0]
  assert sorted(flat) == list(range(12))
  for k, b in enumerate(one):
    np.testing.assert_array_equal(np.concatenate([p[k]["example_id"] for p in parts]),
                                  b["example_id"])
  with pytest.raises(ValueError, match="shard index"):
    batches(make_records(3), toks, shard_index=5, shard_count=5)


def test_alignment_adapter_stub(toks, monkeypatch):
  """The adapter places each method's arrays (masked) and zero-fills methods not asked for."""
  def fake_eta(student, teacher, tables, vocab_map):
    n = len(student) - 1
    return np.arange(n) + 1000, np.asarray(student.response_mask[1:])
  def fake_mined(student, teacher, tables, vocab_map):
    n = len(student) - 1
    return np.full(n, 7), np.ones(n)
  monkeypatch.setitem(pl._METHODS, "eta", (fake_eta, "eta_pos", "eta_mask"))
  monkeypatch.setitem(pl._METHODS, "mined", (fake_mined, "mined_pos", "mined_mask"))
  b = batches(make_records(4), toks, shuffle=False, alignment=("eta", "mined"))[0]
  lm = b[spec.key("main", "student", "loss_mask")]
  np.testing.assert_array_equal(b[spec.align_key("eta_mask")], lm)
  pos = b[spec.align_key("eta_pos")]
  assert (pos[lm == 1] >= 1000).all() and (pos[lm == 0] == 0).all()
  am = b[spec.key("main", "student", "attention_mask")]
  np.testing.assert_array_equal(b[spec.align_key("mined_mask")], am)
  np.testing.assert_array_equal(b[spec.align_key("mined_pos")], 7 * am)
  zero = batches(make_records(4), toks, alignment=())[0]
  assert not any(zero[spec.align_key(f)].any() for f in spec.ALIGN_FIELDS)


def test_missing_alignment_method_raises(toks, monkeypatch):
  monkeypatch.setattr(pl, "available_alignments", lambda: ("eta",))
  with pytest.raises(ValueError, match="does not implement"):
    pl.Pipeline(make_records(2), *toks, cfg(alignment=("eta", "mined")))


def test_eta_real(toks):
  """ETA through alignment.spans: paired labels cover the same bytes; EOS pairs with EOS."""
  student, teacher = toks
  rec = Rec(0, "plain", "Q: colour?\n", "The sky is blue. Héllo 😀 wörld, indubitably.")
  b = batches([rec], toks, shuffle=False, alignment=("eta",), batch_size=1)[0]
  m = b[spec.align_key("eta_mask")][0]
  pos = b[spec.align_key("eta_pos")][0]
  ls = b[spec.key("main", "student", "labels")][0]
  lt = b[spec.key("main", "teacher", "labels")][0]
  lm_s = b[spec.key("main", "student", "loss_mask")][0]
  assert m.sum() >= 5 and (m <= lm_s).all()
  for i in np.flatnonzero(m):
    j = pos[i]
    assert b[spec.key("main", "teacher", "loss_mask")][0][j] == 1
    if ls[i] == student.eos_token_id:
      assert lt[j] == teacher.eos_token_id
    else:
      assert student.decode([int(ls[i])]) == teacher.decode([int(lt[j])])
  last = int(np.flatnonzero(lm_s)[-1])
  assert m[last] == 1 and lt[pos[last]] == teacher.eos_token_id


def test_mined_real(toks):
  """MinED through alignment.mined: pairs lie on response labels, are monotone, EOS <-> EOS."""
  student, teacher = toks
  rec = Rec(0, "plain", "Q: colour?\n", "The sky is blue. Héllo 😀 wörld, indubitably.")
  b = batches([rec], toks, shuffle=False, alignment=("mined",), batch_size=1)[0]
  m = b[spec.align_key("mined_mask")][0]
  pos = b[spec.align_key("mined_pos")][0]
  lm_s = b[spec.key("main", "student", "loss_mask")][0]
  lm_t = b[spec.key("main", "teacher", "loss_mask")][0]
  assert m.sum() >= 5 and (m <= lm_s).all() and (lm_t[pos[m == 1]] == 1).all()
  assert (np.diff(pos[m == 1]) > 0).all()
  last = int(np.flatnonzero(lm_s)[-1])
  assert m[last] == 1
  assert b[spec.key("main", "teacher", "labels")][0][pos[last]] == teacher.eos_token_id
  assert not b[spec.align_key("eta_mask")].any()  # not asked for: zero


def test_accepts_project_records_and_dicts(toks):
  """records.Record (string ids, integer example_index) and plain dicts both work."""
  records = pytest.importorskip("cot2align_jax.data.records")
  recs = [records.Record(example_id="dolly/train/5", kind="plain", prompt="Q:\n", response="A.",
                         example_index=5),
          {"example_id": 9, "prompt": "Q:\n", "response": "B.", "pair_prompt": "P:\n",
           "pair_response": "B.", "has_pair": True}]
  b = batches(recs, toks, shuffle=False)[0]
  assert b["example_id"].tolist() == [5, 9, -1, -1]
  assert b["has_pair"].tolist() == [False, True, False, False]


def test_group_by_pair_makes_pure_batches_and_resumes(toks):
  """Grouping within windows of k batches: the same records per epoch, at most one mixed batch
  per window, and exact resume."""
  recs = make_records(48)  # every third record has a pair
  plain = batches(recs, toks, batch_size=4)
  grouped = batches(recs, toks, batch_size=4, group_by_pair=4)
  ids = lambda bs: sorted(int(i) for b in bs for i in b["example_id"] if i >= 0)
  assert ids(grouped) == ids(plain) == list(range(48))
  mixed = lambda bs: sum(0 < b["has_pair"].sum() < len(b["has_pair"]) for b in bs)
  assert mixed(grouped) <= 48 // 16  # one per window of 16 records at most
  assert mixed(plain) > mixed(grouped)
  assert sum(not b["has_pair"].any() for b in grouped) >= 6  # these skip the pair forwards
  for b in grouped:  # pair masks stay consistent with has_pair
    assert not b["pair/student/loss_mask"][~b["has_pair"]].any()
  c = cfg(batch_size=4, group_by_pair=4, num_epochs=2)
  it = iter(pl.Pipeline(recs, *toks, c))
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(6)]
  fresh = iter(pl.Pipeline(recs, *toks, c))
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    np.testing.assert_array_equal(got["example_id"], want["example_id"])
  with pytest.raises(ValueError, match="group_by_pair must be >= 0"):
    pl.PipelineConfig(group_by_pair=-1).validate()
