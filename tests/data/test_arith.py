"""The synthetic arithmetic task (data/arith.py): the demo size, the tiny size, the "qa" template."""

import json
import re

import pytest

from cot2align_jax.data import arith, records, sources

STEP = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)\.$")


def _check_problem(p):
  """The rationale's steps are correct arithmetic, chained, and end at the answer; the question
  starts from the first operand."""
  steps = p["rationale"].split(". ")
  steps = [s if s.endswith(".") else s + "." for s in steps]
  value = None
  for s in steps:
    m = STEP.match(s)
    assert m, s
    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    assert c == (a + b if op == "+" else a - b)
    assert value is None or a == value
    assert 0 <= c <= arith.MAX_VALUE
    value = c
  assert str(value) == p["answer"]
  first = int(re.search(r"has (\d+) ", p["question"])[1])
  assert first == int(STEP.match(steps[0])[1])
  return len(steps)


def test_problems_are_correct_multi_step_and_deterministic():
  splits = arith.make_splits({"train": 300, "dev": 50, "test": 50}, seed=3)
  again = arith.make_splits({"train": 300, "dev": 50, "test": 50}, seed=3)
  assert splits == again
  assert arith.make_splits({"train": 300, "dev": 50, "test": 50}, seed=4) != splits
  n_steps = [_check_problem(p) for s in splits.values() for p in s]
  assert min(n_steps) >= 2
  three = arith.make_splits({"train": 50, "dev": 1, "test": 1}, seed=0, min_steps=3,
                            max_steps=3)["train"]
  assert {_check_problem(p) for p in three} == {3}
  # answers vary (not a constant the student could memorise)
  assert len({p["answer"] for p in splits["train"]}) > 10


def test_dev_and_test_questions_never_occur_in_train():
  splits = arith.make_splits({"train": 500, "dev": 100, "test": 100}, seed=0)
  train_q = {p["question"] for p in splits["train"]}
  for split in ("dev", "test"):
    assert not train_q & {p["question"] for p in splits[split]}


def test_unknown_split_size_is_an_error():
  with pytest.raises(ValueError, match="unknown arith splits"):
    arith.make_splits({"valid": 3})


def test_written_files_read_through_the_registry(tmp_path):
  paths = arith.write_dataset(tmp_path, {"train": 20, "dev": 5, "test": 6}, seed=1)
  exs = sources.read_examples("arith", "test", source=tmp_path)
  assert len(exs) == 6 and exs[0].id == "arith/test/0" and exs[0].dataset == "arith"
  assert exs[0].input.startswith(tuple(arith.NAMES)) and exs[0].outputs[0].isdigit()
  gold = sources.read_rationales(paths["gold_rationales"])
  assert sorted(gold) == sorted(f"arith/train/{i}" for i in range(20))
  rows = [json.loads(l) for l in paths["train"].read_text().splitlines()]
  problems = arith.make_splits({"train": 20, "dev": 5, "test": 6}, seed=1)["train"]
  assert [r["input"] for r in rows] == [p["question"] for p in problems]
  assert [gold[f"arith/train/{i}"] for i in range(20)] == [p["rationale"] for p in problems]
  spec = sources.dataset_spec("arith")
  assert spec.template == "qa" and spec.metric == "exact_match" and not spec.shared
  # the staged-set iteration (row counts of ../shared) leaves the generated set out
  assert "arith" not in [n for n, s in sources.DATASETS.items() if s.shared]


def test_missing_generated_set_names_the_demo(tmp_path):
  with pytest.raises(records.DataError, match="cot2align_jax.demo"):
    sources.read_examples("arith", "test", source=tmp_path)


def test_qa_template_records():
  ex = records.Example(id="arith/train/0", instruction=arith.INSTRUCTION,
                       input="Ann has 3 pens. She buys 2 more. How many pens does she have now?",
                       outputs=("5",), dataset="arith", split="train")
  built = records.build_records([ex], {ex.id: "3 + 2 = 5."}, cot_rule="all", template="qa")
  plain, cot = built
  assert plain.prompt == f"Q: {ex.input}\nA:" and plain.response == " 5"
  assert cot.prompt == f"Q: {ex.input}\nA: Let's think step by step."
  assert cot.response == " 3 + 2 = 5.\nTherefore, the answer is: 5"
  assert cot.pair_prompt == plain.prompt and cot.pair_response == " 5" and cot.has_pair
  # the Alpaca default is unchanged
  alpaca = records.build_records([ex], cot_rule="none")[0]
  assert alpaca.prompt.startswith("Below is an instruction") and alpaca.response == "5"
  with pytest.raises(ValueError, match="unknown prompt template"):
    records.build_records([ex], template="html")


