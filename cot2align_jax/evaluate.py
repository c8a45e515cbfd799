"""Evaluate a model by sampling on the plain prompt of test sets (METHOD.md §5).

    python -m cot2align_jax.evaluate --model=path/to/hf_dir --workdir=runs/eval \
        --dataset=dolly,self-inst,vicuna,sinst,gsm8k --seeds=10,20,30,40,50
    python -m cot2align_jax.evaluate --model=... --workdir=/tmp/e --dataset=dolly/dev \
        --max_examples=20 --seeds=10            # quick look
    python -m cot2align_jax.evaluate --config=configs/tiny.py:cot2align --workdir=/tmp/tiny \
        --seeds=10,20 --max_examples=8          # a training run: its export or checkpoint

`--dataset` takes registry names (data.sources.DATASETS), each optionally "/split" (default:
the set's test split). Writes eval_results.{json,md,png} and generations/ to --workdir. Every
process of a run does the same work; process 0 writes. Bad input: one line on stderr, exit 2.

With `--config` (the training config file, same syntax and --config.<key>=v overrides as
cot2align_jax.train), --workdir is the *training run's* directory and the results go to
`workdir/eval/`. The student is `--model` when given, else `workdir/export` when it exists,
else a checkpoint of `workdir/checkpoints` (`--checkpoint`: latest (default), best or a step
number; read-only restore). Its tokenizer: the export's, the tiny problem's, or student.path's.
The test set defaults to data.dataset's test split (tiny: "tiny/test"); prompt lengths default
to data.max_prompt / data.max_len. (The config has no eval section: the seeds, test sets and
example count are the flags below.)
"""

from __future__ import annotations

import sys

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from cot2align_jax.training.restore import student_from_checkpoint

FLAGS = flags.FLAGS


def define_common_flags() -> None:
  """Flags shared with cot2align_jax.generate_cot (defined once per process)."""
  if "model" in FLAGS:
    return
  config_flags.DEFINE_config_file(
      "config", None, "training config file (configs/*.py[:arg]); see the module doc",
      lock_config=True)
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
flags.DEFINE_string("checkpoint", "latest",
                    "with --config and no export: latest, best or a step of workdir/checkpoints")
flags.DEFINE_bool("use_export", True, "with --config: prefer workdir/export over checkpoints")


class UsageError(ValueError):
  """A bad command-line value."""


def sampling_settings(config=None):
  """SamplingSettings of the flags; with a config, max_length / max_prompt_length not given on
  the command line come from data.max_len / data.max_prompt."""
  from cot2align_jax.evaluation.evaluate import SamplingSettings
  max_length, max_prompt = FLAGS.max_length, FLAGS.max_prompt_length
  if config is not None:
    if not FLAGS["max_length"].present:
      max_length = int(config.data.max_len)
    if not FLAGS["max_prompt_length"].present:
      max_prompt = int(config.data.max_prompt)
  return SamplingSettings(temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
                          no_repeat_ngram_size=FLAGS.no_repeat_ngram,
                          max_length=max_length,
                          max_prompt_length=max_prompt,
                          max_new_tokens=FLAGS.max_new_tokens,
                          truncate_side=FLAGS.truncate_side)


# ---------------------------------------------------------------------------------------------
# --config: models, tokenizers and examples from a training config
# ---------------------------------------------------------------------------------------------


def cli_config():
  """The --config ConfigDict (validated), or None when not given."""
  config = FLAGS.config
  if config is None:
    return None
  from cot2align_jax.training import config as C
  try:
    C.validate(config)
  except C.ConfigError as e:
    raise UsageError(str(e)) from None
  return config


def config_examples(config, name: str, split: str, max_examples: int | None):
  """Examples of one set: the tiny problem's splits for "tiny", else the data registry."""
  if name == "tiny":
    from cot2align_jax.training import tiny
    return tiny.tiny_split_examples(split, max_examples, seed=int(config.data.seed)
                                    if config is not None else 0)
  from cot2align_jax.data.sources import read_examples
  source = (config.data.source or None) if config is not None else None
  return read_examples(name, split, source=FLAGS.data_dir or source, max_examples=max_examples)


