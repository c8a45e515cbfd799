"""View tokenization on the real shared tokenizers (gpt2, qwen1.5, tinyllama), in "reference"
mode (no BOS; the BOS of "convention" mode: test_special_tokens.py)."""

import logging

import numpy as np
import pytest
from transformers import AutoTokenizer

from cot2align_jax.data import tokenize as tk

NAMES = ("gpt2", "qwen1.5", "tinyllama")
REF = "reference"
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")
RESPONSE = "The sky is blue, and grass is green. Héllo 😀 wörld!"


@pytest.fixture(scope="module")
def toks(shared):
  """The three real tokenizers, loaded once for this module."""
  return {n: AutoTokenizer.from_pretrained(str(shared / "tokenizers" / n)) for n in NAMES}


def _encode(tok, text):
  return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", NAMES)
def test_ids_masks_and_shift(toks, name):
  tok = toks[name]
  tv = tk.tokenize_view(PROMPT, RESPONSE, tok, special_tokens=REF)
  n_prompt = len(_encode(tok, PROMPT))
  assert tv.ids.tolist() == _encode(tok, PROMPT + RESPONSE) + [tok.eos_token_id]
  assert tv.ids.dtype == np.int32 and tv.offsets.shape == (len(tv), 2)
  assert tv.response_mask.tolist() == [0] * n_prompt + [1] * (len(tv) - n_prompt)
  arr = tv.model_arrays()
  assert arr["input_ids"].tolist() == tv.ids[:-1].tolist()
  assert arr["loss_mask"].tolist() == tv.response_mask[1:].tolist()
  assert arr["labels"].tolist() == [i if m else 0 for i, m in zip(tv.ids[1:], tv.response_mask[1:])]
  assert arr["attention_mask"].tolist() == [1] * (len(tv) - 1)
  assert arr["labels"][-1] == tok.eos_token_id


@pytest.mark.parametrize("name", NAMES)
def test_byte_spans(toks, name):
  tv = tk.tokenize_view(PROMPT, RESPONSE, toks[name], special_tokens=REF)
  data = tv.text.encode("utf-8")
  assert tv.prompt_bytes == len(PROMPT.encode("utf-8"))
  assert tv.offsets[-1].tolist() == [len(data), len(data)]  # EOS: empty span at the end
  assert (tv.offsets[:, 0] <= tv.offsets[:, 1]).all() and (np.diff(tv.offsets[:, 0]) >= 0).all()
  resp = tv.offsets[tv.response_mask == 1][:-1]
  assert resp[0, 0] == tv.prompt_bytes and resp[-1, 1] == len(data)
  assert (tv.offsets[tv.response_mask == 0, 0] < tv.prompt_bytes).all()
  # ASCII-only tokens decode to their span (SentencePiece tokens may carry the "▁" space).
  tok = toks[name]
  for i, (s, e) in zip(tv.ids[:-1], tv.offsets[:-1]):
    piece = data[s:e].decode("utf-8")
    if piece.isascii():
      assert tok.decode([int(i)]).strip() == piece.strip()


@pytest.mark.parametrize("name", NAMES)
def test_truncation_small_limits(toks, name):
  tok = toks[name]
  prompt = "one two three four five six seven eight nine ten eleven twelve\n"
  first8 = _encode(tok, prompt + "Ok")[:8]
  tv = tk.tokenize_view(prompt, "Ok", tok, max_prompt=8, max_len=20, special_tokens=REF)
  assert tv.ids[:8].tolist() == first8 and int((tv.response_mask == 0).sum()) == 8
  assert tv.ids[-1] == tok.eos_token_id and tv.response_mask[8:].all()
  long = tk.tokenize_view(prompt, "word " * 50, tok, max_prompt=8, max_len=20, special_tokens=REF)
  assert len(long) == 20 and long.ids[-1] != tok.eos_token_id  # EOS cut by max_len
  assert long.model_arrays()["input_ids"].shape == (19,)


def test_real_limits_long_prompt(toks):
  tok = toks["qwen1.5"]
  prompt = " ".join(f"w{i}" for i in range(1500)) + "\n### Response:\n"
  tv = tk.tokenize_view(prompt, "answer " * 600, tok, special_tokens=REF)
  assert int((tv.response_mask == 0).sum()) == 256 and len(tv) == 512
  assert tv.ids[:256].tolist() == _encode(tok, prompt)[:256]


@pytest.mark.parametrize("name", NAMES)
def test_empty_response_is_eos_only(toks, name):
  tok = toks[name]
  tv = tk.tokenize_view(PROMPT, "", tok, special_tokens=REF)
  assert tv.ids.tolist() == _encode(tok, PROMPT) + [tok.eos_token_id]
  assert tv.response_mask.sum() == 1 and tv.response_mask[-1] == 1
  arr = tv.model_arrays()
  assert arr["loss_mask"].sum() == 1 and arr["labels"][-1] == tok.eos_token_id
  empty = tk.tokenize_view("", "", tok, special_tokens=REF)
  assert empty.ids.tolist() == [tok.eos_token_id] and empty.model_arrays()["labels"].shape == (0,)


@pytest.mark.parametrize("name", NAMES)
def test_lone_surrogates_replaced(toks, name):
  tv = tk.tokenize_view("Say\ud800 it:\n", "fine \udfff.", toks[name], special_tokens=REF)
  assert tv.text == "Say\ufffd it:\nfine \ufffd."
  assert tv.offsets[-1, 0] == len(tv.text.encode("utf-8"))
  assert tk.clean_text("\ud83d\ude00") == "😀"  # a valid surrogate pair is joined


def test_pad_fallback_warns_once(toks, caplog, monkeypatch):
  monkeypatch.setattr(tk, "_WARNED_NO_PAD", set())
  with caplog.at_level(logging.WARNING, logger=tk.__name__):
    assert tk.pad_id(toks["gpt2"]) == toks["gpt2"].eos_token_id
    assert tk.pad_id(toks["gpt2"]) == toks["gpt2"].eos_token_id
    assert tk.pad_id(toks["qwen1.5"]) == toks["qwen1.5"].pad_token_id
  msgs = [r.getMessage() for r in caplog.records]
  assert len(msgs) == 1 and "has no pad token; using EOS" in msgs[0] and "gpt2" in msgs[0]
