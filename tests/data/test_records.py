"""Examples, templates, records, JSONL readers and rationale import (docs/method.md §2)."""

import json
import logging

import pytest

from cot2align_jax.data import records, sources
from cot2align_jax.data.records import DataError, Example, Record, build_records

# The templates written out independently of the module constants (docs/method.md §2).
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
              "further context. Write a response that appropriately completes the request.\n\n"
              "### Instruction:\n{i}\n\n### Input:\n{x}\n\n### Response:\n")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n{i}\n\n### Response:\n")
COT = ("Below is an instruction that describes a task. Write a response with reasoning step by "
       "step that appropriately completes the request.\n\n### Instruction:\n{i}\n\n### Input:\n"
       "{x}\n\n### Response:\nLet's think step by step.\n")

# Row counts from shared/data/README.md.
README_COUNTS = {
    ("dolly", "train"): 11435, ("dolly", "dev"): 1000, ("dolly", "valid"): 500,
    ("self-inst", "valid"): 242, ("vicuna", "valid"): 80, ("sinst", "valid"): 1694,
    ("uinst", "valid"): 1050, ("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319,
    ("alpaca", "dev"): 500, ("alpaca", "test"): 500, ("dialogsum", "dev"): 500,
    ("dialogsum", "test"): 1500, ("sni_selfinstruct", "dev"): 500,
    ("sni_selfinstruct", "test"): 1637,
}


def ex(i, instruction="Do it.", inp="", outputs=("Done.",)):
  return Example(id=f"t/train/{i}", instruction=instruction, input=inp, outputs=tuple(outputs),
                 dataset="t", split="train")


def write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def dolly_sample(shared):
  """The first 50 real rows of Dolly train (mixes empty and non-empty inputs)."""
  return sources.read_examples("dolly", "train", source=shared / "data", max_examples=50)


# ------------------------------------------------------------------------------- templates


def test_dolly_records_match_templates_byte_for_byte(dolly_sample):
  rationales = {e.id: f"Step one for {e.id}.\nStep two." for e in dolly_sample}
  recs = build_records(dolly_sample, rationales)
  by_id = {}
  for r in recs:
    by_id.setdefault(r.example_id, []).append(r)
  assert {e.input != "" for e in dolly_sample} == {True, False}
  for e in dolly_sample:
    got = by_id[e.id]
    plain = WITH_INPUT.format(i=e.instruction, x=e.input) if e.input else NO_INPUT.format(
        i=e.instruction)
    assert got[0].kind == "plain" and got[0].prompt == plain and got[0].response == e.outputs[0]
    assert not got[0].has_pair and got[0].pair_prompt is None and got[0].pair_response is None
    if not e.input:
      assert len(got) == 1
      continue
    assert len(got) == 2
    cot = got[1]
    assert cot.kind == "cot" and cot.has_pair
    assert cot.prompt == COT.format(i=e.instruction, x=e.input)
    assert cot.response == rationales[e.id] + "\nTherefore, the answer is: " + e.outputs[0]
    assert cot.pair_prompt == plain and cot.pair_response == e.outputs[0]
  assert recs.report.n_cot == sum(e.input != "" for e in dolly_sample)
  assert recs.report.missing_rationale == [] and recs.report.empty_output == []


def test_plain_prompt_equals_rendered_prompt_field_of_real_rows(shared):
  """The staged rows carry the prompt the DSKD code rendered; ours must be identical."""
  for name, split in [("dolly", "valid"), ("self-inst", "valid"), ("vicuna", "valid"),
                      ("sinst", "valid"), ("alpaca", "test")]:
    path = sources.DATASETS[name].path(shared / "data", split)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:40]]
    examples = sources.read_examples(name, split, source=shared / "data", max_examples=40)
    assert [records.plain_prompt(e) for e in examples] == [r["prompt"] for r in rows]


def test_cot_template_always_has_input_section():
  assert records.cot_prompt(ex(0, "Q?", "")) == COT.format(i="Q?", x="")
  assert "### Input:\n\n\n### Response:" in records.cot_prompt(ex(0, "Q?", ""))
  assert records.cot_response("r", "a") == "r\nTherefore, the answer is: a"


