"""The training loop (docs/architecture.md §11): the problem (training/setup.py) → mesh, state,
jitted steps → steps with metrics, dev evaluation and checkpoints → the exported student.

    summary = train(load_config("configs/tiny.py", "cot2align"), "/tmp/run")

A run resumes from `workdir/checkpoints` when it holds a checkpoint (state, grain iterator
state and step; `metrics.jsonl` lines past the restored step are dropped). Every
`train.log_every` steps one line of `workdir/metrics.jsonl` (training/metrics.py) and
TensorBoard scalars in `workdir/tb/`; every `train.eval_every` steps (0 = once per epoch) the
dev split's objective terms ("dev/<name>") plus `dev_metric_fn` / ROUGE-L; checkpoints every
`checkpoint.save_every` steps, at every evaluation when a best metric is tracked, and at the
end; on SIGTERM a save at the current step and {"preempted": True}; at the end the student as
a Hugging Face checkpoint in `workdir/export`.

Determinism: a run resumed at step N reproduces the uninterrupted run bit for bit on the same
machine and device count (tests/training/test_loop.py).

Multi-process (docs/architecture.md §16): every process runs this function; each reads its rows
of every global batch (data/pipeline.py), the hosts pad their batches to common lengths before
they become one global array, process 0 writes metrics and the export, all processes save and
restore the Orbax checkpoints. A run continues from a checkpoint written by another process
count: the data position is the step (one global batch per step). The global batch and its
order do not depend on the process count, so a two-process run follows the one-process run on
the same global batch up to the rounding of reordered sums (tests/test_multihost.py).
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
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from cot2align_jax.core import spec
from cot2align_jax.data import pipeline as pipeline_lib
from cot2align_jax.evaluation.protocol import SamplingSettings, dev_rouge_l
from cot2align_jax.losses.methods import build_projectors
from cot2align_jax.models import hf
from cot2align_jax.training import checkpoint as ckpt_lib
from cot2align_jax.training import config as C
from cot2align_jax.training import mesh as mesh_lib
from cot2align_jax.training import setup
from cot2align_jax.training import state as state_lib
from cot2align_jax.training import steps as steps_lib
from cot2align_jax.training import teacher_cache
from cot2align_jax.training.metrics import MetricWriter, reduce_metrics

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
EXPORT_DIR = "export"

DevMetricFn = Callable[[nnx.Module, int], Mapping[str, float]]


def _is_main() -> bool:
  return jax.process_index() == 0


def _batch_tokens(batch: Mapping[str, np.ndarray]) -> int:
  """Real student tokens of a batch (main view + pair view)."""
  return int(sum(np.sum(batch[spec.key(v, "student", "attention_mask")]) for v in spec.VIEWS))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Steps of the run (train.steps, or train.epochs × steps per epoch) and the evaluation /
  logging intervals in steps (eval_every 0 = never)."""
  total_steps: int
  steps_per_epoch: int
  num_epochs: int | None
  eval_every: int
  log_every: int


def _schedule(config, n_records: int, global_batch: int, drop_remainder: bool) -> Schedule:
  """The run's steps from the record count and the global batch (the same for any number of
  processes: each step takes one global batch)."""
  t = C.train_config(config)
  if n_records < 1:
    raise C.ConfigError("no training records")
  per_epoch = (n_records // global_batch) if drop_remainder else math.ceil(n_records /
                                                                            global_batch)
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
  sizes = dataclasses.asdict(C.mesh_config(config))
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


def _global_batch(np_batch: dict[str, np.ndarray], pipeline: pipeline_lib.Pipeline,
                  mesh) -> dict[str, jax.Array]:
  """This host's numpy batch → the global batch on the mesh. With several processes the hosts
  first pad their batches to the longest side lengths of all hosts (each host's pipeline picks
  its bucket from its own rows; a global array needs one shape), which is the padding a
  one-process pipeline gives the whole global batch."""
  if jax.process_count() > 1:
    lengths = pipeline_lib.side_lengths(np_batch)
    agreed = mesh_lib.process_max([lengths[s] for s in spec.SIDES])
    np_batch = pipeline_lib.pad_to_lengths(np_batch, dict(zip(spec.SIDES, agreed)),
                                           pipeline.collate.pad_ids)
  return mesh_lib.shard_batch(np_batch, mesh)


def _seek(data_iter, step: int) -> None:
  """Puts a fresh in-process iterator at global batch `step` (a checkpoint written by another
  number of processes: its per-process iterator files do not apply, the position does)."""
  state = data_iter.get_state()
  if not (isinstance(state, dict) and set(state) == {"next_index"}):
    raise C.ConfigError("this checkpoint was written by another number of processes; continuing "
                        "it needs the in-process pipeline (data.worker_count=0)")
  data_iter.set_state({"next_index": int(step)})


