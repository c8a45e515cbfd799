"""GSM8K final-number extraction (rules in cot2align_jax/evaluation/gsm8k.py)."""

import json

import pytest

from cot2align_jax.data.sources import gsm8k_final_answer
from cot2align_jax.evaluation.gsm8k import (accuracy, canonical_number, exact_match,
                                            extract_answer, gold_answer)

TRICKY = [
    ("The answer is 1,234.", "1234"),
    ("She pays $18 in total.", "18"),
    ("$18", "18"),
    ("-3", "-3"),
    ("The temperature drops to -3 degrees.", "-3"),
    ("It costs 3.50", "3.5"),
    ("#### 72", "72"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("So she has 12 apples", "12"),                                 # trailing unit
    ("5 boxes of 6 eggs is 30 eggs, minus 4 broken is 26 eggs.", "26"),   # several: last
    ("The answer is 18 dollars. Check: 3 + 15 = 18, and 20 - 2 = 18 too, 99", "18"),  # marker
    ("Therefore, the answer is: 42\nSome trailing text with 7", "42"),
    ("answer: 5. Wait, recompute: the answer is 6 cookies.", "6"),  # last marker wins
    ("The answer is: \n\n 2,000,000 people", "2000000"),
    ("He scored 25% more, so 125", "125"),
    ("5-3=2", "2"),
    ("That is 0.5 of the pie, i.e. .5", "0.5"),
    ("There are no numbers here.", None),
    ("The answer is unknown, but we had 3 cats", "3"),              # marker without a number
    ("18.00", "18"),
]


@pytest.mark.parametrize("text,want", TRICKY)
def test_tricky_outputs(text, want):
  assert extract_answer(text) == want


def test_canonical_numbers():
  assert canonical_number("3.50") == canonical_number("3.5") == "3.5"
  assert canonical_number("1,000") == "1000"
  assert canonical_number("-0.0") == "0"
  assert canonical_number("1e3x") is None


def test_real_gold_rows(shared):
  """Every gold solution of the first 300 train and all test rows parses to its "#### N"."""
  root = shared / "data" / "gsm8k"
  n = 0
  for split, limit in (("train", 300), ("test", None)):
    with (root / f"{split}.jsonl").open(encoding="utf-8") as f:
      for i, line in enumerate(f):
        if limit is not None and i >= limit:
          break
        row = json.loads(line)
        final = gsm8k_final_answer(row["answer"])
        assert gold_answer(row["answer"]) == canonical_number(final), row["answer"][-60:]
        assert exact_match(f"... so the answer is {final}.", row["answer"])
        n += 1
  assert n == 300 + 1319


def test_exact_match_and_accuracy():
  gold = "Step 1: 2 + 2 = 4\n#### 4"
  assert exact_match("The answer is 4 apples.", gold)
  assert exact_match("4.0", gold)
  assert not exact_match("The answer is 5.", gold)
  assert not exact_match("no idea", gold)
  assert accuracy(["4", "5"], [gold, gold]) == 50.0
  assert accuracy([], []) == 0.0
