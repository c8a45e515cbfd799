"""Byte spans, exact pairs, chunks and ETA arrays on the real tokenizers in ../shared/tokenizers."""

import numpy as np
import pytest

from cot2align_jax.alignment.spans import (TokenBytes, byte_spans, char_to_byte_offsets, chunks,
                                           clean_text, eta_arrays, exact_pairs)

NAMES = ("gpt2", "qwen1.5", "mistral", "tinyllama", "smollm2")
# (student, teacher)
PAIRS = [("gpt2", "qwen1.5"), ("tinyllama", "mistral"), ("mistral", "smollm2")]
PROMPT = "### Instruction:\nSay it.\n\n### Response:\n"
RESPONSES = [
  "Hello world, this is a simple answer.",
  "Emoji 🙂 and a family 👩‍👩‍👧 here.",
  "日本語のテキスト: 東京は日本の首都です。",
  "A naïve café serves crème brûlée.",
  "line one\nline two\n\tindented\twith tabs\n\n  two spaces",
  "Digits 1234567890 and 3.14159, 2026-11-24.",
  " leading space, double  space and trailing ",
  "Mixed: x²+y² = z² → ∑ αβγ ½ ¼ 😀😀",
]


@pytest.fixture(scope="module")
def toks(shared):
  """name -> (HF tokenizer, TokenBytes), loaded once for the module."""
  # heavy import, needed only for this reference
  from transformers import AutoTokenizer
  out = {}
  for name in NAMES:
    tok = AutoTokenizer.from_pretrained(str(shared / "tokenizers" / name))
    out[name] = (tok, TokenBytes.from_tokenizer(tok))
  return out


def encode_view(tok, prompt, response, bos=False):
  """What the data pipeline does: prompt and response tokenized separately, offsets into the
  full view text, optional BOS and an appended EOS (both with empty offsets).

  Returns (text, ids [N], offsets [N, 2], n_prompt_tokens incl. BOS).
  """
  text = prompt + response
  p = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
  r = tok(response, add_special_tokens=False, return_offsets_mapping=True)
  ids = list(p["input_ids"]) + list(r["input_ids"]) + [tok.eos_token_id]
  offs = [tuple(o) for o in p["offset_mapping"]]
  offs += [(a + len(prompt), b + len(prompt)) for a, b in r["offset_mapping"]] + [(0, 0)]
  n_prompt = len(p["input_ids"])
  if bos:
    ids, offs, n_prompt = [tok.bos_token_id] + ids, [(0, 0)] + offs, n_prompt + 1
  return text, np.array(ids), np.array(offs), n_prompt


def assert_partition(spans, lo, hi):
  """The spans with text tile [lo, hi) exactly once, in order."""
  live = spans[spans[:, 1] > spans[:, 0]]
  assert np.all(spans[spans[:, 1] <= spans[:, 0]] == -1)
  assert len(live) and live[0, 0] == lo and live[-1, 1] == hi
  assert np.all(live[1:, 0] == live[:-1, 1])


def view_spans(toks, name, response, bos=False):
  tok, table = toks[name]
  text, ids, offs, n_prompt = encode_view(tok, PROMPT, response, bos)
  return text, ids, byte_spans(text, ids, offs, table), n_prompt


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: "-".join(p))
def test_spans_cover_bytes_once_and_eta_pairs_agree(toks, pair):
  s_name, t_name = pair
  for response in RESPONSES:
    data = (PROMPT + response).encode("utf-8")
    n_prompt_bytes = len(PROMPT.encode("utf-8"))
    sides = {}
    for name in pair:
      text, ids, spans, n_prompt = view_spans(toks, name, response)
      assert_partition(spans[:n_prompt], 0, n_prompt_bytes)
      assert_partition(spans[n_prompt:], n_prompt_bytes, len(data))
      assert np.all(spans[-1] == -1)  # EOS covers no text
      sides[name] = (ids, spans)
    (s_ids, s_spans), (t_ids, t_spans) = sides[s_name], sides[t_name]
    pairs = exact_pairs(s_spans, t_spans)
    assert len(pairs) >= 0.3 * min(len(s_ids), len(t_ids)), (response, len(pairs))
    s_table, t_table = toks[s_name][1], toks[t_name][1]
    for i, j in pairs:
      assert np.all(s_spans[i] == t_spans[j])
      covered = data[s_spans[i, 0]:s_spans[i, 1]]
      # each token's own content (from its vocabulary entry) is the covered text, up to a
      # SentencePiece dummy-prefix space; so both decode to the same marker-stripped string
      for table, tid in ((s_table, s_ids[i]), (t_table, t_ids[j])):
        piece = table.pieces[tid]
        assert piece == covered or piece == b" " + covered, (piece, covered)
      assert s_table.text_form(s_ids[i]) == t_table.text_form(t_ids[j])


