"""The training loop: config → models, data, mesh, state → steps, logs, evaluation, checkpoints.

    summary = train(load_config("configs/tiny.py", "cot2align"), "/tmp/run")

What `train(config, workdir)` does, in order:
  1. checks the config (training/config.py: unknown keys, LoRA, method names → ConfigError);
     with student.lora.enabled the student gets LoRA factors (ModelConfig.lora_*) and only
     they and the projectors are trained (training/state.py); the export merges them;
  2. loads the tokenizers and models (`student.path` / `teacher.path` through models.hf, or the
     tiny problem of training/tiny.py when `*.tiny` is set); the teacher is frozen (its params
     are an argument of the step, never updated) and may be held in bf16; SFT loads no teacher;
  3. builds the records (data.sources + data.records; rationales from `data.rationales`), the
     grain Pipeline (+ the MinED vocabulary map when the method needs it) and the dev pipeline;
  4. builds the mesh, the train state (training/state.py) placed with `state_shardings`, and
     the jitted train / eval steps (training/steps.py);
  5. resumes from `workdir/checkpoints` when it holds a checkpoint: state, grain iterator state
     (so the next batch is the one the interrupted run would have drawn) and step; lines of
     `metrics.jsonl` past the restored step are dropped (they came from the lost steps);
  6. runs the steps with a tqdm bar (loss, tokens/s); every `train.log_every` steps appends one
     line to `workdir/metrics.jsonl` ({"step", "split": "train", each metric as Σsum/Σcount over
     the window, "lr", "tokens_per_s"}) and writes TensorBoard scalars to `workdir/tb/`;
     every `train.eval_every` steps (0 = once per epoch) evaluates the dev split (the training
     objective's terms via eval_step, "dev/<name>", plus `dev_metric_fn` / ROUGE-L) and logs a
     {"split": "dev"} line; saves a checkpoint every `checkpoint.save_every` steps, at every
     evaluation when a best metric is tracked, and at the end;
  7. on SIGTERM (training/checkpoint.PreemptionGuard) saves at the current step, waits for the
     write and returns {"preempted": True} (the CLI then exits 0);
  8. at the end writes the student as a Hugging Face checkpoint to `workdir/export`.

Determinism: with the same config, a run resumed from a checkpoint at step N reproduces the
uninterrupted run exactly on the same machine and device count (the state is restored bit for
bit, the grain iterator resumes at the same batch, the step's randomness comes from the state's
rng); tests/training/test_loop.py checks this bitwise on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from cot2align_jax.data import spec
from cot2align_jax.training import config as C

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
CKPT_DIR = "checkpoints"
EXPORT_DIR = "export"

DevMetricFn = Callable[[nnx.Module, int], Mapping[str, float]]


# --------------------------------------------------------------------------------------------
# Models, tokenizers, records
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Problem:
  """Everything the loop needs from the outside world."""
  student_tok: Any
  teacher_tok: Any
  student: nnx.Module
  teacher: nnx.Module | None
  train_records: Sequence[Any]
  dev_records: Sequence[Any]
  dev_examples: Sequence[Any]


def _is_main() -> bool:
  return jax.process_index() == 0


def _model_overrides(spec_: C.ModelSpec, tokenizer) -> dict:
  out = {"dtype": spec_.dtype, "param_dtype": spec_.param_dtype}
  if spec_.remat:
    out["remat"] = True
  out.update(C.lora_overrides(spec_))
  if spec_.valid_vocab_size > 0:
    out["valid_vocab_size"] = spec_.valid_vocab_size
  elif spec_.valid_vocab_size < 0 and tokenizer is not None:
    out["valid_vocab_size"] = len(tokenizer)
  return out


def _load_hf_model(spec_: C.ModelSpec, tokenizer, seed: int):
  from cot2align_jax.models import hf  # pylint: disable=g-import-not-at-top
  overrides = _model_overrides(spec_, tokenizer)
  if spec_.init == "random":
    directory = hf.resolve_checkpoint(spec_.path)
    raw = json.loads((Path(directory) / "config.json").read_text())
    return hf.create_model(hf.config_from_hf(raw, **overrides), seed=seed)
  return hf.from_pretrained(spec_.path, seed=seed, **overrides)


def _check_paths(student: C.ModelSpec, teacher: C.ModelSpec, needs_teacher: bool) -> None:
  """One-line errors for missing model paths (before anything heavy is loaded)."""
  from cot2align_jax.models.config import ModelError  # pylint: disable=g-import-not-at-top
  for side, s, needed in (("student", student, True), ("teacher", teacher, needs_teacher)):
    if not needed or s.tiny:
      continue
    if not s.path:
      raise C.ConfigError(f"{side}.path is empty: set --config.{side}.path=<HF dir | org/name | "
                          f"gguf:name> (or {side}.tiny for the tiny problem)")
    name = s.path
    if name.startswith("gguf:") or name.endswith(".gguf"):
      continue
    p = Path(name).expanduser()
    looks_like_hub = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not p.exists() and (not looks_like_hub or offline):
      hint = " (HF_HUB_OFFLINE is set, so Hub names are not downloaded)" if looks_like_hub else ""
      raise ModelError(f"{side}.path: checkpoint not found: {name} does not exist{hint}")


def _read_records(config: ml_collections.ConfigDict):
  """(train records, dev records, dev examples) of a registered data set."""
  from cot2align_jax.data import records as R  # pylint: disable=g-import-not-at-top
  from cot2align_jax.data import sources  # pylint: disable=g-import-not-at-top
  d = config.data
  source = d.source or None
  try:
    examples = sources.read_examples(d.dataset, d.split, source=source,
                                     max_examples=d.max_examples or None)
  except KeyError as e:
    raise C.ConfigError(f"data: {e.args[0] if e.args else e}") from None
  rationales = {}
  if d.rationales:
    if not Path(d.rationales).is_file():
      raise C.ConfigError(f"data.rationales: file not found: {d.rationales}")
    rationales = sources.import_rationales(d.rationales, examples, on_unknown="drop")
  elif config.kd.method == "cot2align" and d.cot_rule != "none":
    raise C.ConfigError("kd.method=cot2align needs CoT rationales: set --config.data.rationales="
                        "<JSONL of {id, rationale}> (python -m cot2align_jax.generate_cot writes "
                        "one), or --config.data.cot_rule=none to train without CoT records")
  template = sources.dataset_spec(d.dataset).template
  train_records = R.build_records(examples, rationales, cot_rule=d.cot_rule, template=template)
  dev_examples, dev_records = [], []
  if d.dev_split:
    try:
      dev_examples = sources.read_examples(d.dataset, d.dev_split, source=source,
                                           max_examples=d.dev_max_examples or None)
    except KeyError as e:
      raise C.ConfigError(f"data.dev_split: {e.args[0] if e.args else e}") from None
    dev_records = R.build_records(dev_examples, None, cot_rule="none", template=template)
  return train_records, dev_records, dev_examples


def _tiny_dims(text: str, side: str) -> dict[str, int]:
  """"d=32,layers=2" (or any label without "=", e.g. "default") → {"d": 32, "layers": 2}."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    if "=" not in part:
      continue
    k, v = part.split("=", 1)
    if k.strip() not in ("d", "layers"):
      raise C.ConfigError(f"{side}.tiny: unknown field {k.strip()!r} in {text!r}; "
                          "use d=<width>,layers=<n>")
    out[k.strip()] = int(v)
  return out


