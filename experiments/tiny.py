"""A seconds-long experiment on the tiny problem (configs/tiny.py): the runner's tests.

    python -m cot2align_jax.experiment --spec=experiments/tiny.py --workdir=/tmp/exp_tiny
    python -m cot2align_jax.experiment --spec=experiments/tiny.py:epochs=2,seeds=0 --workdir=...

arg (configs' grammar): epochs (4), seeds ("0,1"), budgets ("epochs,compute"), examples (16).
Two SFT students that differ only in their records: `plain` trains on the plain records of
the train problems, `cot` adds a CoT record (the gold worked step) for every problem, so it
has twice the records: under "epochs" it takes twice the steps, under "compute" the same.
The prepare step writes the two rationale files. Only train.seed varies with the seed:
data.seed would draw other tiny problems (and another test set).
"""

import json
from pathlib import Path

from cot2align_jax.data import arith
from cot2align_jax.training.config import parse_arg

ARG = {"epochs": 4, "seeds": "0,1", "budgets": "epochs,compute", "examples": 16}


def write_rationales(prepare_dir: Path, n: int) -> None:
  """prepare/plain.jsonl (no rationale) and prepare/cot.jsonl (all n train problems)."""
  (prepare_dir / "plain.jsonl").write_text("")
  rows = arith.tiny_rationales("train", n, seed=0, fraction=1.0)
  (prepare_dir / "cot.jsonl").write_text(
      "".join(json.dumps({"id": k, "rationale": v}) + "\n" for k, v in rows.items()))


def get_spec(arg=None):
  a = parse_arg(arg, ARG, where="experiments/tiny.py")
  n = int(a.examples)
  return dict(
      name="tiny",
      description="Runner test: plain vs plain + CoT records on the tiny problem.",
      runs={
          "plain": dict(config="configs/tiny.py:sft",
                        overrides={"data.rationales": "{prepare}/plain.jsonl"}),
          "cot": dict(config="configs/tiny.py:sft",
                      overrides={"data.rationales": "{prepare}/cot.jsonl"}),
      },
      baseline="plain",
      seeds=[int(s) for s in a.seeds.split("-" if "-" in a.seeds else ",") if s != ""],
      budgets=a.budgets,
      epochs=int(a.epochs),
      seed_keys=("train.seed",),
      overrides={"data.max_examples": n, "checkpoint.save_every": 2, "checkpoint.keep": 2,
                 "checkpoint.best_metric": "", "checkpoint.async_save": False,
                 "train.eval_every": -1, "train.log_every": 4},
      evaluation=dict(datasets=("tiny/test",), prompts=("plain", "cot"), max_examples=8,
                      new_tokens={"plain": 4, "cot": 24}, batch_size=8),
      prepare=dict(fn=lambda d: write_rationales(d, n)),
      cost={"sft": 0.3},
      default_cost=0.3,
      eval_cost=10.0,
  )
