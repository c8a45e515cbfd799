"""Models and train states of a training run, rebuilt from its config (used by the CLIs).

    model, tok, label = config_model(config, "teacher")        # tiny problem or teacher.path
    run = train_state_from_checkpoint(config, "runs/x/checkpoints")   # read-only restore
    student, projectors = run.student(), run.projectors()
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from cot2align_jax.losses.methods import build_projectors, method_from_config
from cot2align_jax.models import hf
from cot2align_jax.training import checkpoint as ckpt_lib
from cot2align_jax.training import config as C
from cot2align_jax.training import mesh as mesh_lib
from cot2align_jax.training import setup
from cot2align_jax.training import state as state_lib


class RestoreError(ValueError):
  """A model or checkpoint of a run that cannot be rebuilt (missing path, bad step)."""


def config_model(config, side: str, *, pretrained: bool = True):
  """(model, tokenizer, label) of config.<side>: the tiny problem's model (initialised as the
  training loop does: student seed train.seed, teacher train.seed + 1) or student/teacher.path
  (with pretrained=False: randomly initialised from its config.json, for checkpoint restores)."""
  spec = C.model_spec(config, side)
  seed = C.train_config(config).seed + (1 if side == "teacher" else 0)
  if spec.tiny:
    prob = setup.tiny_models(config)
    cfg = prob.student_cfg if side == "student" else prob.teacher_cfg
    tok = prob.student_tok if side == "student" else prob.teacher_tok
    cfg = cfg.replace(dtype=spec.dtype, param_dtype=spec.param_dtype)
    return hf.create_model(cfg, seed=seed), tok, f"tiny:{side}:{spec.tiny}"
  if not spec.path:
    raise RestoreError(f"{side}.path is empty: set --config.{side}.path (or {side}.tiny)")
  tok = hf.load_tokenizer(spec.path)
  if pretrained and spec.init == "pretrained":
    model = hf.from_pretrained(spec.path, dtype=spec.dtype, param_dtype=spec.param_dtype)
  else:
    raw = json.loads((hf.resolve_checkpoint(spec.path) / "config.json").read_text())
    model = hf.create_model(hf.config_from_hf(raw, dtype=spec.dtype,
                                              param_dtype=spec.param_dtype), seed=seed)
  return model, tok, spec.path


def _teacher_width(config) -> int:
  spec = C.model_spec(config, "teacher")
  if spec.tiny:
    return setup.tiny_models(config).teacher_cfg.hidden_size
  raw = json.loads((hf.resolve_checkpoint(spec.path) / "config.json").read_text())
  return hf.config_from_hf(raw).hidden_size


@dataclasses.dataclass
class RestoredRun:
  """A training run's state restored from its checkpoint directory (read-only)."""

  state: Any
  student_graphdef: Any
  proj_graphdef: Any
  tokenizer: Any
  step: int

  def student(self):
    return nnx.merge(self.student_graphdef, self.state.params)

  def projectors(self):
    """The trained projectors (MethodProjectors: .kd, .ot), or None for methods without any."""
    if self.proj_graphdef is None or self.state.proj is None:
      return None
    return nnx.merge(self.proj_graphdef, self.state.proj)


def train_state_from_checkpoint(config, ckpt_dir, which: str = "latest") -> RestoredRun:
  """The train state of a run's checkpoint directory: builds it as training/loop.py does and
  restores it read-only (latest, best or a step)."""
  if not Path(ckpt_dir).is_dir():
    raise RestoreError(f"no export and no checkpoint directory {ckpt_dir}")
  kd_cfg = C.kd_config(config)
  method = method_from_config(kd_cfg)
  student, tok, _ = config_model(config, "student", pretrained=False)
  d_s = student.config.hidden_size
  d_t = _teacher_width(config) if method.needs_teacher else d_s
  train_cfg = C.train_config(config)
  seed = train_cfg.seed
  projectors = build_projectors(method, d_s, d_t, rngs=nnx.Rngs(seed), kd=kd_cfg)
  opt_cfg = C.optim_config(config, derived_steps=1)  # read-only: any valid schedule length
  opt_cfg = dataclasses.replace(opt_cfg, total_steps=max(
      opt_cfg.total_steps, train_cfg.steps, opt_cfg.warmup_steps + 1))
  optimizer = state_lib.make_optimizer(opt_cfg)
  state, (student_gd, proj_gd) = state_lib.init_state(student, projectors, opt_cfg, seed=seed,
                                                      optimizer=optimizer)
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, C.checkpoint_config(config), read_only=True)
  try:
    step = None
    if which == "best":
      step = ckpt.best_step()
      if step is None:
        raise RestoreError(f"{ckpt_dir}: no best checkpoint (checkpoint.best_metric unset or "
                         "never reported)")
    elif which != "latest":
      try:
        step = int(which)
      except ValueError:
        raise RestoreError(f"--checkpoint must be latest, best or a step, got {which!r}") from None
    step, state, _ = ckpt.restore(ckpt_lib.abstract_like(state, _restore_sharding()), step=step)
  except ckpt_lib.CheckpointError as e:
    raise RestoreError(str(e).split("\n")[0]) from None
  finally:
    ckpt.close()
  return RestoredRun(state, student_gd, proj_gd, tok, step)


def _restore_sharding():
  """Where a read-only restore puts the arrays: this process's first device, or in a
  multi-process job the whole state replicated over every device of the job (each process
  then holds all of it; a single-device target would not be one global array)."""
  if jax.process_count() == 1:
    return None
  return mesh_lib.replicated(mesh_lib.make_mesh(data=-1))


def student_from_checkpoint(config, ckpt_dir, which: str = "latest"):
  """(model, tokenizer, step) of the student in a training run's checkpoint directory."""
  run = train_state_from_checkpoint(config, ckpt_dir, which)
  return run.student(), run.tokenizer, run.step