# ------------------------------------------------------------------------------- records


def test_multi_reference_outputs_are_tuples_and_first_is_trained(shared):
  examples = sources.read_examples("sinst", "valid", source=shared / "data", max_examples=100)
  multi = [e for e in examples if len(e.outputs) > 1]
  assert multi and all(isinstance(e.outputs, tuple) for e in examples)
  rec = build_records(multi[:1])[0]
  assert rec.response == multi[0].outputs[0]


def test_multi_reference_from_file(tmp_path):
  src = tmp_path / "sinst" / "11_"
  src.mkdir(parents=True)
  write_lines(src / "valid.jsonl", [json.dumps({"instruction": "I", "input": "x",
                                                "output": ["a", "b", "c"]})])
  (e,) = sources.read_examples("sinst", "valid", source=tmp_path)
  assert e.outputs == ("a", "b", "c") and e.id == "sinst/valid/0" and e.output == "a"


def test_cot_rules_and_missing_rationales(caplog):
  examples = [ex(0, inp="x"), ex(1), ex(2, inp="y")]
  rationales = {"t/train/0": "because", "t/train/1": "since"}
  with caplog.at_level(logging.WARNING):
    recs = build_records(examples, rationales)
  assert [(r.example_id, r.kind) for r in recs] == [
      ("t/train/0", "plain"), ("t/train/0", "cot"), ("t/train/1", "plain"), ("t/train/2", "plain")]
  assert recs.report.missing_rationale == ["t/train/2"] and "1 examples" in caplog.text
  assert [r.example_index for r in recs] == [0, 0, 1, 2]
  assert [r.kind for r in build_records(examples, rationales, cot_rule="all")] == [
      "plain", "cot", "plain", "cot", "plain"]
  assert all(r.kind == "plain" for r in build_records(examples, rationales, cot_rule="none"))
  only_second = build_records(examples, rationales, cot_rule=lambda e: e.id.endswith("1"))
  assert [r.kind for r in only_second] == ["plain", "plain", "cot", "plain"]
  assert build_records(examples).report.missing_rationale == ["t/train/0", "t/train/2"]
  with pytest.raises(ValueError, match="unknown cot_rule"):
    build_records(examples, cot_rule="sometimes")


def test_empty_gold_output_is_skipped_and_counted():
  examples = [ex(0, outputs=("",)), ex(1, inp="x", outputs=("  \n",)), ex(2)]
  recs = build_records(examples, {"t/train/1": "r"})
  assert [r.example_id for r in recs] == ["t/train/2"]
  assert recs.report.empty_output == ["t/train/0", "t/train/1"]


def test_blank_rationale_counts_as_missing():
  recs = build_records([ex(0, inp="x")], {"t/train/0": "  "})
  assert [r.kind for r in recs] == ["plain"] and recs.report.missing_rationale == ["t/train/0"]


def test_record_and_example_invariants():
  with pytest.raises(ValueError, match="has_pair"):
    Record(example_id="a", kind="cot", prompt="p", response="r", has_pair=True)
  with pytest.raises(ValueError, match="has_pair"):
    Record(example_id="a", kind="plain", prompt="p", response="r", pair_prompt="p",
           pair_response="r")
  with pytest.raises(DataError):
    Example(id="a", instruction="i", input="", outputs=(), dataset="d", split="s")
  with pytest.raises(DataError):
    Example(id="a", instruction="i", input="", outputs=["x"], dataset="d", split="s")


# ------------------------------------------------------------------------------- readers


def test_malformed_line_names_file_and_line(tmp_path):
  path = write_lines(tmp_path / "bad.jsonl", ['{"a": 1}', "", '{"a": 2', '[1, 2]', '{"a": 3}'])
  with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
    sources.read_jsonl(path)
  read = sources.read_jsonl(path, on_error="skip")
  assert read.skipped == 2  # line 3 (broken) and line 4 (not an object)
  assert [(n, r["a"]) for n, r in read.rows] == [(1, 1), (5, 3)]
  assert issubclass(DataError, ValueError)


