"""The synthetic reasoning task of the demo: multi-step arithmetic word problems.

    paths = write_dataset("runs/demo/data", sizes={"train": 2000, "dev": 200, "test": 200})
    teacher_tok, student_tok = train_tokenizers("runs/demo/data", "runs/demo/tokenizers")

A problem is a story of 2 to `max_steps` changes to a count of objects; its worked steps are the
rationale and the final count is the answer:

    Q: Ann has 7 pens. She buys 5 more. Then she gives away 4. How many pens does she have now?
    rationale: 7 + 5 = 12. 12 - 4 = 8.            answer: 8

Every intermediate count stays in [0, 99] (a "gives away" never takes more than there is).
A plain (no-CoT) model must do all steps in its head; a CoT model writes one operation at a time,
which is why a teacher that reasons step by step beats a small student that answers directly.

Files (`write_dataset`): `<dir>/arith/{train,dev,test}.jsonl` in the Alpaca layout of the data
registry (`data.sources.DATASETS["arith"]`: instruction, input = the question, output = the
answer) and `<dir>/arith/gold_rationales.jsonl` ({"id", "rationale"} for the train split, what
the teacher is trained on). The splits are drawn from disjoint seeds and the dev/test questions
that also occur in train are redrawn, so the test split measures generalisation.

Tokenizers (`train_tokenizers`), trained on the train split's prompts and responses, with
different pre-tokenizers and sizes so that the two vocabularies really differ: the teacher's is
a byte-level BPE (GPT-2 style, "Ġ" space marker, mostly whole words), the student's a smaller
BPE over a SentencePiece "▁" Metaspace (Llama style; many words split into pieces), so the same
text gives different token boundaries. (A `tokenizers` Unigram model stalls below 200 pieces
on a corpus this repetitive and splits it into single characters, hence BPE for both.) Both are saved as Hugging Face fast tokenizers (pad "<pad>",
EOS "</s>", unk "<unk>").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

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


def training_texts(data_dir: str | Path) -> list[str]:
  """The texts the tokenizers learn from: plain and CoT views of every train row (qa template)."""
  from cot2align_jax.data import records  # pylint: disable=g-import-not-at-top
  from cot2align_jax.data.sources import read_examples, read_rationales  # pylint: disable=g-import-not-at-top
  examples = read_examples("arith", "train", source=data_dir)
  gold = read_rationales(Path(data_dir) / "arith" / "gold_rationales.jsonl")
  texts = []
  for ex in examples:
    plain = records.plain_record(ex, template="qa")
    cot = records.cot_record(ex, gold[ex.id], template="qa")
    texts += [plain.prompt + plain.response, cot.prompt + cot.response]
  return texts


def train_tokenizers(data_dir: str | Path, out_dir: str | Path, *, teacher_vocab: int = 400,
                     student_vocab: int = 200):
  """(teacher, student) HF fast tokenizers trained on the train split, saved to
  `<out_dir>/teacher` and `<out_dir>/student` (byte-level BPE vs Metaspace BPE)."""
  from cot2align_jax.data import toy_tokenizers as tt  # pylint: disable=g-import-not-at-top
  texts = training_texts(data_dir)
  out = (tt.train_byte_bpe(texts, teacher_vocab, name="arith-teacher"),
         tt.train_metaspace_bpe(texts, student_vocab, name="arith-student"))
  for side, tok in zip(("teacher", "student"), out):
    tok.save_pretrained(str(Path(out_dir) / side))
  return out
