"""data.template=chat: each side renders the prompt with its own tokenizer's chat template, the
response text (and so its byte spans, masks and alignment pairs) is the same on both sides."""

import pickle

import numpy as np
import pytest
from transformers import AutoTokenizer

from cot2align_jax.core import spec
from cot2align_jax.data import files
from cot2align_jax.data import pipeline as pl
from cot2align_jax.data import records as R
from cot2align_jax.data.tokenize import tokenize_view
from cot2align_jax.evaluation.protocol import SamplingSettings, TextGenerator
from tests.data.test_files import SAMPLES


@pytest.fixture(scope="module")
def toks(shared):
  """SmolLM2 (student) and Qwen1.5 (teacher): two ChatML templates, two vocabularies."""
  return {"student": AutoTokenizer.from_pretrained(str(shared / "tokenizers" / "smollm2")),
          "teacher": AutoTokenizer.from_pretrained(str(shared / "tokenizers" / "qwen1.5"))}


def _chat_records(rationale: bool = True):
  examples = files.read_file(SAMPLES / "chat.jsonl", split="train").examples
  rationales = {"c1": "2 plus 3 makes 5."} if rationale else {}
  return examples, R.build_records(examples, rationales, cot_rule="all", template="chat")


def test_chat_prompts_are_rendered_by_each_tokenizer(toks, shared):
  examples, records = _chat_records()
  plain, cot = records[0], records[1]
  assert isinstance(plain.prompt, R.ChatPrompt) and plain.prompt.turns == examples[0].messages
  assert pickle.loads(pickle.dumps(cot.prompt)).turns == cot.prompt.turns   # grain workers
  s = R.render_prompt(plain.prompt, toks["student"])
  t = R.render_prompt(plain.prompt, toks["teacher"])
  # each its own template: SmolLM2's with the user's system turn, Qwen's ChatML
  assert s == toks["student"].apply_chat_template(
      [{"role": r, "content": c} for r, c in examples[0].messages], add_generation_prompt=True,
      tokenize=False)
  assert t.endswith("<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n")
  assert R.render_prompt(cot.prompt, toks["teacher"]).endswith(
      "<|im_start|>assistant\n" + R.CHAT_COT_CUE)
  assert cot.response == "2 plus 3 makes 5." + R.COT_ANSWER_JOINER + "5"
  assert R.render_prompt("plain text", toks["student"]) == "plain text"
  with pytest.raises(R.DataError, match="no chat template"):
    R.render_prompt(plain.prompt, AutoTokenizer.from_pretrained(str(shared / "tokenizers" /
                                                                    "gpt2")))


def test_response_spans_and_alignment_line_up_across_templates(toks):
  _, records = _chat_records()
  cfg = pl.PipelineConfig(batch_size=1, max_prompt=256, max_len=320, alignment=("eta",))
  builder = pl.RowBuilder(toks["student"], toks["teacher"], cfg)
  differ = 0
  for record in records:
    views = {s: builder.view(record.prompt, record.response, s) for s in spec.SIDES}
    # without a system turn SmolLM2's template writes its default one, Qwen's does not
    differ += views["student"].prompt_bytes != views["teacher"].prompt_bytes
    for side, v in views.items():
      tok = toks[side]
      resp = v.ids[v.response_mask.astype(bool)]
      assert tok.decode(resp[:-1]) == record.response            # same text, then EOS
      assert resp[-1] == tok.eos_token_id
      # response byte spans, counted from the response start, cover the response exactly
      offs = v.offsets[v.response_mask.astype(bool)][:-1] - v.prompt_bytes
      assert offs.min() == 0 and offs.max() == len(record.response.encode())
    row = builder(record)
    pos = row[spec.align_key("eta_pos")]
    mask = row[spec.align_key("eta_mask")].astype(bool)
    assert mask.any()
    s_lab = row[spec.key("main", "student", "labels")]
    t_lab = row[spec.key("main", "teacher", "labels")]
    s_loss = row[spec.key("main", "student", "loss_mask")].astype(bool)
    t_loss = row[spec.key("main", "teacher", "loss_mask")].astype(bool)
    # pairs join response labels only, and the paired tokens spell the same text (EOS ↔ EOS)
    assert s_loss[mask].all() and t_loss[pos[mask]].all()
    for i in np.flatnonzero(mask):
      if s_lab[i] == toks["student"].eos_token_id:
        assert t_lab[pos[i]] == toks["teacher"].eos_token_id
        continue
      assert (toks["student"].decode([s_lab[i]]).strip() ==
              toks["teacher"].decode([t_lab[pos[i]]]).strip())
  assert differ >= 3


def test_alpaca_records_are_unchanged_by_the_response_relative_spans(toks):
  # same prompt text on both sides: shifting both by the same prompt length keeps every pair
  examples = files.read_file(SAMPLES / "alpaca.jsonl", split="train").examples
  record = R.build_records(examples, {}, cot_rule="none")[0]
  assert not isinstance(record.prompt, R.ChatPrompt)
  v = tokenize_view(record.prompt, record.response, toks["student"])
  assert toks["student"].decode(v.ids) == record.prompt + record.response + "<|im_end|>"


def test_generation_prompts_use_the_models_template(toks):
  _, records = _chat_records(rationale=False)
  gen = TextGenerator.__new__(TextGenerator)          # encode() needs only these two fields
  gen.tokenizer, gen.settings = toks["teacher"], SamplingSettings(max_prompt_length=256)
  gen.bos = []
  ids = gen.encode(records[0].prompt)
  assert toks["teacher"].decode(ids) == R.render_prompt(records[0].prompt, toks["teacher"])