def _tiny_problem(config: ml_collections.ConfigDict, needs_teacher: bool,
                  kd_cfg=None) -> Problem:
  """The tiny cross-tokenizer problem of training/tiny.py (tests and the demo).

  data.max_examples / data.dev_max_examples: examples of the train / dev problem sets (drawn
  with seeds data.seed and data.seed + 1); the dev records are the plain ones.
  """
  from cot2align_jax.models import hf  # pylint: disable=g-import-not-at-top
  from cot2align_jax.training import tiny  # pylint: disable=g-import-not-at-top
  student_spec, teacher_spec = C.model_spec(config, "student"), C.model_spec(config, "teacher")
  s_dims = _tiny_dims(student_spec.tiny, "student")
  t_dims = _tiny_dims(teacher_spec.tiny, "teacher")
  if s_dims.get("layers", 2) != t_dims.get("layers", s_dims.get("layers", 2)):
    raise C.ConfigError("student.tiny and teacher.tiny must have the same number of layers")
  seed = int(config.data.seed)
  kw = dict(student_d=s_dims.get("d", 32), teacher_d=t_dims.get("d", 48),
            layers=s_dims.get("layers", 2), bucket=max(config.data.buckets))
  train_p = tiny.tiny_problem(config.data.max_examples or 64, seed=seed, **kw)
  if kd_cfg is not None and needs_teacher:
    _check_vocabularies(kd_cfg, train_p.student_tok, train_p.teacher_tok)
  train_records = train_p.records
  if config.data.rationales:  # CoT records from a rationale file (generate_cot) instead
    from cot2align_jax.data import sources  # pylint: disable=g-import-not-at-top
    if not Path(config.data.rationales).is_file():
      raise C.ConfigError(f"data.rationales: file not found: {config.data.rationales}")
    examples = tiny.tiny_split_examples("train", config.data.max_examples or 64, seed=seed)
    rationales = sources.import_rationales(config.data.rationales, examples, on_unknown="drop")
    train_records = tiny.tiny_records(examples, rationales)
  dev_records, dev_examples = [], []
  if config.data.dev_split:
    dev_p = tiny.tiny_problem(config.data.dev_max_examples or 16, seed=seed + 1, **kw)
    dev_records = [r for r in dev_p.records if not r["has_pair"]]
    dev_examples = tiny.tiny_split_examples("dev", config.data.dev_max_examples or 16, seed=seed)
  s_cfg = train_p.student_cfg.replace(**_model_overrides(student_spec, None))
  student = hf.create_model(s_cfg, seed=int(config.train.seed))
  teacher = None
  if needs_teacher:
    t_cfg = train_p.teacher_cfg.replace(**_model_overrides(teacher_spec, None))
    teacher = hf.create_model(t_cfg, seed=int(config.train.seed) + 1)
  return Problem(train_p.student_tok, train_p.teacher_tok, student, teacher, train_records,
                 dev_records, dev_examples)