def _global_stop(flag: bool) -> bool:
  """The SIGTERM decision, agreed by every process (any process stopping stops all)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _rouge_dev_metric_fn(problem: setup.Problem, config, mesh) -> DevMetricFn:
  """Dev ROUGE-L (exact match for sets registered with it) of one sampled pass, with the
  config's prompt / total lengths (data.max_prompt / data.max_len), its BOS setting
  (data.special_tokens) and the set's prompts."""
  pipe, data = C.pipeline_config(config), C.data_config(config)
  seed = C.train_config(config).seed
  kw = dict(settings=SamplingSettings(max_length=pipe.max_len, max_prompt_length=pipe.max_prompt,
                                      special_tokens=pipe.special_tokens))
  tiny = bool(C.model_spec(config, "student").tiny)
  dataset = "tiny" if tiny else data.dataset  # tiny runs: the tiny set
  template = setup.data_template(config, dataset)
  if template.name != "alpaca":
    kw["prompt_fn"] = template.plain

  def fn(model, step):
    del step
    return {"rouge_l": dev_rouge_l(model, problem.student_tok, problem.dev_examples,
                                   seed=seed, mesh=mesh,
                                   max_examples=data.dev_max_examples or None, **kw)}
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
  workdir = Path(workdir).expanduser().resolve()
  C.validate(config)
  kd_cfg = C.kd_config(config)
  method = C.method_of(kd_cfg)
  train_cfg = C.train_config(config)
  if train_cfg.dev_metric not in ("", "rouge_l"):
    raise C.ConfigError(f"train.dev_metric must be '' or 'rouge_l', got "
                        f"{train_cfg.dev_metric!r}")

  with ckpt_lib.PreemptionGuard() as guard:
    mesh_lib.maybe_initialize_distributed()
    workdir.mkdir(parents=True, exist_ok=True)
    problem = setup.build_problem(config, method.needs_teacher, kd_cfg)
    setup.check_vocabularies(kd_cfg, problem.student_tok, problem.teacher_tok, problem.student,
                             problem.teacher)
    mesh = _make_mesh(config)
    process_count = jax.process_count()
    global_pipe = C.pipeline_config(config)  # the global batch; alignment from the method
    if global_pipe.batch_size % process_count:
      raise C.ConfigError(f"data.batch_size {global_pipe.batch_size} is not divisible by the "
                          f"{process_count} processes")
    per_host_batch = global_pipe.batch_size // process_count
    _check_batch(global_pipe.batch_size, C.optim_config(config, derived_steps=1).accumulate,
                 mesh)

    # Data.
    sched = _schedule(config, len(problem.train_records), global_pipe.batch_size,
                      global_pipe.drop_remainder)
    pipe_cfg = dataclasses.replace(global_pipe, batch_size=per_host_batch,
                                   num_epochs=sched.num_epochs)
    vocab_map = setup.mined_vocab_map(method, problem)
    cache, cache_layout = teacher_cache.open_for_run(config, method, kd_cfg, problem.teacher_tok,
                                                     problem.teacher, problem.train_records)
    pipeline, dev_pipeline = setup.build_pipelines(problem, pipe_cfg, vocab_map,
                                                   with_dev=bool(sched.eval_every),
                                                   teacher_cache=cache)

    # State.
    opt_cfg = C.optim_config(config, derived_steps=sched.total_steps)
    d_s = problem.student.config.hidden_size
    d_t = problem.teacher.config.hidden_size if problem.teacher is not None else d_s
    projectors = build_projectors(method, d_s, d_t, rngs=nnx.Rngs(train_cfg.seed), kd=kd_cfg)
    optimizer = state_lib.make_optimizer(opt_cfg)
    state, (student_gd, proj_gd) = state_lib.init_state(problem.student, projectors, opt_cfg,
                                                        seed=train_cfg.seed,
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
      start_step, state, saved_cfg = ckpt.restore(abstract, data_iter=data_iter,
                                                  seek=lambda step: _seek(data_iter, step))
      resumed = True
      _warn_config_drift(saved_cfg, config)
      log.info("resumed from %s at step %d", workdir / CKPT_DIR, start_step)

    train_step = steps_lib.make_train_step(
        student_gd, teacher_gd, proj_gd, method, kd_cfg, optimizer, mesh=mesh,
        state_shardings=s_shard, teacher_shardings=t_shard, vocab_map=vocab_map,
        accumulate=opt_cfg.accumulate, teacher_cache=cache_layout)
    eval_step = steps_lib.make_eval_step(
        student_gd, teacher_gd, proj_gd, method, kd_cfg, mesh=mesh, state_shardings=s_shard,
        teacher_shardings=t_shard, vocab_map=vocab_map)
    if dev_metric_fn is None and train_cfg.dev_metric == "rouge_l":
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
          if train_cfg.eval_batches and i >= train_cfg.eval_batches:
            break
          window.append(eval_step(state, teacher_params, _global_batch(b, dev_pipeline, mesh)))
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
        state, metrics = train_step(state, teacher_params,
                                    _global_batch(np_batch, pipeline, mesh))
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

    if not summary["preempted"] and step >= sched.total_steps and train_cfg.export:
      summary["export"] = str(_export(student_gd, state.params, problem.student_tok,
                                      workdir / EXPORT_DIR, train_cfg.export_dtype or None))
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


def _progress(total: int, initial: int):
  return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
              disable=not _is_main() or os.environ.get("COT2ALIGN_NO_PROGRESS") == "1",
              mininterval=1.0, file=sys.stderr)


def _export(student_gd, params, tokenizer, out: Path, dtype: str | None) -> Path:
  """The student as a Hugging Face checkpoint directory (process 0 writes)."""
  if jax.process_count() > 1:  # gather shards that live on other hosts
    params = multihost_utils.process_allgather(params, tiled=True)
  host_params = jax.tree.map(np.asarray, jax.device_get(params))
  model = nnx.merge(student_gd, host_params)
  if _is_main():
    tok = tokenizer if hasattr(tokenizer, "save_pretrained") else None
    hf.save_pretrained(model, out, dtype=dtype, tokenizer=tok)
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
