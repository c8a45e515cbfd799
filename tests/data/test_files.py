"""A user's own data files (data/files.py): formats, field mappings, chat rows, bad rows."""

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet
import pytest

from cot2align_jax.data import files
from cot2align_jax.data.records import DataError, build_records
from cot2align_jax.training import config as C
from cot2align_jax.training import setup

SAMPLES = Path(__file__).parent / "samples"


def _rows(name):
  return [json.loads(l) for l in (SAMPLES / name).read_text().splitlines() if l.strip()]


def _key(examples):
  return [(e.id, e.instruction, e.input, e.outputs, e.messages) for e in examples]


def _write_formats(tmp_path, rows):
  """The same rows as .json, .parquet, .csv and a saved `datasets` directory."""
  cols = sorted({k for r in rows for k in r})
  full = [{k: r.get(k) for k in cols} for r in rows]
  out = {"json": tmp_path / "rows.json", "parquet": tmp_path / "rows.parquet",
         "csv": tmp_path / "rows.csv", "saved": tmp_path / "saved"}
  out["json"].write_text(json.dumps({"data": rows}))
  table = pa.Table.from_pylist(full)
  pyarrow.parquet.write_table(table, str(out["parquet"]))
  with out["csv"].open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in full)
  # the layout of datasets' save_to_disk: state.json naming Arrow stream files
  out["saved"].mkdir()
  with pa.OSFile(str(out["saved"] / "data-00000-of-00001.arrow"), "wb") as sink:
    with pyarrow.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table)
  (out["saved"] / "state.json").write_text(json.dumps(
      {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "train"}))
  return out


def test_every_format_loads_the_same_examples(tmp_path):
  rows = _rows("alpaca.jsonl")
  want = files.read_file(SAMPLES / "alpaca.jsonl", split="train")
  assert want.bad == [] and len(want.examples) == 3
  assert want.examples[1].input == "" and want.examples[0].outputs == ("5",)
  for fmt, path in _write_formats(tmp_path, rows).items():
    got = files.read_file(path, split="train")
    assert got.bad == [], fmt
    assert _key(got.examples) == _key(want.examples), fmt


def test_prompt_response_csv_and_explicit_mappings(tmp_path):
  got = files.read_file(SAMPLES / "prompt_response.csv", split="train").examples
  assert [e.id for e in got] == ["p1", "p2", "p3"]
  assert got[1].instruction == "Name the capital of France, please." and got[1].input == ""
  assert got[2].instruction == "Write two lines:\na haiku start"      # a quoted newline
  assert got[2].output == "An old silent pond"
  # explicit role=column pairs; the "completion" column is understood by "auto"
  path = tmp_path / "qa.jsonl"
  path.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n" +
                  json.dumps({"question": "3+3?", "answer": "6"}) + "\n")
  ex = files.read_file(path, split="test", fields="instruction=question,output=answer").examples
  assert [(e.id, e.instruction, e.output) for e in ex] == [("file/test/0", "2+2?", "4"),
                                                            ("file/test/1", "3+3?", "6")]
  path.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n")
  assert files.read_file(path, split="train").examples[0].output == "Hello"
  with pytest.raises(DataError, match="maps no known layout"):
    files.parse_fields("question=q")
  path.write_text(json.dumps({"question": "x", "answer": "y"}) + "\n")
  with pytest.raises(DataError, match="cannot tell the layout"):
    files.read_file(path, split="train")


def test_chat_rows_give_one_example_per_assistant_turn():
  ex = files.read_file(SAMPLES / "chat.jsonl", split="train").examples
  assert [e.id for e in ex] == ["c1", "c2#0", "c2#1", "c3"]
  c1, c2a, c2b = ex[0], ex[1], ex[2]
  assert (c1.instruction, c1.input, c1.output) == ("Add 2 and 3.", "System: You are terse.", "5")
  assert c1.messages == (("system", "You are terse."), ("user", "Add 2 and 3."))
  assert (c2a.instruction, c2a.input, c2a.output) == ("Capital of France?", "", "Paris")
  # the second answer's prompt holds the whole conversation before it (no loss on "Paris")
  assert (c2b.instruction, c2b.output) == ("And of Italy?", "Rome")
  assert c2b.input == "User: Capital of France?\n\nAssistant: Paris"
  assert c2b.messages[-1] == ("user", "And of Italy?") and len(c2b.messages) == 3
  records = build_records(ex, {}, cot_rule="none")
  assert [r.response for r in records] == ["5", "Paris", "Rome", "pots"]