def build_problem(config: ml_collections.ConfigDict, needs_teacher: bool,
                  kd_cfg=None) -> Problem:
  """Tokenizers, models and records for a config (tiny problem or HF checkpoints + data).
  With `kd_cfg`, a vocabulary mismatch for plain KD is reported before the models load."""
  from cot2align_jax.models import hf  # pylint: disable=g-import-not-at-top
  student_spec, teacher_spec = C.model_spec(config, "student"), C.model_spec(config, "teacher")
  if student_spec.tiny:
    return _tiny_problem(config, needs_teacher, kd_cfg)
  _check_paths(student_spec, teacher_spec, needs_teacher)
  student_tok = hf.load_tokenizer(student_spec.path)
  teacher_tok = hf.load_tokenizer(teacher_spec.path) if teacher_spec.path else student_tok
  if kd_cfg is not None and needs_teacher:
    _check_vocabularies(kd_cfg, student_tok, teacher_tok)
  student = _load_hf_model(student_spec, student_tok, config.train.seed)
  teacher = None
  if needs_teacher:
    teacher = hf.from_pretrained(teacher_spec.path,
                                 **_model_overrides(teacher_spec, teacher_tok))
  train_records, dev_records, dev_examples = _read_records(config)
  return Problem(student_tok, teacher_tok, student, teacher, train_records, dev_records,
                 dev_examples)


# --------------------------------------------------------------------------------------------
# Metric writers
# --------------------------------------------------------------------------------------------


class MetricWriter:
  """metrics.jsonl (one JSON object a line) + TensorBoard scalars; process 0 writes."""

  def __init__(self, workdir: Path, resume_step: int | None):
    self.enabled = _is_main()
    self.path = workdir / METRICS_FILE
    self.tb = None
    if not self.enabled:
      return
    if resume_step is not None and self.path.exists():
      self._truncate(resume_step)
    elif resume_step is None and self.path.exists():
      self.path.unlink()
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(logdir=str(workdir / TB_DIR))
    except ImportError:  # pragma: no cover - a requirement
      log.warning("tensorboardX is not installed: no TensorBoard event files")

  def _truncate(self, step: int) -> None:
    """Drops lines of steps after `step` (written by a run that was killed before saving)."""
    kept = []
    for line in self.path.read_text().splitlines():
      try:
        if int(json.loads(line).get("step", 0)) <= step:
          kept.append(line)
      except (ValueError, AttributeError):
        continue
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in kept))
    os.replace(tmp, self.path)

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": split}
    row.update({k: _json_float(v) for k, v in values.items()})
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self.tb.add_scalar(k if k.startswith(split + "/") else f"{split}/{k}", v, step)
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _json_float(v):
  v = float(v)
  return v if math.isfinite(v) else str(v)