def test_tokenizers_differ_and_round_trip(tmp_path):
  arith.write_dataset(tmp_path / "data", {"train": 200, "dev": 4, "test": 4}, seed=0)
  teacher, student = arith.train_tokenizers(tmp_path / "data", tmp_path / "tok")
  assert (tmp_path / "tok" / "teacher" / "tokenizer.json").is_file()
  assert (tmp_path / "tok" / "student" / "tokenizer.json").is_file()
  text = ("Q: Ben has 7 coins. He loses 3. Then he finds 5 more. How many coins does he have "
          "now?\nA: Let's think step by step. 7 - 3 = 4. 4 + 5 = 9.\nTherefore, the answer is: 9")
  t_toks, s_toks = teacher.tokenize(text), student.tokenize(text)
  assert any("Ġ" in t for t in t_toks) and not any("▁" in t for t in t_toks)
  assert any("▁" in t for t in s_toks) and not any("Ġ" in t for t in s_toks)
  assert t_toks != s_toks and len(teacher) != len(student)
  for tok in (teacher, student):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>"


def test_tiny_size_is_the_same_task_in_memory():
  """The tiny size: one-step problems of the same generator, ids "tiny/<split>/<i>", a longer
  split extends a shorter one, the splits differ, and the registry gives it the qa template."""
  train = arith.tiny_examples("train", 40, seed=0)
  assert [ex.id for ex in train[:3]] == ["tiny/train/0", "tiny/train/1", "tiny/train/2"]
  assert arith.tiny_examples("train", 10, seed=0) == train[:10]
  assert len(arith.tiny_examples("dev")) == arith.TINY_SIZES["dev"]
  assert arith.tiny_examples("test", 10) != train[:10]
  assert arith.tiny_examples("train", 10, seed=1) != train[:10]
  problems = arith.tiny_problems("train", 40)
  assert {_check_problem(p) for p in problems} == {1}
  assert [p["question"] for p in problems] == [ex.input for ex in train]
  assert sources.dataset_spec("tiny").template == "qa" and not sources.dataset_spec("tiny").shared
  with pytest.raises(KeyError, match="unknown split"):
    arith.tiny_examples("valid")


def test_tiny_records_pair_exactly_the_examples_with_a_rationale():
  examples = arith.tiny_examples("train", 60)
  half = arith.tiny_rationales("train", 60, fraction=0.5)
  assert 10 < len(half) < 50 and set(half) <= {ex.id for ex in examples}
  assert arith.tiny_rationales("train", 60, fraction=0.5) == half
  gold = arith.tiny_rationales("train", 60)
  assert len(gold) == 60 and all(gold[k] == v for k, v in half.items())
  recs = arith.tiny_records(examples, half)
  plain = [r for r in recs if not r.has_pair]
  cot = [r for r in recs if r.has_pair]
  assert len(plain) == 60 and {r.example_id for r in cot} == set(half)
  ex = examples[0]
  first = [r for r in recs if r.example_id == ex.id]
  assert first[0].prompt == records.qa_plain_prompt(ex) and first[0].response == " " + ex.output
  if len(first) == 2:
    assert first[1].response == f" {half[ex.id]}\nTherefore, the answer is: {ex.output}"


def test_tiny_tokenizers_differ():
  student, teacher = arith.tiny_tokenizers()
  text = records.qa_cot_prompt(arith.tiny_examples("test", 1)[0])
  s_toks, t_toks = student.tokenize(text), teacher.tokenize(text)
  assert any("Ġ" in t for t in s_toks) and any("▁" in t for t in t_toks)
  assert len(student) != len(teacher) and s_toks != t_toks
  for tok in (student, teacher):
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