BAD_LINES = [
    b'{"instruction": "ok", "output": "fine"}',
    b'{"instruction": "no output"}',                       # missing field
    b'{"instruction": "empty", "output": "   "}',          # empty response
    b'{"instruction": "latin-1 \xe9", "output": "x"}',     # not UTF-8
    b'{"instruction": "cut", "output": ',                  # malformed JSON
    b'["not", "an", "object"]',
    b'{"instruction": 3, "output": "x"}',                  # not a string
    b'{"instruction": "ok too", "output": "good"}',
]


def test_bad_rows_are_counted_and_skipped_or_raise_one_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b"\n".join(BAD_LINES) + b"\n")
  read = files.read_file(path, split="train")
  assert [e.output for e in read.examples] == ["fine", "good"]
  assert [b.where.rsplit(":", 1)[1] for b in read.bad] == ["2", "3", "4", "5", "6", "7"]
  reasons = [b.reason for b in read.bad]
  assert reasons[0] == "missing field 'output'" and reasons[1] == "empty response"
  assert reasons[2] == "not UTF-8" and reasons[3].startswith("malformed JSON")
  line = files.summarize_bad(read.bad, path)
  assert line.startswith(f"{path}: skipped 6 bad rows (") and line.endswith("first at 2, 3, 4")
  with pytest.raises(DataError) as err:
    files.read_file(path, split="train", on_error="raise")
  assert str(err.value) == f"{path}:2: missing field 'output'"
  for name, text in (("x.txt", "a"), ("missing.jsonl", None)):
    if text is not None:
      (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match="unknown format|file not found"):
      files.read_file(tmp_path / name, split="train")
  conv = tmp_path / "conv.jsonl"
  conv.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n" +
                  json.dumps({"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": ""}]}) + "\n")
  assert [b.reason for b in files.read_file(conv, split="train").bad] == [
      "assistant turn 0 has no user turn before it",
      "empty response (no non-empty assistant turn)"]


class _WordTokenizer:
  """Whitespace "tokenizer": one id per word."""

  def __call__(self, texts, add_special_tokens=False):
    return {"input_ids": [t.split() for t in texts]}


def test_config_reads_own_files_and_drops_long_prompts(tmp_path):
  cfg = C.load_config("configs/base.py", "sft", {
      "data.dataset": "jsonl", "data.train_file": str(SAMPLES / "alpaca.jsonl"),
      "data.dev_file": str(SAMPLES / "chat.jsonl"), "data.dev_split": "dev"})
  train, dev, dev_examples = setup.read_records(cfg)
  assert [r.example_id for r in train] == ["a1", "a2", "a3"]
  assert [e.id for e in dev_examples] == ["c1", "c2#0", "c2#1", "c3"] and len(dev) == 4
  # the Alpaca prompt has 30+ words: a limit of 31 words keeps the short ones only
  toks = (_WordTokenizer(),)
  lengths = [len(r.prompt.split()) for r in train]
  limit = sorted(lengths)[1]
  kept = setup.drop_long_prompts(train, toks, limit, "skip", "train.jsonl")
  assert [r.example_id for r in kept] == [r.example_id for r, n in zip(train, lengths)
                                          if n <= limit] and len(kept) == 2
  with pytest.raises(C.ConfigError, match="longer than data.max_prompt"):
    setup.drop_long_prompts(train, toks, limit, "raise", "train.jsonl")
  cfg.data.test_file = ""
  with pytest.raises(C.ConfigError, match="set --config.data.test_file"):
    setup.split_examples(cfg, "jsonl", "test")
  with pytest.raises(C.ConfigError, match="splits train, dev, test"):
    setup.split_examples(cfg, "file", "valid")
