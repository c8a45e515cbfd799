"""Data-pipeline throughput: view building, dual tokenization, alignment, batching (host CPU).

Run from the repository root:

  python bench/data.py                      # all of Dolly train, qwen1.5 (teacher) -> gpt2 (student)
  python bench/data.py --quick              # 200 examples: a CI smoke run
  python bench/data.py --max-examples 2000  # the first 2000 examples

Rows of the JSON (bench/results/data.json), each in examples/s of the *records* processed:

  views      building records (plain + CoT views) from the Dolly examples
  tokenize   RowBuilder without alignment: main view and pair view, each by both tokenizers
  align      RowBuilder with the alignment arrays the alignment module provides
  pipeline   the whole grain pipeline (shuffle, map, batch + bucket padding), in-process
  mined_map  time to build the MinED teacher→student vocabulary map, or "not available"

CoT records need rationales; Dolly has none here, so every example with a non-empty input gets a
synthetic rationale (its instruction, restated) to exercise the paired view: the token counts
differ from a real run, the code path is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from cot2align_jax.data import pipeline as pl  # noqa: E402
from cot2align_jax.core.paths import shared_dir  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--max-examples", type=int, default=None, help="first N Dolly train examples")
  p.add_argument("--quick", action="store_true", help="200 examples (CI smoke)")
  p.add_argument("--teacher", default="qwen1.5")
  p.add_argument("--student", default="gpt2")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--out", default="bench/results/data.json")
  args = p.parse_args(argv)
  if args.quick and args.max_examples is None:
    args.max_examples = 200
  if args.max_examples is not None and args.max_examples < 1:
    p.error("--max-examples must be >= 1")
  return args


def load_records(shared: Path, max_examples: int | None) -> list:
  """Records of Dolly train via data.records / data.sources, else a plain JSON fallback."""
  try:
    from cot2align_jax.data import records, sources  # pylint: disable=g-import-not-at-top
  except ImportError:
    return _fallback_records(shared / "data" / "dolly" / "train.jsonl", max_examples)
  examples = sources.read_examples("dolly", "train", source=shared / "data",
                                   max_examples=max_examples)
  rationales = {e.id: "The task asks: " + e.instruction for e in examples if e.input}
  return list(records.build_records(examples, rationales))


def _fallback_records(path: Path, max_examples: int | None) -> list[dict]:
  """Plain-only dict records straight from the JSONL file (when data.records is missing)."""
  out = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if max_examples is not None and i >= max_examples:
        break
      row = json.loads(line)
      out.append({"example_id": i, "prompt": row["prompt"], "response": row["output"],
                  "pair_prompt": None, "pair_response": None, "has_pair": False})
  return out


def timed(fn) -> tuple[float, object]:
  """(seconds, result) of fn()."""
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def mined_map(teacher, student) -> tuple[dict, np.ndarray | None]:
  """Builds the MinED vocab map through the alignment module if it has a builder."""
  try:
    from cot2align_jax.alignment import mined  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {"status": "not available"}, None
  info = {}
  seconds, vmap = timed(lambda: mined.build_mined_vocab_map(teacher, student, info=info))
  return {"status": "ok", "seconds": round(seconds, 3), "cache_hit": bool(info.get("cache_hit")),
          "n_searched": info.get("n_searched")}, np.asarray(vmap)


def rate(n: int, seconds: float) -> dict:
  return {"examples": n, "seconds": round(seconds, 3), "examples_per_s": round(n / seconds, 1)}


def main(argv=None) -> int:
  args = parse_args(argv)
  shared = shared_dir()
  if shared is None:
    print("error: ../shared not found (set COT2ALIGN_SHARED)", file=sys.stderr)
    return 2
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  load = lambda n: AutoTokenizer.from_pretrained(str(shared / "tokenizers" / n))
  student, teacher = load(args.student), load(args.teacher)
  t_views, recs = timed(lambda: load_records(shared, args.max_examples))
  n = len(recs)
  result = {"teacher": args.teacher, "student": args.student, "records": n,
            "paired_records": int(sum(bool(pl._field(r, "has_pair")) for r in recs)),
            "views": rate(n, t_views)}
  result["mined_map"], vocab_map = mined_map(teacher, student)

  base = dict(batch_size=args.batch, shard_index=0, shard_count=1, seed=0)
  rows = pl.RowBuilder(student, teacher, pl.PipelineConfig(alignment=(), **base))
  t_tok, built = timed(lambda: [rows(r) for r in recs])
  result["tokenize"] = rate(n, t_tok)
  lengths = {s: np.asarray([len(r[f"main/{s}/input_ids"]) for r in built]) for s in ("student",
                                                                                    "teacher")}
  result["mean_positions"] = {s: round(float(v.mean()), 1) for s, v in lengths.items()}

  methods = pl.available_alignments()
  result["alignment_methods"] = list(methods)
  if methods:
    arows = pl.RowBuilder(student, teacher, pl.PipelineConfig(alignment=methods, **base),
                          vocab_map)
    t_align, _ = timed(lambda: [arows(r) for r in recs])
    result["align"] = rate(n, t_align)
  else:
    result["align"] = {"status": "not available"}

  cfg = pl.PipelineConfig(alignment=methods, **base)
  pipe = pl.Pipeline(recs, student, teacher, cfg, mined_vocab_map=vocab_map)
  t_pipe, batches = timed(lambda: list(pipe))
  result["pipeline"] = rate(n, t_pipe)
  widths = [b["main/student/input_ids"].shape[1] for b in batches]
  result["student_bucket_counts"] = {str(w): widths.count(w) for w in sorted(set(widths))}
  result["host"] = {"python": platform.python_version(), "cpus": os.cpu_count()}

  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