def test_non_utf8_line_is_malformed(tmp_path):
  path = tmp_path / "latin.jsonl"
  path.write_bytes(b'{"a": "ok"}\n{"a": "\xe9"}\n')
  with pytest.raises(DataError, match=r"latin\.jsonl:2"):
    sources.read_jsonl(path)


def test_skip_mode_keeps_ids_tied_to_line_numbers(tmp_path, caplog):
  (tmp_path / "vicuna").mkdir()
  write_lines(tmp_path / "vicuna" / "valid.jsonl",
              ['{"instruction": "a", "output": "1"}', "oops", '{"instruction": "b", "output": "2"}'])
  with pytest.raises(DataError, match=r"valid\.jsonl:2"):
    sources.read_examples("vicuna", "valid", source=tmp_path)
  with caplog.at_level(logging.WARNING):
    got = sources.read_examples("vicuna", "valid", source=tmp_path, on_error="skip")
  assert [e.id for e in got] == ["vicuna/valid/0", "vicuna/valid/2"]
  assert "skipped 1" in caplog.text
  assert got[0].input == ""


def test_missing_field_names_file_and_line(tmp_path):
  (tmp_path / "vicuna").mkdir()
  write_lines(tmp_path / "vicuna" / "valid.jsonl", ['{"instruction": "a"}'])
  with pytest.raises(DataError, match=r"valid\.jsonl:1: missing field 'output'"):
    sources.read_examples("vicuna", "valid", source=tmp_path)


def test_missing_data_dir_and_unknown_names(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    sources.data_dir(tmp_path / "nope")
  with pytest.raises(KeyError, match="unknown dataset"):
    sources.read_examples("nope", "train", source=tmp_path)
  with pytest.raises(KeyError, match="no split"):
    sources.read_examples("dolly", "test", source=tmp_path)
  with pytest.raises(DataError, match="file not found"):
    sources.read_examples("dolly", "dev", source=tmp_path)


def test_row_counts_match_data_readme(shared):
  found = {(name, split): len(exs)
           for name, split, exs in sources.iter_all_splits(source=shared / "data")}
  assert found == README_COUNTS


def test_gsm8k_layout_and_final_answer(shared):
  (e,) = sources.read_examples("gsm8k", "train", source=shared / "data", max_examples=1)
  assert e.instruction.startswith("Natalia sold clips") and e.input == ""
  assert e.output.endswith("#### 72") and sources.gsm8k_final_answer(e.output) == "72"
  assert sources.gsm8k_rationale(e.output).endswith("April and May.")
  assert sources.gsm8k_final_answer("so #### 1,250 ") == "1250"
  assert sources.gsm8k_final_answer("no marker") is None


# ------------------------------------------------------------------------------- rationales


def test_rationale_import_rejects_unknown_ids_with_count(tmp_path, caplog):
  examples = [ex(i) for i in range(3)]
  path = tmp_path / "r.jsonl"
  sources.write_rationales(path, {"t/train/0": "r0", "t/train/2": "r2", "x/1": "?", "x/2": "?"})
  with pytest.raises(DataError, match="2 of 4 rationale ids match no example"):
    sources.import_rationales(path, examples)
  with caplog.at_level(logging.WARNING):
    got = sources.import_rationales(path, examples, on_unknown="drop")
  assert dict(got) == {"t/train/0": "r0", "t/train/2": "r2"}
  assert got.unknown_ids == ["x/1", "x/2"] and "dropped 2" in caplog.text


def test_read_rationales_checks_lines(tmp_path):
  good = write_lines(tmp_path / "g.jsonl", ['{"id": "a", "rationale": "r"}',
                                            '{"id": "a", "rationale": "r"}'])
  assert sources.read_rationales(good) == {"a": "r"}
  clash = write_lines(tmp_path / "c.jsonl", ['{"id": "a", "rationale": "r"}',
                                             '{"id": "a", "rationale": "s"}'])
  with pytest.raises(DataError, match=r"c\.jsonl:2: id 'a' repeats"):
    sources.read_rationales(clash)
  no_id = write_lines(tmp_path / "n.jsonl", ['{"rationale": "r"}'])
  with pytest.raises(DataError, match=r"n\.jsonl:1: .*'id'"):
    sources.read_rationales(no_id)
