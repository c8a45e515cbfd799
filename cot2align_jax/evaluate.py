"""Evaluate a model by sampling on the plain prompt of test sets (docs/method.md §5).

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

from pathlib import Path

from absl import app, flags

from cot2align_jax.core import cli
from cot2align_jax.core.cli import UsageError
from cot2align_jax.data.sources import dataset_spec
from cot2align_jax.evaluation.protocol import evaluate_sets, results_markdown
from cot2align_jax.models import from_pretrained, load_tokenizer
from cot2align_jax.training import cli_flags
from cot2align_jax.training import config as C
from cot2align_jax.training.mesh import exit_on_peer_loss
from cot2align_jax.training.restore import student_from_checkpoint

FLAGS = flags.FLAGS

cli_flags.define_generation_flags()
cli.define_once(flags.DEFINE_string, "dataset", "dolly",
                "comma-separated test sets: name or name/split")
cli.define_once(flags.DEFINE_string, "split", None,
                "split for sets given without one (default: the test split)")
cli.define_once(flags.DEFINE_string, "workdir", None,
                "output directory for results and generations (with --config: the run's)")
flags.DEFINE_string("seeds", "10,20,30,40,50", "comma-separated sampling seeds")
flags.DEFINE_bool("save_generations", True, "write per-seed generations under workdir")
flags.DEFINE_string("checkpoint", "latest",
                    "with --config and no export: latest, best or a step of workdir/checkpoints")
flags.DEFINE_bool("use_export", True, "with --config: prefer workdir/export over checkpoints")


def parse_seeds(text: str) -> list[int]:
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from None
  if not seeds:
    raise UsageError("--seeds is empty")
  return seeds


def _test_split(name: str) -> str:
  return dataset_spec(name).test_split


def _config_student(config):
  """(model, tokenizer, meta) of the student of a training run (see the module doc)."""
  if FLAGS.model:
    model, tok = cli_flags.load_model_and_tokenizer()
    return model, tok, {"model": FLAGS.model, "source": "model"}
  export = Path(FLAGS.workdir) / "export"
  if FLAGS.use_export and (export / "config.json").is_file():
    model = from_pretrained(str(export), dtype=C.model_spec(config, "student").dtype)
    return model, load_tokenizer(str(export)), {"model": str(export), "source": "export"}
  ckpt_dir = Path(FLAGS.workdir) / "checkpoints"
  model, tok, step = student_from_checkpoint(config, ckpt_dir, FLAGS.checkpoint)
  return model, tok, {"model": f"{ckpt_dir}@{step}", "source": "checkpoint", "step": step}


def _evaluate() -> None:
  if not FLAGS.workdir:
    raise UsageError("--workdir is required")
  if FLAGS.max_examples is not None and FLAGS.max_examples < 1:
    raise UsageError("--max_examples must be >= 1")
  config = cli_flags.cli_config()
  seeds = parse_seeds(FLAGS.seeds)
  datasets = FLAGS.dataset
  if config is not None and not FLAGS["dataset"].present:
    datasets = C.data_config(config).dataset
  sets, prompt_fn = {}, None
  for item in [s.strip() for s in datasets.split(",") if s.strip()]:
    name, _, split = item.partition("/")
    split = split or FLAGS.split or _test_split(name)
    fn = cli_flags.prompt_fns(config, name)[0]
    if sets and fn is not prompt_fn:
      raise UsageError(f"{name} cannot be mixed with sets that use other prompts")
    prompt_fn = fn
    sets[f"{name}/{split}"] = cli_flags.config_examples(config, name, split, FLAGS.max_examples)
  if not sets:
    raise UsageError("--dataset is empty")
  settings = cli_flags.sampling_settings(config)
  mesh = cli_flags.data_mesh(config)
  if config is None:
    model, tokenizer = cli_flags.load_model_and_tokenizer()
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
  print(results_markdown(report.results), end="")
  if report.json_path is not None:
    print(f"wrote {report.json_path}, {report.markdown_path}, {report.plot_path}")


def main(argv) -> None:
  cli.no_arguments(argv)
  cli_flags.run_guarded(lambda: exit_on_peer_loss(_evaluate))


def run() -> None:
  app.run(main, flags_parser=cli_flags.config_parser(config_required=False))


if __name__ == "__main__":
  run()
