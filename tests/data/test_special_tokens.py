"""BOS per model (data.special_tokens): "convention" gives a BOS exactly to the tokenizers that
add one themselves, "reference" to none; everything else (ids, masks, labels, alignment pairs
of the real tokens, evaluation prompts) is unchanged up to the one-position shift."""

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from cot2align_jax.core import spec
from cot2align_jax.data import arith
from cot2align_jax.data import pipeline as pl
from cot2align_jax.data import tokenize as tk
from cot2align_jax.evaluation.protocol import SamplingSettings, TextGenerator
from cot2align_jax.models import config_from_hf, create_model
from cot2align_jax.training import config as C
from tests.data.test_tokenize import PROMPT, RESPONSE
from tests.evaluation import TINY_LLAMA

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# What each shared tokenizer does itself with add_special_tokens=True (checked by hand: only the
# two SentencePiece ones prepend their BOS <s> = 1; SmolLM2 has a bos_token but does not add it;
# GPT-2's bos_token is its EOS and is not added; Qwen1.5 has no bos_token).
ADDS_BOS = {"gpt2": False, "mistral": True, "qwen1.5": False, "smollm2": False,
            "tinyllama": True}


@pytest.fixture(scope="module")
def toks(shared):
  """The five shared tokenizers, loaded once for this module."""
  return {n: AutoTokenizer.from_pretrained(str(shared / "tokenizers" / n)) for n in ADDS_BOS}


def _views(tok, prompt=PROMPT, response=RESPONSE, **kw):
  """(convention view, reference view) of one prompt + response."""
  return (tk.tokenize_view(prompt, response, tok, special_tokens="convention", **kw),
          tk.tokenize_view(prompt, response, tok, special_tokens="reference", **kw))


@pytest.mark.parametrize("name", sorted(ADDS_BOS))
def test_convention_detected(toks, name):
  tok = toks[name]
  assert tk.adds_bos(tok) == ADDS_BOS[name]
  assert tk.bos_ids(tok, "convention") == ([tok.bos_token_id] if ADDS_BOS[name] else [])
  assert tk.bos_ids(tok, "reference") == []


@pytest.mark.parametrize("name", sorted(ADDS_BOS))
def test_view_gets_bos_iff_convention(toks, name):
  tok = toks[name]
  conv, ref = _views(tok)
  # convention = what the tokenizer itself produces with its special tokens, plus our EOS
  assert conv.ids[:-1].tolist() == tok(PROMPT + RESPONSE)["input_ids"]
  assert ref.ids.tolist() == tok(PROMPT + RESPONSE, add_special_tokens=False)["input_ids"] + [
      tok.eos_token_id]
  k = int(ADDS_BOS[name])
  assert len(conv) == len(ref) + k
  if k:
    assert conv.ids[0] == tok.bos_token_id and ref.ids[0] != tok.bos_token_id
    assert conv.offsets[0].tolist() == [0, 0] and conv.response_mask[0] == 0
  np.testing.assert_array_equal(conv.ids[k:], ref.ids)
  np.testing.assert_array_equal(conv.offsets[k:], ref.offsets)
  np.testing.assert_array_equal(conv.response_mask[k:], ref.response_mask)
  assert conv.text == ref.text and conv.prompt_bytes == ref.prompt_bytes
  a, b = conv.model_arrays(), ref.model_arrays()
  assert a["input_ids"][:k].tolist() == [tok.bos_token_id] * k
  for f in ("labels", "loss_mask"):  # BOS is never a label: the first label is a prompt token
    assert not a[f][:k].any()
    np.testing.assert_array_equal(a[f][k:], b[f])
  assert a["loss_mask"].sum() == b["loss_mask"].sum()


@pytest.mark.parametrize("name", ["tinyllama", "mistral"])
def test_bos_counts_in_max_len_not_in_max_prompt(toks, name):
  tok = toks[name]
  prompt = "one two three four five six seven eight nine ten eleven twelve\n"
  conv, ref = _views(tok, prompt, "word " * 50, max_prompt=8, max_len=20)
  assert len(conv) == len(ref) == 20
  assert int((conv.response_mask == 0).sum()) == 9 and int((ref.response_mask == 0).sum()) == 8
  assert conv.ids[1:9].tolist() == ref.ids[:8].tolist()   # the same 8 prompt tokens
  assert conv.ids[1:].tolist() == ref.ids[:19].tolist()   # one response token less
  empty, _ = _views(tok, "", "")
  assert empty.ids.tolist() == [tok.bos_token_id, tok.eos_token_id]
  assert empty.model_arrays()["labels"].tolist() == [tok.eos_token_id]


def _rows(student, teacher, mode):
  """RowBuilder rows (ETA and MinED arrays) of a CoT record with a pair, in one mode."""
  cfg = pl.PipelineConfig(alignment=("eta", "mined"), special_tokens=mode)
  record = {"example_id": 3, "prompt": PROMPT, "response": RESPONSE, "has_pair": True,
            "pair_prompt": "Q: colour?\n", "pair_response": "Blue, 😀 green."}
  return pl.RowBuilder(student, teacher, cfg)(record)


@pytest.mark.parametrize("student,teacher", [("gpt2", "mistral"), ("tinyllama", "qwen1.5"),
                                             ("smollm2", "tinyllama")])