def prompt_fns(name: str):
  """(plain prompt fn, CoT prompt fn) of a set: the tiny problem's short prompts for "tiny",
  the "qa" template's for sets registered with it (arith), else (None, None) = the Alpaca
  templates of data.records."""
  if name == "tiny":
    from cot2align_jax.training import tiny
    return tiny.tiny_plain_prompt, tiny.tiny_cot_prompt
  from cot2align_jax.data.records import get_template
  from cot2align_jax.data.sources import DATASETS
  spec = DATASETS.get(name)
  if spec is not None and spec.template != "alpaca":
    template = get_template(spec.template)
    return template.plain, template.cot
  return None, None


def load_model_and_tokenizer():
  """(model, tokenizer) from --model / --tokenizer / --dtype."""
  from cot2align_jax.models import from_pretrained, load_tokenizer
  if not FLAGS.model:
    raise UsageError("--model is required")
  if FLAGS.dtype not in ("float32", "bfloat16"):
    raise UsageError(f"--dtype must be float32 or bfloat16, got {FLAGS.dtype!r}")
  model = from_pretrained(FLAGS.model, dtype=FLAGS.dtype)
  return model, load_tokenizer(FLAGS.tokenizer or FLAGS.model)


def data_mesh(config=None):
  """A 1-D mesh ('data',) over all devices when --shard and there is more than one, else None.
  With a config: over mesh.data × mesh.fsdp devices (all when mesh.data is -1)."""
  import jax
  import numpy as np
  devices = jax.devices()
  if config is not None and int(config.mesh.data) > 0:
    devices = devices[:int(config.mesh.data) * max(int(config.mesh.fsdp), 1)]
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
  from cot2align_jax.training.mesh import maybe_initialize_distributed
  try:
    maybe_initialize_distributed()  # one process of a multi-host job: join it first
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


def _test_split(name: str) -> str:
  if name == "tiny":
    return "test"
  from cot2align_jax.data.sources import dataset_spec
  return dataset_spec(name).test_split


def _config_student(config):
  """(model, tokenizer, meta) of the student of a training run (see the module doc)."""
  from cot2align_jax.models import from_pretrained, load_tokenizer
  if FLAGS.model:
    model, tok = load_model_and_tokenizer()
    return model, tok, {"model": FLAGS.model, "source": "model"}
  export = Path(FLAGS.workdir) / "export"
  if FLAGS.use_export and (export / "config.json").is_file():
    model = from_pretrained(str(export), dtype=config.student.dtype)
    return model, load_tokenizer(str(export)), {"model": str(export), "source": "export"}
  ckpt_dir = Path(FLAGS.workdir) / "checkpoints"
  model, tok, step = student_from_checkpoint(config, ckpt_dir, FLAGS.checkpoint)
  return model, tok, {"model": f"{ckpt_dir}@{step}", "source": "checkpoint", "step": step}


def _evaluate() -> None:
  from cot2align_jax.evaluation.evaluate import evaluate_sets
  if not FLAGS.workdir:
    raise UsageError("--workdir is required")
  if FLAGS.max_examples is not None and FLAGS.max_examples < 1:
    raise UsageError("--max_examples must be >= 1")
  config = cli_config()
  seeds = parse_seeds(FLAGS.seeds)
  datasets = FLAGS.dataset
  if config is not None and not FLAGS["dataset"].present:
    datasets = config.data.dataset
  sets, prompt_fn = {}, None
  for item in [s.strip() for s in datasets.split(",") if s.strip()]:
    name, _, split = item.partition("/")
    split = split or FLAGS.split or _test_split(name)
    fn = prompt_fns(name)[0]
    if sets and fn is not prompt_fn:
      raise UsageError(f"{name} cannot be mixed with sets that use other prompts")
    prompt_fn = fn
    sets[f"{name}/{split}"] = config_examples(config, name, split, FLAGS.max_examples)
  if not sets:
    raise UsageError("--dataset is empty")
  settings = sampling_settings(config)
  mesh = data_mesh(config)
  if config is None:
    model, tokenizer = load_model_and_tokenizer()
    out_dir = FLAGS.workdir
    meta = {"model": FLAGS.model, "tokenizer": FLAGS.tokenizer or FLAGS.model,
            "dtype": FLAGS.dtype}
  else:
    model, tokenizer, meta = _config_student(config)
    out_dir = str(Path(FLAGS.workdir) / "eval")
    meta["config"] = FLAGS["config"].config_filename
  report = evaluate_sets(model, tokenizer, sets, seeds, workdir=out_dir,
                         settings=settings, batch_size=FLAGS.batch_size,
                         max_examples=FLAGS.max_examples, mesh=mesh,
                         save_generations=FLAGS.save_generations, meta=meta,
                         prompt_fn=prompt_fn)
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