def test_byte_fallback_and_split_characters(toks):
  family = "👩‍👩‍👧"
  data = (" " + family).encode("utf-8")
  for name in ("mistral", "tinyllama", "gpt2", "smollm2", "qwen1.5"):
    tok, table = toks[name]
    enc = tok(" " + family, add_special_tokens=False, return_offsets_mapping=True)
    spans = byte_spans(" " + family, enc["input_ids"], enc["offset_mapping"], table)
    assert_partition(spans, 0, len(data))
    for tid, (a, b) in zip(enc["input_ids"], spans):
      if a >= 0:
        assert data[a:b] in (table.pieces[tid], table.pieces[tid][1:])
  # the 4 byte-fallback tokens of one emoji get one byte each, in order
  tok, table = toks["mistral"]
  enc = tok("👩", add_special_tokens=False, return_offsets_mapping=True)
  spans = byte_spans("👩", enc["input_ids"], enc["offset_mapping"], table)
  pieces = tok.convert_ids_to_tokens(enc["input_ids"])
  fallback = [k for k, p in enumerate(pieces) if p.startswith("<0x")]
  assert len(fallback) == 4
  assert [tuple(spans[k]) for k in fallback] == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_bos_asymmetric_pair(toks):
  """TinyLlama adds BOS <s>, GPT-2 does not: the BOS has no span and the words still pair."""
  response = "Hello world, the cat sat."
  text, s_ids, s_spans, s_np = view_spans(toks, "tinyllama", response, bos=True)
  _, t_ids, t_spans, t_np = view_spans(toks, "gpt2", response)
  assert s_ids[0] == toks["tinyllama"][0].bos_token_id and np.all(s_spans[0] == -1)
  pairs = exact_pairs(s_spans, t_spans)
  data = text.encode()
  paired_text = {data[s_spans[i, 0]:s_spans[i, 1]] for i, _ in pairs}
  assert {b" world", b" cat", b" sat"} <= paired_text
  # label arrays: the EOS labels pair explicitly, prompt positions never pair
  s_lab, t_lab = s_spans[1:], t_spans[1:]
  s_mask = (np.arange(len(s_lab)) >= s_np - 1).astype(np.int32)
  t_mask = (np.arange(len(t_lab)) >= t_np - 1).astype(np.int32)
  eta_pos, eta_mask = eta_arrays(s_lab, t_lab, s_mask, t_mask, L_s=64)
  assert eta_pos.shape == eta_mask.shape == (64,) and eta_pos.dtype == np.int32
  assert eta_mask[len(s_lab) - 1] == 1 and eta_pos[len(s_lab) - 1] == len(t_lab) - 1
  assert not eta_mask[:s_np - 1].any() and not eta_mask[len(s_lab):].any()
  for i in np.flatnonzero(eta_mask[:len(s_lab) - 1]):
    assert np.all(s_lab[i] == t_lab[eta_pos[i]]) and s_lab[i, 0] >= len(PROMPT.encode())
  assert eta_mask.sum() >= 5