def test_alignment_of_real_tokens_unchanged(toks, student, teacher):
  conv = _rows(toks[student], toks[teacher], "convention")
  ref = _rows(toks[student], toks[teacher], "reference")
  shift = {"student": int(ADDS_BOS[student]), "teacher": int(ADDS_BOS[teacher])}
  for view in spec.VIEWS:
    for side in spec.SIDES:
      k = shift[side]
      a = {f: conv[spec.key(view, side, f)] for f in spec.SEQ_FIELDS}
      b = {f: ref[spec.key(view, side, f)] for f in spec.SEQ_FIELDS}
      assert len(a["input_ids"]) == len(b["input_ids"]) + k
      np.testing.assert_array_equal(a["input_ids"][k:], b["input_ids"])
      for f in ("labels", "loss_mask"):
        np.testing.assert_array_equal(a[f][k:], b[f])
        assert not a[f][:k].any()
  ks, kt = shift["student"], shift["teacher"]
  for method in ("eta", "mined"):
    pos_c, mask_c = conv[spec.align_key(f"{method}_pos")], conv[spec.align_key(f"{method}_mask")]
    pos_r, mask_r = ref[spec.align_key(f"{method}_pos")], ref[spec.align_key(f"{method}_mask")]
    assert mask_r.sum() > 3, method
    assert not mask_c[:ks].any()
    np.testing.assert_array_equal(mask_c[ks:], mask_r)        # the same student labels paired
    np.testing.assert_array_equal(pos_c[ks:], (pos_r + kt) * mask_r)  # with the same teacher ones


def test_pipeline_batch_has_bos_per_side(toks):
  records = [{"example_id": i, "prompt": f"Q{i}:\n", "response": f"Answer {i}.",
              "has_pair": False, "pair_prompt": "", "pair_response": ""} for i in range(3)]
  cfg = pl.PipelineConfig(batch_size=4, shuffle=False, shard_index=0, shard_count=1,
                          alignment=())
  batch = next(iter(pl.Pipeline(records, toks["gpt2"], toks["mistral"], cfg)))
  first = batch[spec.key("main", "teacher", "input_ids")][:3, 0]
  assert (first == toks["mistral"].bos_token_id).all()
  first = batch[spec.key("main", "student", "input_ids")][:3, 0]
  assert (first != toks["gpt2"].bos_token_id).all()


def _generator(tok, mode, **settings):
  """A TextGenerator over a tiny random Llama with the tokenizer's vocabulary (never run)."""
  model = create_model(config_from_hf(dict(TINY_LLAMA, vocab_size=len(tok),
                                           bos_token_id=tok.bos_token_id,
                                           eos_token_id=tok.eos_token_id)), 0)
  base = dict(max_length=38, max_prompt_length=32, prompt_bucket=32)
  return TextGenerator(model, tok, SamplingSettings(**{**base, **settings}, special_tokens=mode),
                       batch_size=2)


@pytest.mark.parametrize("name", ["tinyllama", "gpt2"])
def test_evaluation_prompts_get_bos(toks, name):
  tok = toks[name]
  text = " ".join(f"w{i}" for i in range(80)) + "\n\n### Response:\n"
  full = tok(text, add_special_tokens=False)["input_ids"]
  bos = [tok.bos_token_id] if ADDS_BOS[name] else []
  conv, ref = _generator(tok, "convention"), _generator(tok, "reference")
  assert conv.encode(text) == bos + full[-32:]       # the prompt keeps 32 tokens, BOS on top
  assert ref.encode(text) == full[-32:]
  assert conv.encode("Hi") == bos + tok("Hi", add_special_tokens=False)["input_ids"]
  ids, mask = conv.pad_batch([conv.encode("Hi")])         # left-padded: the BOS right after pads
  assert ids[0, mask[0] == 1].tolist() == conv.encode("Hi")


def test_evaluation_budget_counts_bos(toks):
  tok = toks["tinyllama"]   # TINY_LLAMA: 64 positions = 32 prompt + 32 new, no room for a BOS
  _generator(tok, "reference", max_length=64)
  with pytest.raises(ValueError, match="BOS [+] max_prompt_length=32 [+] 32 new tokens exceeds"):
    _generator(tok, "convention", max_length=64)


def test_bad_value_is_one_line_error():
  with pytest.raises(ValueError, match="special_tokens must be one of convention, reference"):
    pl.PipelineConfig(special_tokens="bos")
  with pytest.raises(ValueError, match="special_tokens"):
    SamplingSettings(special_tokens="none")
  cfg = C.load_config(CONFIGS / "tiny.py", overrides={"data.special_tokens": "bos"})
  with pytest.raises(C.ConfigError, match="special_tokens must be one of") as e:
    C.validate(cfg)
  assert "\n" not in str(e.value) and "'bos'" in str(e.value)


def test_defaults_paper_configs_and_toy_tokenizers():
  assert pl.PipelineConfig().special_tokens == "convention" == SamplingSettings().special_tokens
  assert C.load_config(CONFIGS / "base.py").data.special_tokens == "convention"
  assert C.load_config(CONFIGS / "tiny.py").data.special_tokens == "convention"
  for path in sorted((CONFIGS / "paper").glob("[!_]*.py")):
    assert C.pipeline_config(C.load_config(path)).special_tokens == "reference", path.name
  # The tiny / demo tokenizers (data/toy_tokenizers.py) add no BOS: "convention" changes nothing.
  for tok in arith.tiny_tokenizers():
    assert tok.bos_token_id is None and not tk.adds_bos(tok)
    conv, ref = _views(tok, "Q: 2 + 3 =\n", "5")
    np.testing.assert_array_equal(conv.ids, ref.ids)
