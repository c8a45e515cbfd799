"""Evaluation worker of one unit: python -m cot2align_jax.experiment.worker UNIT_DIR/unit.json

Loads the unit's config (the same file, arg and overrides the training got), the trained
student from UNIT_DIR/train/export, and scores it on every (data set, prompt) column of the
spec's evaluation; writes UNIT_DIR/eval.json ({column: {"metric", "n", "score", "items",
"ids", "seconds"}}, written atomically) and the generations under UNIT_DIR/eval/. A column's
score is the mean over items of the per-item score (×100) averaged over the sampling seeds.
Errors: one line on stderr, exit 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from cot2align_jax.data import sources
from cot2align_jax.data.records import DataError, Example
from cot2align_jax.evaluation.protocol import SamplingSettings, TextGenerator, score_texts
from cot2align_jax.evaluation.protocol import metric_for
from cot2align_jax.models import from_pretrained, load_tokenizer
from cot2align_jax.models.config import ModelError
from cot2align_jax.training import config as C
from cot2align_jax.training import setup

EVAL_FILE = "eval.json"
EXPORT_DIR = "export"


def column_name(dataset: str, prompt: str) -> str:
  """"arith/test" + "plain" → "arith/test:plain"."""
  return f"{dataset}:{prompt}"


def dataset_items(config, datasets: Sequence[str]) -> list[str]:
  """"name/split" of every evaluation set (a missing split → the set's test split; none
  given → data.dataset's test split)."""
  out = []
  for item in datasets or (str(config.data.dataset),):
    name, _, split = item.partition("/")
    out.append(f"{name}/{split or sources.dataset_spec(name).test_split}")
  return out


def examples_of(config, item: str, max_examples: int) -> list[Example]:
  """The examples of "name/split" (setup.split_examples: the tiny set, own files, registry)."""
  name, _, split = item.partition("/")
  return setup.split_examples(config, name, split, max_examples or None)


def prompt_fn(config, name: str, prompt: str):
  template = setup.data_template(config, name)
  return template.cot if prompt == "cot" else template.plain


def settings_for(config, evaluation: dict[str, Any], prompt: str) -> SamplingSettings:
  new = int(evaluation["new_tokens"][prompt])
  max_prompt = int(evaluation["max_prompt_length"] or config.data.max_prompt)
  return SamplingSettings(greedy=bool(evaluation["greedy"]),
                          temperature=float(evaluation["temperature"]),
                          top_p=float(evaluation["top_p"]),
                          no_repeat_ngram_size=int(evaluation["no_repeat_ngram_size"]),
                          max_prompt_length=max_prompt, max_length=max_prompt + new,
                          max_new_tokens=new, prompt_bucket=int(evaluation["prompt_bucket"]),
                          special_tokens=str(config.data.special_tokens))


def evaluate_unit(unit: dict[str, Any]) -> dict[str, Any]:
  """Scores of every column of one unit (see the module doc)."""
  unit_dir = Path(unit["dir"])
  evaluation = unit["evaluation"]
  config = C.load_config(unit["config_path"], unit["config_arg"], unit["overrides"])
  export = unit_dir / "train" / EXPORT_DIR
  if not (export / "config.json").is_file():
    raise ModelError(f"no exported student in {export}")
  model = from_pretrained(str(export), dtype=str(config.student.dtype))
  tokenizer = load_tokenizer(str(export))
  out: dict[str, Any] = {}
  gen_dir = unit_dir / "eval"
  gen_dir.mkdir(parents=True, exist_ok=True)
  for item in dataset_items(config, evaluation["datasets"]):
    examples = examples_of(config, item, int(evaluation["max_examples"]))
    if not examples:
      raise DataError(f"{item}: no examples")
    metric = evaluation["metric"] or metric_for(examples)
    for prompt in evaluation["prompts"]:
      start = time.perf_counter()
      generator = TextGenerator(model, tokenizer, settings_for(config, evaluation, prompt),
                                batch_size=int(evaluation["batch_size"]))
      prompts = [prompt_fn(config, item.partition("/")[0], prompt)(ex) for ex in examples]
      per_seed = []
      for seed in evaluation["sampling_seeds"]:
        texts = generator.generate(prompts, int(seed))
        scores = score_texts(examples, texts, metric)
        per_seed.append(scores)
        path = gen_dir / f"{item.replace('/', '_')}_{prompt}_seed{seed}.jsonl"
        with path.open("w", encoding="utf-8") as f:
          for ex, text, score in zip(examples, texts, scores):
            f.write(json.dumps({"id": ex.id, "prediction": text, "score": score},
                               ensure_ascii=False) + "\n")
      items = [sum(s[i] for s in per_seed) / len(per_seed) for i in range(len(examples))]
      out[column_name(item, prompt)] = {
          "metric": metric, "n": len(examples), "score": sum(items) / len(items),
          "items": items, "ids": [ex.id for ex in examples],
          "seconds": round(time.perf_counter() - start, 2)}
  return out


def write_json_atomic(path: Path, payload: Any) -> None:
  """JSON to `path` through a temporary file and os.replace (never half-written)."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(json.dumps(payload, indent=1) + "\n")
  os.replace(tmp, path)


def main(argv: Sequence[str]) -> int:
  if len(argv) != 2:
    print("usage: python -m cot2align_jax.experiment.worker UNIT_DIR/unit.json", file=sys.stderr)
    return 2
  try:
    unit = json.loads(Path(argv[1]).read_text())
    scores = evaluate_unit(unit)
  except (C.ConfigError, DataError, ModelError, KeyError, ValueError, OSError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2
  write_json_atomic(Path(unit["dir"]) / EVAL_FILE, scores)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