def test_eta_arrays_on_all_pairs(toks):
  for s_name, t_name in PAIRS:
    for response in RESPONSES:
      _, _, s_spans, s_np = view_spans(toks, s_name, response)
      _, _, t_spans, t_np = view_spans(toks, t_name, response)
      s_lab, t_lab = s_spans[1:], t_spans[1:]
      s_mask = np.arange(len(s_lab)) >= s_np - 1
      t_mask = np.arange(len(t_lab)) >= t_np - 1
      pos, mask = eta_arrays(s_lab, t_lab, s_mask, t_mask, L_s=len(s_lab) + 3)
      on = np.flatnonzero(mask)
      assert on[-1] == len(s_lab) - 1 and pos[on[-1]] == len(t_lab) - 1  # EOS <-> EOS
      assert np.all(s_mask[on]) and np.all(t_mask[pos[on]])
      assert np.all(s_lab[on[:-1]] == t_lab[pos[on[:-1]]])
      assert np.all(pos[mask == 0] == 0)
  with pytest.raises(ValueError):
    eta_arrays(s_lab, t_lab, s_mask, t_mask, L_s=len(s_lab) - 2)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: "-".join(p))
def test_chunks_partition_both_sides(toks, pair):
  for response in RESPONSES:
    _, _, s_spans, _ = view_spans(toks, pair[0], response)
    _, _, t_spans, _ = view_spans(toks, pair[1], response)
    parts = chunks(s_spans, t_spans)
    s_all = np.concatenate([c.student for c in parts])
    t_all = np.concatenate([c.teacher for c in parts])
    assert sorted(s_all) == list(np.flatnonzero(s_spans[:, 0] >= 0))
    assert sorted(t_all) == list(np.flatnonzero(t_spans[:, 0] >= 0))
    for a, b in zip(parts[:-1], parts[1:]):
      assert a.end == b.start
    for c in parts:
      for spans, idx in ((s_spans, c.student), (t_spans, c.teacher)):
        assert len(idx) and spans[idx[0], 0] == c.start and spans[idx[-1], 1] == c.end
        assert np.all(spans[idx[1:], 0] == spans[idx[:-1], 1])
    one = {(int(c.student[0]), int(c.teacher[0])) for c in parts
           if len(c.student) == 1 and len(c.teacher) == 1}
    assert one == {tuple(p) for p in exact_pairs(s_spans, t_spans).tolist()}


def test_char_to_byte_offsets():
  assert char_to_byte_offsets("aé日🙂").tolist() == [0, 1, 3, 6, 10]
  assert char_to_byte_offsets("").tolist() == [0]


def test_bad_input(toks):
  tok, table = toks["gpt2"]
  enc = tok("hello there", add_special_tokens=False, return_offsets_mapping=True)
  ids, offs = enc["input_ids"], enc["offset_mapping"]
  with pytest.raises(ValueError, match="offsets"):
    byte_spans("hello there", ids, offs[:-1], table)
  with pytest.raises(ValueError, match="out of range"):
    byte_spans("hello", ids, offs, table)  # offsets of a longer text
  with pytest.raises(ValueError, match="start > end"):
    byte_spans("hello there", ids[:1], [(3, 1)], table)
  with pytest.raises(ValueError, match="vocabulary"):
    byte_spans("hello there", [10**7], [(0, 5)], table)
  with pytest.raises(TypeError):
    byte_spans(b"hello", ids, offs, table)


def test_lone_surrogates_are_replaced(toks):
  raw = "ok \ud83d then"  # a lone high surrogate: no UTF-8 form, HF tokenizers reject it
  clean = clean_text(raw)
  assert clean == "ok \ufffd then" and len(clean) == len(raw)
  tok, table = toks["qwen1.5"]
  enc = tok(clean, add_special_tokens=False, return_offsets_mapping=True)
  spans = byte_spans(raw, enc["input_ids"], enc["offset_mapping"], table)  # same char offsets
  assert_partition(spans, 0, len(clean.encode("utf-8")))
  assert char_to_byte_offsets(raw)[-1] == len(clean.encode("utf-8"))


def test_byte_unit_offsets_give_the_same_spans(toks):
  tok, table = toks["tinyllama"]
  text = "Émoji 🙂 café 日本"
  enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
  by_char = byte_spans(text, enc["input_ids"], enc["offset_mapping"], table)
  as_bytes = char_to_byte_offsets(text)[np.array(enc["offset_mapping"])]
  by_byte = byte_spans(text, enc["input_ids"], as_bytes, table, unit="byte")
  assert np.array_equal(by_char, by_byte)
  with pytest.raises(ValueError, match="unit"):
    byte_spans(text, enc["input_ids"], as_bytes, table, unit="token")