def reduce_metrics(window: Sequence[Mapping[str, tuple[Any, Any]]]) -> dict[str, float]:
  """Σsum / Σcount per metric over steps (one device_get for the whole window)."""
  host = jax.device_get(list(window))
  sums: dict[str, list[float]] = {}
  for m in host:
    for k, (s, c) in m.items():
      acc = sums.setdefault(k, [0.0, 0.0])
      acc[0] += float(s)
      acc[1] += float(c)
  return {k: (s / c if c else float("nan")) for k, (s, c) in sums.items()}


def _batch_tokens(batch: Mapping[str, np.ndarray]) -> int:
  """Real student tokens of a batch (main view + pair view)."""
  return int(sum(np.sum(batch[spec.key(v, "student", "attention_mask")]) for v in spec.VIEWS))


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
  total_steps: int
  steps_per_epoch: int
  num_epochs: int | None
  eval_every: int
  log_every: int


def _schedule(config, n_records: int, per_host_batch: int, process_count: int,
              drop_remainder: bool) -> Schedule:
  t = config.train
  n_host = n_records // process_count if process_count > 1 else n_records
  if n_host < 1:
    raise C.ConfigError("no training records")
  per_epoch = (n_host // per_host_batch) if drop_remainder else math.ceil(n_host / per_host_batch)
  per_epoch = max(per_epoch, 1)
  if t.steps > 0:
    total, epochs = int(t.steps), None
  elif t.epochs > 0:
    total, epochs = int(t.epochs) * per_epoch, int(t.epochs)
  else:
    raise C.ConfigError("set train.steps > 0 or train.epochs > 0")
  eval_every = per_epoch if t.eval_every == 0 else (0 if t.eval_every < 0 else int(t.eval_every))
  return Schedule(total, per_epoch, epochs, eval_every, max(int(t.log_every), 1))


def _make_mesh(config):
  from cot2align_jax.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  sizes = dict(data=int(config.mesh.data), fsdp=int(config.mesh.fsdp),
               tensor=int(config.mesh.tensor))
  devices = jax.devices()
  if -1 not in sizes.values():
    n = int(np.prod(list(sizes.values())))
    if n < len(devices) and jax.process_count() == 1:
      log.info("mesh %s uses %d of %d devices", sizes, n, len(devices))
      devices = devices[:n]
  try:
    return mesh_lib.make_mesh(**sizes, devices=devices)
  except ValueError as e:
    raise C.ConfigError(f"mesh: {e}") from None


def _global_stop(flag: bool) -> bool:
  """The SIGTERM decision, agreed by every process (any process stopping stops all)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _rouge_dev_metric_fn(problem: Problem, config, mesh) -> DevMetricFn:
  """Dev ROUGE-L (exact match for sets registered with it) of one sampled pass, with the
  config's prompt / total lengths (data.max_prompt / data.max_len) and the set's prompts."""
  from cot2align_jax.evaluation.evaluate import SamplingSettings, dev_rouge_l  # pylint: disable=g-import-not-at-top
  kw = dict(settings=SamplingSettings(max_length=int(config.data.max_len),
                                      max_prompt_length=int(config.data.max_prompt)))
  if config.student.tiny:  # short prompts of the tiny problem
    from cot2align_jax.training import tiny  # pylint: disable=g-import-not-at-top
    kw["prompt_fn"] = tiny.tiny_plain_prompt
  else:
    from cot2align_jax.data import records, sources  # pylint: disable=g-import-not-at-top
    template = records.get_template(sources.dataset_spec(config.data.dataset).template)
    if template.name != "alpaca":
      kw["prompt_fn"] = template.plain

  def fn(model, step):
    del step
    return {"rouge_l": dev_rouge_l(model, problem.student_tok, problem.dev_examples,
                                   seed=int(config.train.seed), mesh=mesh,
                                   max_examples=config.data.dev_max_examples or None, **kw)}
  return fn


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          dev_metric_fn: DevMetricFn | None = None,
          after_step: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run described by `config` in `workdir`; see the module doc.

  dev_metric_fn(student_model, step) -> {name: value}: extra dev metrics (logged as "dev/name";
    one of them may be the checkpoint's best_metric). Default: ROUGE-L when
    train.dev_metric == "rouge_l".
  after_step(step): called after each step (tests use it to stop a run at a known point).
  Returns a summary: {"step", "start_step", "resumed", "preempted", "final_metrics",
    "dev_metrics", "export", "workdir"}.
  """
  from cot2align_jax.losses.methods import build_projectors, method_from_config  # pylint: disable=g-import-not-at-top
  from cot2align_jax.data.pipeline import Pipeline  # pylint: disable=g-import-not-at-top
  from cot2align_jax.training import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from cot2align_jax.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from cot2align_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from cot2align_jax.training import steps as steps_lib  # pylint: disable=g-import-not-at-top

  workdir = Path(workdir).expanduser().resolve()
  C.validate(config)
  kd_cfg = C.kd_config(config)
  method = method_from_config(kd_cfg)
  if config.train.dev_metric not in ("", "rouge_l"):
    raise C.ConfigError(f"train.dev_metric must be '' or 'rouge_l', got "
                        f"{config.train.dev_metric!r}")

  with ckpt_lib.PreemptionGuard() as guard:
    mesh_lib.maybe_initialize_distributed()
    workdir.mkdir(parents=True, exist_ok=True)
    problem = build_problem(config, method.needs_teacher, kd_cfg)
    _check_vocabularies(kd_cfg, problem.student_tok, problem.teacher_tok, problem.student,
                        problem.teacher)
    mesh = _make_mesh(config)
    process_count = jax.process_count()
    if config.data.batch_size % process_count:
      raise C.ConfigError(f"data.batch_size {config.data.batch_size} is not divisible by the "
                          f"{process_count} processes")
    per_host_batch = config.data.batch_size // process_count
    _check_batch(int(config.data.batch_size), int(config.optim.accumulate), mesh)

    # Data.
    alignment = (C.alignment_for(kd_cfg) if config.data.alignment == "auto"
                 else config.data.alignment)
    sched = _schedule(config, len(problem.train_records), per_host_batch, process_count,
                      bool(config.data.drop_remainder))
    pipe_cfg = C.pipeline_config(config, batch_size=per_host_batch, num_epochs=sched.num_epochs,
                                 alignment=alignment)
    vocab_map = None
    if C.needs_vocab_map(kd_cfg):
      from cot2align_jax.alignment.mined import build_mined_vocab_map  # pylint: disable=g-import-not-at-top
      vocab_map = build_mined_vocab_map(problem.teacher_tok, problem.student_tok,
                                        teacher_vocab_size=problem.teacher.config.vocab_size)
    pipeline = Pipeline(problem.train_records, problem.student_tok, problem.teacher_tok,
                        pipe_cfg, mined_vocab_map=vocab_map)
    dev_pipeline = None
    if problem.dev_records and sched.eval_every:
      dev_cfg = dataclasses.replace(pipe_cfg, shuffle=False, num_epochs=1, drop_remainder=False,
                                    worker_count=0)
      dev_pipeline = Pipeline(problem.dev_records, problem.student_tok, problem.teacher_tok,
                              dev_cfg, mined_vocab_map=vocab_map)

    # State.
    opt_cfg = C.optim_config(config, total_steps=int(config.optim.total_steps) or
                             sched.total_steps)
    d_s = problem.student.config.hidden_size
    d_t = problem.teacher.config.hidden_size if problem.teacher is not None else d_s
    projectors = build_projectors(method, d_s, d_t, rngs=nnx.Rngs(int(config.train.seed)))
    optimizer = state_lib.make_optimizer(opt_cfg)
    state, (student_gd, proj_gd) = state_lib.init_state(problem.student, projectors, opt_cfg,
                                                        seed=int(config.train.seed),
                                                        optimizer=optimizer)
    teacher_gd, teacher_params = state_lib.split_params(problem.teacher)
    problem.student = problem.teacher = None  # the state holds the arrays now
    s_shard = mesh_lib.state_shardings(state, mesh)
    t_shard = (jax.tree_util.tree_map(lambda _: mesh_lib.replicated(mesh), teacher_params)
               if C.model_spec(config, "teacher").sharding == "replicated"
               else mesh_lib.state_shardings(teacher_params, mesh))
    state = jax.device_put(state, s_shard)
    teacher_params = jax.device_put(teacher_params, t_shard)

    ckpt_cfg = C.checkpoint_config(config)
    ckpt = ckpt_lib.Checkpointer(workdir / CKPT_DIR, ckpt_cfg)
    data_iter = iter(pipeline)
    start_step, resumed = 0, False
    if ckpt.latest_step() is not None:
      abstract = ckpt_lib.abstract_like(state, s_shard)
      start_step, state, saved_cfg = ckpt.restore(abstract, data_iter=data_iter)
      resumed = True
      _warn_config_drift(saved_cfg, config)
      log.info("resumed from %s at step %d", workdir / CKPT_DIR, start_step)

    train_step = steps_lib.make_train_step(
        student_gd, teacher_gd, proj_gd, method, kd_cfg, optimizer, mesh=mesh,
        state_shardings=s_shard, teacher_shardings=t_shard, vocab_map=vocab_map,
        accumulate=opt_cfg.accumulate)
    eval_step = steps_lib.make_eval_step(
        student_gd, teacher_gd, proj_gd, method, kd_cfg, mesh=mesh, state_shardings=s_shard,
        teacher_shardings=t_shard, vocab_map=vocab_map)
    if dev_metric_fn is None and config.train.dev_metric == "rouge_l":
      if not problem.dev_examples:
        raise C.ConfigError("train.dev_metric=rouge_l needs dev examples (data.dev_split)")
      dev_metric_fn = _rouge_dev_metric_fn(problem, config, mesh)

    writer = MetricWriter(workdir, start_step if resumed else None)
    config_dict = config.to_dict()
    best_metric = ckpt_cfg.best_metric

    def evaluate(step: int) -> dict[str, float]:
      out: dict[str, float] = {}
      if dev_pipeline is not None:
        window = []
        for i, b in enumerate(dev_pipeline):
          if config.train.eval_batches and i >= config.train.eval_batches:
            break
          window.append(eval_step(state, teacher_params, mesh_lib.shard_batch(b, mesh)))
        out.update({f"dev/{k}": v for k, v in reduce_metrics(window).items()})
      if dev_metric_fn is not None:
        model = nnx.merge(student_gd, state.params)
        out.update({(k if k.startswith("dev/") else f"dev/{k}"): float(v)
                    for k, v in dev_metric_fn(model, step).items()})
      if best_metric and best_metric not in out:
        raise C.ConfigError(f"checkpoint.best_metric {best_metric!r} is not among the dev "
                            f"metrics {sorted(out)}")
      writer.write(step, "dev", out)
      return out

    def save(step: int, metrics=None, force=False) -> bool:
      return ckpt.save(step, state, data_iter=data_iter, config=config_dict, metrics=metrics,
                       force=force)

    summary: dict[str, Any] = {"workdir": str(workdir), "start_step": start_step,
                               "resumed": resumed, "preempted": False,
                               "total_steps": sched.total_steps, "final_metrics": {},
                               "dev_metrics": {}, "export": None}
    step = start_step
    window: list = []
    tokens, t0 = 0, time.perf_counter()
    bar = _progress(sched.total_steps, start_step)
    try:
      while step < sched.total_steps:
        if _global_stop(guard.stop_requested):
          break
        try:
          np_batch = next(data_iter)
        except StopIteration:
          log.warning("the data ran out at step %d of %d", step, sched.total_steps)
          break
        tokens += _batch_tokens(np_batch)
        state, metrics = train_step(state, teacher_params, mesh_lib.shard_batch(np_batch, mesh))
        window.append(metrics)
        step += 1
        if step % sched.log_every == 0 or step == sched.total_steps:
          values = reduce_metrics(window)
          elapsed = max(time.perf_counter() - t0, 1e-9)
          values.update({k: float(v) for k, v in
                         state_lib.learning_rates(opt_cfg, step - 1).items()})
          values["tokens_per_s"] = tokens / elapsed
          writer.write(step, "train", values)
          summary["final_metrics"] = values
          bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                          tok_s=f"{values['tokens_per_s']:.0f}")
          window, tokens, t0 = [], 0, time.perf_counter()
        bar.update(1)
        dev = None
        if sched.eval_every and (step % sched.eval_every == 0 or step == sched.total_steps):
          dev = evaluate(step)
          summary["dev_metrics"] = dev
        force = (dev is not None and best_metric is not None) or step == sched.total_steps
        save(step, metrics=dev, force=force)
        if after_step is not None:
          after_step(step)
      if step < sched.total_steps:
        if guard.stop_requested or _global_stop(guard.stop_requested):
          log.warning("stop requested (signal %s): saving step %d and exiting",
                      guard.signal_received, step)
          summary["preempted"] = True
        save(step, force=True)
      ckpt.wait()
    finally:
      bar.close()
      writer.close()
      ckpt.close()
      if hasattr(data_iter, "close"):
        data_iter.close()
    summary["step"] = step

    if not summary["preempted"] and step >= sched.total_steps and config.train.export:
      summary["export"] = str(_export(student_gd, state.params, problem.student_tok,
                                      workdir / EXPORT_DIR, config.train.export_dtype or None))
    return summary


