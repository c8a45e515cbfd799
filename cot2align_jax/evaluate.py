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


def _tiny_problem(config):
  from cot2align_jax.training import loop, tiny
  s_dims = loop._tiny_dims(config.student.tiny or "", "student")  # pylint: disable=protected-access
  t_dims = loop._tiny_dims(config.teacher.tiny or "", "teacher")  # pylint: disable=protected-access
  return tiny.tiny_problem(8, student_d=s_dims.get("d", 32), teacher_d=t_dims.get("d", 48),
                           layers=s_dims.get("layers", 2))


def config_model(config, side: str, *, pretrained: bool = True):
  """(model, tokenizer, label) of config.<side>: the tiny problem's model (initialised as the
  training loop does: student seed train.seed, teacher train.seed + 1) or student/teacher.path
  (with pretrained=False: randomly initialised from its config.json, for checkpoint restores)."""
  import json
  from cot2align_jax.models import hf
  from cot2align_jax.training import config as C
  spec = C.model_spec(config, side)
  seed = int(config.train.seed) + (1 if side == "teacher" else 0)
  if spec.tiny:
    prob = _tiny_problem(config)
    cfg = prob.student_cfg if side == "student" else prob.teacher_cfg
    tok = prob.student_tok if side == "student" else prob.teacher_tok
    cfg = cfg.replace(dtype=spec.dtype, param_dtype=spec.param_dtype)
    return hf.create_model(cfg, seed=seed), tok, f"tiny:{side}:{spec.tiny}"
  if not spec.path:
    raise UsageError(f"{side}.path is empty: set --config.{side}.path (or {side}.tiny)")
  tok = hf.load_tokenizer(spec.path)
  if pretrained and spec.init == "pretrained":
    model = hf.from_pretrained(spec.path, dtype=spec.dtype, param_dtype=spec.param_dtype)
  else:
    raw = json.loads((hf.resolve_checkpoint(spec.path) / "config.json").read_text())
    model = hf.create_model(hf.config_from_hf(raw, dtype=spec.dtype,
                                              param_dtype=spec.param_dtype), seed=seed)
  return model, tok, spec.path


def _teacher_width(config) -> int:
  import json
  from cot2align_jax.models import hf
  if config.teacher.tiny:
    return _tiny_problem(config).teacher_cfg.hidden_size
  raw = json.loads((hf.resolve_checkpoint(config.teacher.path) / "config.json").read_text())
  return hf.config_from_hf(raw).hidden_size


def student_from_checkpoint(config, ckpt_dir, which: str = "latest"):
  """(model, tokenizer, step) of the student in a training run's checkpoint directory: builds
  the train state as training/loop.py does and restores it read-only (latest, best or a step)."""
  from flax import nnx
  from cot2align_jax.losses.methods import build_projectors, method_from_config
  from cot2align_jax.training import checkpoint as ckpt_lib
  from cot2align_jax.training import config as C
  from cot2align_jax.training import state as state_lib
  if not Path(ckpt_dir).is_dir():
    raise UsageError(f"no export and no checkpoint directory {ckpt_dir}")
  method = method_from_config(C.kd_config(config))
  student, tok, _ = config_model(config, "student", pretrained=False)
  d_s = student.config.hidden_size
  d_t = _teacher_width(config) if method.needs_teacher else d_s
  seed = int(config.train.seed)
  projectors = build_projectors(method, d_s, d_t, rngs=nnx.Rngs(seed))
  total = max(int(config.optim.total_steps), int(config.train.steps),
              int(config.optim.warmup_steps) + 1, 1)
  opt_cfg = C.optim_config(config, total_steps=total)
  optimizer = state_lib.make_optimizer(opt_cfg)
  state, (student_gd, _) = state_lib.init_state(student, projectors, opt_cfg, seed=seed,
                                                optimizer=optimizer)
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, C.checkpoint_config(config), read_only=True)
  try:
    step = None
    if which == "best":
      step = ckpt.best_step()
      if step is None:
        raise UsageError(f"{ckpt_dir}: no best checkpoint (checkpoint.best_metric unset or "
                         "never reported)")
    elif which != "latest":
      try:
        step = int(which)
      except ValueError:
        raise UsageError(f"--checkpoint must be latest, best or a step, got {which!r}") from None
    step, state, _ = ckpt.restore(ckpt_lib.abstract_like(state), step=step)
  except ckpt_lib.CheckpointError as e:
    raise UsageError(str(e).split("\n")[0]) from None
  finally:
    ckpt.close()
  return nnx.merge(student_gd, state.params), tok, step


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
  else (None, None) = the Alpaca templates of data.records."""
  if name == "tiny":
    from cot2align_jax.training import tiny
    return tiny.tiny_plain_prompt, tiny.tiny_cot_prompt
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
      raise UsageError("the tiny set cannot be mixed with other sets (different prompts)")
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
