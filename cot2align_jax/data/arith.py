"""The synthetic reasoning task: multi-step arithmetic word problems (the demo's data set and,
at its tiny size, the test problem of `student.tiny` / `teacher.tiny`).

    paths = write_dataset("runs/demo/data", sizes={"train": 2000, "dev": 200, "test": 200})
    teacher_tok, student_tok = train_tokenizers("runs/demo/data", "runs/demo/tokenizers")
    examples = tiny_examples("train", 32)              # the tiny size, in memory ("tiny/train/i")
    student_tok, teacher_tok = tiny_tokenizers()

A problem is a story of `min_steps` to `max_steps` changes to a count of objects; its worked
steps are the rationale and the final count is the answer:

    Q: Ann has 7 pens. She buys 5 more. Then she gives away 4. How many pens does she have now?
    rationale: 7 + 5 = 12. 12 - 4 = 8.            answer: 8

Every intermediate count stays in [0, 99]. Prompts and responses are the "qa" template of
data/records.py. The demo size (`write_dataset`) writes `<dir>/arith/{train,dev,test}.jsonl`
(registry entry `data.sources.DATASETS["arith"]`) and `gold_rationales.jsonl`; its dev/test
questions never occur in train. Its tokenizers differ on purpose: the teacher's is a byte-level
BPE ("Ġ", 400), the student's a Metaspace BPE ("▁", 200). The tiny size (`tiny_examples`,
registry entry "tiny") is one-step problems drawn in memory, with its own pair of tokenizers
(student byte-level BPE 416, teacher Metaspace BPE 200; `tiny_tokenizers`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cot2align_jax.data import toy_tokenizers
from cot2align_jax.data.records import (Example, RecordList, build_records, cot_record,
                                        plain_record)
from cot2align_jax.data.sources import read_examples, read_rationales

NAMES = ("Ann", "Ben", "Cat", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Leo")
PRONOUNS = {"Ann": "she", "Ben": "he", "Cat": "she", "Dan": "he", "Eve": "she", "Fay": "she",
            "Gus": "he", "Hal": "he", "Ivy": "she", "Jon": "he", "Kim": "she", "Leo": "he"}
OBJECTS = ("apples", "pens", "books", "coins", "eggs", "cards", "shells", "stamps")
# (verb phrase with {n}, sign): how a step changes the count.
ADD = ("buys {n} more", "finds {n} more", "gets {n} more")
SUB = ("gives away {n}", "loses {n}", "eats {n}")
INSTRUCTION = "Solve the arithmetic word problem."
SPLITS = ("train", "dev", "test")
DEFAULT_SIZES = {"train": 2000, "dev": 200, "test": 200}
MAX_VALUE = 99
TEMPLATE = "qa"    # data.records.TEMPLATES

# The tiny size: one-step problems, small splits drawn in memory (no dev/test exclusion).
TINY_PROBLEM = {"min_steps": 1, "max_steps": 1}
TINY_SIZES = {"train": 64, "dev": 16, "test": 32}
TINY_TOKENIZER_PROBLEMS = 2000   # train problems (seed 0) the tiny tokenizers learn from


def make_problem(rng: np.random.RandomState, min_steps: int = 2, max_steps: int = 2,
                 max_operand: int = 9) -> dict[str, str]:
  """One problem: {"question", "rationale", "answer"}; operands in [1, max_operand]."""
  name = NAMES[rng.randint(len(NAMES))]
  pron = PRONOUNS[name]
  obj = OBJECTS[rng.randint(len(OBJECTS))]
  value = int(rng.randint(1, max_operand + 1))
  sentences = [f"{name} has {value} {obj}."]
  steps = []
  n_steps = int(rng.randint(min_steps, max_steps + 1))
  for i in range(n_steps):
    can_sub = value >= 1
    can_add = value + 1 <= MAX_VALUE
    if can_sub and (not can_add or rng.rand() < 0.5):
      n = int(rng.randint(1, min(max_operand, value) + 1))
      phrase, new, op = SUB[rng.randint(len(SUB))], value - n, "-"
    else:
      n = int(rng.randint(1, min(max_operand, MAX_VALUE - value) + 1))
      phrase, new, op = ADD[rng.randint(len(ADD))], value + n, "+"
    lead = pron.capitalize() if i == 0 else f"Then {pron}"
    sentences.append(f"{lead} {phrase.format(n=n)}.")
    steps.append(f"{value} {op} {n} = {new}.")
    value = new
  sentences.append(f"How many {obj} does {pron} have now?")
  return {"question": " ".join(sentences), "rationale": " ".join(steps), "answer": str(value)}


def make_split(n: int, seed: int, *, exclude: set[str] | None = None,
               **problem_kw) -> list[dict[str, str]]:
  """`n` problems from `seed`, skipping questions in `exclude` (redrawn, up to a bound)."""
  rng = np.random.RandomState(seed)
  exclude = exclude or set()
  out = []
  tries = 0
  while len(out) < n:
    p = make_problem(rng, **problem_kw)
    tries += 1
    if p["question"] in exclude and tries < 50 * n:
      continue
    out.append(p)
  return out


def split_seed(seed: int, split: str) -> int:
  return 7919 * int(seed) + 104729 * (SPLITS.index(split) + 1)


def make_splits(sizes: Mapping[str, int] | None = None, seed: int = 0,
                **problem_kw) -> dict[str, list[dict[str, str]]]:
  """{"train", "dev", "test"} problem lists; dev/test questions never occur in train."""
  sizes = {**DEFAULT_SIZES, **dict(sizes or {})}
  unknown = set(sizes) - set(SPLITS)
  if unknown:
    raise ValueError(f"unknown arith splits {sorted(unknown)}; known: {', '.join(SPLITS)}")
  train = make_split(int(sizes["train"]), split_seed(seed, "train"), **problem_kw)
  seen = {p["question"] for p in train}
  out = {"train": train}
  for split in ("dev", "test"):
    out[split] = make_split(int(sizes[split]), split_seed(seed, split), exclude=seen,
                            **problem_kw)
  return out


def example_id(split: str, index: int) -> str:
  """The id the data registry gives row `index` of a split (data.sources.read_examples)."""
  return f"arith/{split}/{index}"


def _write_jsonl(path: Path, rows) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  with tmp.open("w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  tmp.replace(path)


def write_dataset(data_dir: str | Path, sizes: Mapping[str, int] | None = None, seed: int = 0,
                  **problem_kw) -> dict[str, Path]:
  """Writes the splits and the train split's gold rationales under `<data_dir>/arith/`.

  Returns {"train", "dev", "test", "gold_rationales"} -> path. Deterministic in (sizes, seed).
  """
  folder = Path(data_dir) / "arith"
  folder.mkdir(parents=True, exist_ok=True)
  paths = {}
  for split, problems in make_splits(sizes, seed, **problem_kw).items():
    paths[split] = folder / f"{split}.jsonl"
    _write_jsonl(paths[split], ({"instruction": INSTRUCTION, "input": p["question"],
                                 "output": p["answer"]}
                                for p in problems))
    if split == "train":
      paths["gold_rationales"] = folder / "gold_rationales.jsonl"
      _write_jsonl(paths["gold_rationales"],
                   ({"id": example_id(split, i), "rationale": p["rationale"]}
                    for i, p in enumerate(problems)))
  return paths


def texts_of(examples: Sequence[Example], rationales: Mapping[str, str]) -> list[str]:
  """Plain and CoT views (prompt + response, "qa" template) of every example, in order."""
  texts = []
  for ex in examples:
    plain = plain_record(ex, template=TEMPLATE)
    cot = cot_record(ex, rationales[ex.id], template=TEMPLATE)
    texts += [plain.prompt + plain.response, cot.prompt + cot.response]
  return texts


def training_texts(data_dir: str | Path) -> list[str]:
  """The texts the tokenizers learn from: plain and CoT views of every train row (qa template)."""
  examples = read_examples("arith", "train", source=data_dir)
  gold = read_rationales(Path(data_dir) / "arith" / "gold_rationales.jsonl")
  return texts_of(examples, gold)


def train_tokenizers(data_dir: str | Path, out_dir: str | Path, *, teacher_vocab: int = 400,
                     student_vocab: int = 200):
  """(teacher, student) HF fast tokenizers trained on the train split, saved to
  `<out_dir>/teacher` and `<out_dir>/student` (byte-level BPE vs Metaspace BPE)."""
  texts = training_texts(data_dir)
  out = (toy_tokenizers.train_byte_bpe(texts, teacher_vocab, name="arith-teacher"),
         toy_tokenizers.train_metaspace_bpe(texts, student_vocab, name="arith-student"))
  for side, tok in zip(("teacher", "student"), out):
    tok.save_pretrained(str(Path(out_dir) / side))
  return out


# --------------------------------------------------------------------------------------------
# The tiny size (in memory)
# --------------------------------------------------------------------------------------------


def tiny_problems(split: str, n: int | None = None, seed: int = 0) -> list[dict[str, str]]:
  """The first `n` (default TINY_SIZES[split]) one-step problems of a tiny split; a larger `n`
  extends the list (the same problems first)."""
  if split not in SPLITS:
    raise KeyError(f"tiny: unknown split {split!r}; known: {', '.join(SPLITS)}")
  return make_split(int(n or TINY_SIZES[split]), split_seed(seed, split), **TINY_PROBLEM)


def tiny_examples(split: str, n: int | None = None, seed: int = 0) -> list[Example]:
  """records.Example objects of a tiny split (ids "tiny/<split>/<i>", dataset "tiny")."""
  return [Example(id=f"tiny/{split}/{i}", instruction=INSTRUCTION, input=p["question"],
                  outputs=(p["answer"],), dataset="tiny", split=split)
          for i, p in enumerate(tiny_problems(split, n, seed))]


def tiny_rationales(split: str, n: int | None = None, seed: int = 0,
                    fraction: float = 1.0) -> dict[str, str]:
  """{id: gold worked step} for a random `fraction` of a tiny split's examples (each kept with
  probability `fraction`, numpy seed `seed + 1`)."""
  rng = np.random.RandomState(seed + 1)
  out = {}
  for i, p in enumerate(tiny_problems(split, n, seed)):
    if rng.rand() < fraction:
      out[f"tiny/{split}/{i}"] = p["rationale"]
  return out


def tiny_records(examples: Sequence[Example],
                 rationales: Mapping[str, str] | None = None) -> RecordList:
  """Plain records of every example plus a CoT record exactly for those with a rationale."""
  rationales = dict(rationales or {})
  return build_records(examples, rationales, cot_rule=lambda ex: ex.id in rationales,
                       template=TEMPLATE)


@functools.lru_cache(maxsize=2)
def tiny_tokenizers(student_vocab: int = 416, teacher_vocab: int = 200):
  """(student byte-level BPE "Ġ", teacher Metaspace BPE "▁") HF fast tokenizers trained once
  per process on the plain and CoT views of TINY_TOKENIZER_PROBLEMS tiny train problems."""
  texts = texts_of(tiny_examples("train", TINY_TOKENIZER_PROBLEMS),
                   tiny_rationales("train", TINY_TOKENIZER_PROBLEMS))
  return (toy_tokenizers.train_byte_bpe(texts, student_vocab, name="tiny-student-bpe"),
          toy_tokenizers.train_metaspace_bpe(texts, teacher_vocab,
                                             name="tiny-teacher-metaspace-bpe"))