def _check_batch(batch_size: int, accumulate: int, mesh) -> None:
  """The global batch splits into `accumulate` micro-batches, and its rows over the data axes
  of the mesh (a micro-batch smaller than the data axes still runs, with idle devices)."""
  data_devices = int(mesh.shape["data"] * mesh.shape["fsdp"])
  if batch_size % max(accumulate, 1):
    raise C.ConfigError(f"data.batch_size {batch_size} is not divisible by optim.accumulate "
                        f"{accumulate}")
  if batch_size % data_devices:
    raise C.ConfigError(f"data.batch_size {batch_size} does not split over the {data_devices} "
                        "devices of mesh.data x mesh.fsdp")


def _check_vocabularies(kd_cfg, student_tok, teacher_tok, student=None, teacher=None) -> None:
  """Plain KD compares the two distributions token by token: it needs one vocabulary (checked
  on the tokenizers before the models load, and on the models' rows when given)."""
  plain_kd = kd_cfg.method == "kd" or (kd_cfg.method == "cot2align" and kd_cfg.base == "kd")
  if not plain_kd:
    return
  sizes = [(len(student_tok), len(teacher_tok), "tokens")]
  if student is not None and teacher is not None:
    sizes.append((student.config.vocab_size, teacher.config.vocab_size, "embedding rows"))
  for vs, vt, what in sizes:
    if vs != vt:
      raise C.ConfigError(f"kd (plain KD) needs the same vocabulary, but the student has {vs} "
                          f"{what} and the teacher {vt}; use a cross-tokenizer method (uld, "
                          "mined, dskd, dskd_cma, dskd_eta, multilevel_ot) or kd.base=one of them")


