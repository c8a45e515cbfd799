"""Evaluate a model by sampling on the plain prompt of test sets (METHOD.md §5).

    python -m cot2align_jax.evaluate --model=path/to/hf_dir --workdir=runs/eval \
        --dataset=dolly,self-inst,vicuna,sinst,gsm8k --seeds=10,20,30,40,50
    python -m cot2align_jax.evaluate --model=... --workdir=/tmp/e --dataset=dolly/dev \
        --max_examples=20 --seeds=10            # quick look

`--dataset` takes registry names (data.sources.DATASETS), each optionally "/split" (default:
the set's test split). Writes eval_results.{json,md,png} and generations/ to --workdir. Every
process of a run does the same work; process 0 writes. Bad input: one line on stderr, exit 2.
(Thin standalone wrapper over cot2align_jax.evaluation.evaluate; the config system will call
the same library functions.)
"""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS


def define_common_flags() -> None:
  """Flags shared with cot2align_jax.generate_cot (defined once per process)."""
  if "model" in FLAGS:
    return
  flags.DEFINE_string("model", None, "HF checkpoint directory, .gguf file or gguf:<name>")
  flags.DEFINE_string("tokenizer", None, "tokenizer path (default: --model)")
  flags.DEFINE_string("data_dir", None, "data directory (default: ../shared/data)")
  flags.DEFINE_string("dtype", "float32", "compute dtype: float32 or bfloat16")
  flags.DEFINE_integer("batch_size", 8, "prompts per generation batch")
  flags.DEFINE_integer("max_examples", None, "keep the first N examples of each set")
  flags.DEFINE_float("temperature", 1.0, "sampling temperature (0 = greedy)")
  flags.DEFINE_float("top_p", 1.0, "nucleus p (1 = off)")
  flags.DEFINE_integer("top_k", 0, "top-k (0 = off)")
  flags.DEFINE_integer("no_repeat_ngram", 6, "no-repeat-ngram size (0 = off)")
  flags.DEFINE_integer("max_length", 512, "prompt + generated token budget")
  flags.DEFINE_integer("max_prompt_length", 256, "prompt tokens kept")
  flags.DEFINE_integer("max_new_tokens", None, "default: max_length - max_prompt_length")
  flags.DEFINE_enum("truncate_side", "left", ["left", "right"],
                    "left: keep a long prompt's last tokens; right: its first")
  flags.DEFINE_bool("shard", True, "shard batches over all devices (mesh axis 'data')")


define_common_flags()
flags.DEFINE_string("dataset", "dolly", "comma-separated test sets: name or name/split")
flags.DEFINE_string("split", None, "split for sets given without one (default: the test split)")
flags.DEFINE_string("workdir", None, "output directory for results and generations")
flags.DEFINE_string("seeds", "10,20,30,40,50", "comma-separated sampling seeds")
flags.DEFINE_bool("save_generations", True, "write per-seed generations under workdir")


class UsageError(ValueError):
  """A bad command-line value."""


def sampling_settings():
  from cot2align_jax.evaluation.evaluate import SamplingSettings
  return SamplingSettings(temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
                          no_repeat_ngram_size=FLAGS.no_repeat_ngram,
                          max_length=FLAGS.max_length,
                          max_prompt_length=FLAGS.max_prompt_length,
                          max_new_tokens=FLAGS.max_new_tokens,
                          truncate_side=FLAGS.truncate_side)


def load_model_and_tokenizer():
  """(model, tokenizer) from --model / --tokenizer / --dtype."""
  from cot2align_jax.models import from_pretrained, load_tokenizer
  if not FLAGS.model:
    raise UsageError("--model is required")
  if FLAGS.dtype not in ("float32", "bfloat16"):
    raise UsageError(f"--dtype must be float32 or bfloat16, got {FLAGS.dtype!r}")
  model = from_pretrained(FLAGS.model, dtype=FLAGS.dtype)
  return model, load_tokenizer(FLAGS.tokenizer or FLAGS.model)


def data_mesh():
  """A 1-D mesh ('data',) over all devices when --shard and there is more than one, else None."""
  import jax
  import numpy as np
  devices = jax.devices()
  if not FLAGS.shard or len(devices) < 2:
    return None
  if FLAGS.batch_size % len(devices):
    raise UsageError(f"--batch_size={FLAGS.batch_size} must be a multiple of the "
                     f"{len(devices)} devices (or pass --noshard)")
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def run_cli(body) -> None:
  """Runs body(); known input errors become one line on stderr and exit status 2."""
  from cot2align_jax.data.records import DataError
  from cot2align_jax.models.config import ModelError
  try:
    body()
  except (UsageError, DataError, ModelError, ValueError, KeyError, OSError) as err:
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_seeds(text: str) -> list[int]:
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from None
  if not seeds:
    raise UsageError("--seeds is empty")
  return seeds


def _evaluate() -> None:
  from cot2align_jax.data.sources import dataset_spec, read_examples
  from cot2align_jax.evaluation.evaluate import evaluate_sets
  if not FLAGS.workdir:
    raise UsageError("--workdir is required")
  if FLAGS.max_examples is not None and FLAGS.max_examples < 1:
    raise UsageError("--max_examples must be >= 1")
  seeds = parse_seeds(FLAGS.seeds)
  sets = {}
  for item in [s.strip() for s in FLAGS.dataset.split(",") if s.strip()]:
    name, _, split = item.partition("/")
    split = split or FLAGS.split or dataset_spec(name).test_split
    sets[f"{name}/{split}"] = read_examples(name, split, source=FLAGS.data_dir,
                                            max_examples=FLAGS.max_examples)
  if not sets:
    raise UsageError("--dataset is empty")
  settings = sampling_settings()
  mesh = data_mesh()
  model, tokenizer = load_model_and_tokenizer()
  report = evaluate_sets(model, tokenizer, sets, seeds, workdir=FLAGS.workdir,
                         settings=settings, batch_size=FLAGS.batch_size,
                         max_examples=FLAGS.max_examples, mesh=mesh,
                         save_generations=FLAGS.save_generations,
                         meta={"model": FLAGS.model, "tokenizer": FLAGS.tokenizer or FLAGS.model,
                               "dtype": FLAGS.dtype})
  from cot2align_jax.evaluation.evaluate import results_markdown
  print(results_markdown(report.results), end="")
  if report.json_path is not None:
    print(f"wrote {report.json_path}, {report.markdown_path}, {report.plot_path}")


def main(argv) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  run_cli(_evaluate)


if __name__ == "__main__":
  app.run(main)