def _progress(total: int, initial: int):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
              disable=not _is_main() or os.environ.get("COT2ALIGN_NO_PROGRESS") == "1",
              mininterval=1.0, file=sys.stderr)


def _export(student_gd, params, tokenizer, out: Path, dtype: str | None) -> Path:
  """The student as a Hugging Face checkpoint directory (process 0 writes)."""
  from cot2align_jax.models.hf import save_pretrained  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:  # gather shards that live on other hosts
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    params = multihost_utils.process_allgather(params, tiled=True)
  host_params = jax.tree.map(np.asarray, jax.device_get(params))
  model = nnx.merge(student_gd, host_params)
  if _is_main():
    tok = tokenizer if hasattr(tokenizer, "save_pretrained") else None
    save_pretrained(model, out, dtype=dtype, tokenizer=tok)
  return out


def _warn_config_drift(saved: Mapping[str, Any] | None, config: ml_collections.ConfigDict):
  if not saved:
    return
  now = json.loads(json.dumps(config.to_dict()))
  diffs = []

  def walk(a, b, prefix):
    if isinstance(a, dict) and isinstance(b, dict):
      for k in sorted(set(a) | set(b)):
        walk(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
      diffs.append(f"{prefix[:-1]}: {a!r} -> {b!r}")

  walk(saved, now, "")
  if diffs:
    log.warning("resuming with a config that differs from the checkpoint's: %s",
                "; ".join(diffs[:10]))
