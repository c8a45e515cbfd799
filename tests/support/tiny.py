"""The tiny cross-tokenizer problem as test objects: tokenizers, model configs, records, batches
and a ready train-step setup (built in seconds, no downloads).

    prob = tiny_problem()                        # data/arith.py's tiny size, models/toy.py
    batches = prob.batches(batch_size=8, n=4)    # numpy batches (core/spec.py), one bucket
    su = make_setup(prob, kd_cfg, opt_cfg)       # method, projectors, state, teacher params

The records are the plain record of every tiny train problem plus a CoT record (its gold
worked step, "qa" template, paired with the plain view) for a `cot_fraction` of them, so
batches mix rows with and without pairs: what `student.tiny` runs of the trainer train on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cot2align_jax.data import arith
from cot2align_jax.data.pipeline import Pipeline, PipelineConfig
from cot2align_jax.losses.methods import build_projectors, method_from_config
from cot2align_jax.models import create_model
from cot2align_jax.models.config import ModelConfig
from cot2align_jax.models.toy import tiny_student_config, tiny_teacher_config
from cot2align_jax.training import state as state_lib
from cot2align_jax.training.steps import make_eval_step, make_train_step


@dataclasses.dataclass
class TinyProblem:
  student_tok: Any
  teacher_tok: Any
  student_cfg: ModelConfig
  teacher_cfg: ModelConfig
  records: list[Any]
  bucket: int = 64

  def student(self, seed: int = 0):
    return create_model(self.student_cfg, seed)

  def teacher(self, seed: int = 1):
    return create_model(self.teacher_cfg, seed)

  def pipeline(self, batch_size: int = 8, *, seed: int = 0, shuffle: bool = True,
               num_epochs: int | None = None, alignment: tuple[str, ...] = (), records=None):
    """The project's grain pipeline over the records, every batch padded to one bucket."""
    cfg = PipelineConfig(batch_size=batch_size, seed=seed, shuffle=shuffle,
                         num_epochs=num_epochs, buckets=(self.bucket,), max_prompt=self.bucket // 2,
                         max_len=self.bucket + 1, drop_remainder=True, alignment=alignment,
                         shard_index=0, shard_count=1)
    return Pipeline(self.records if records is None else records, self.student_tok,
                    self.teacher_tok, cfg)

  def batches(self, batch_size: int = 8, n: int = 4, *, seed: int = 0,
              alignment: tuple[str, ...] = (), records=None) -> list[dict[str, np.ndarray]]:
    """The first `n` batches of the pipeline (numpy dicts, core/spec.py)."""
    it = iter(self.pipeline(batch_size, seed=seed, alignment=alignment, records=records))
    return [next(it) for _ in range(n)]


def tiny_problem(n_examples: int = 64, *, cot_fraction: float = 0.5, seed: int = 0,
                 student_d: int = 32, teacher_d: int = 48, layers: int = 2,
                 bucket: int = 64) -> TinyProblem:
  """The tiny problem (see the module doc). Tokenizers are trained once per process."""
  s_tok, t_tok = arith.tiny_tokenizers()
  examples = arith.tiny_examples("train", n_examples, seed)
  rationales = arith.tiny_rationales("train", n_examples, seed, fraction=cot_fraction)
  return TinyProblem(student_tok=s_tok, teacher_tok=t_tok,
                     student_cfg=tiny_student_config(len(s_tok), student_d, layers),
                     teacher_cfg=tiny_teacher_config(len(t_tok), teacher_d, layers),
                     records=arith.tiny_records(examples, rationales), bucket=bucket)


@dataclasses.dataclass
class TinySetup:
  """Everything a train step on the tiny problem needs."""
  method: Any
  kd_cfg: Any
  opt_cfg: Any
  optimizer: Any
  state: Any
  student_graphdef: Any
  teacher_graphdef: Any
  proj_graphdef: Any
  teacher_params: Any

  def train_step(self, **kw):
    kw.setdefault("accumulate", self.opt_cfg.accumulate)
    return make_train_step(self.student_graphdef, self.teacher_graphdef, self.proj_graphdef,
                           self.method, self.kd_cfg, self.optimizer, **kw)

  def eval_step(self, **kw):
    return make_eval_step(self.student_graphdef, self.teacher_graphdef, self.proj_graphdef,
                          self.method, self.kd_cfg, **kw)


def make_setup(prob: TinyProblem, kd_cfg, opt_cfg, *, student=None, teacher=None,
               seed: int = 0) -> TinySetup:
  """Method, projectors, optimizer, train state and teacher params for `kd_cfg` on `prob`.
  `student` / `teacher`: modules to reuse (their parameters are copied, never donated)."""
  method = method_from_config(kd_cfg)
  student = student if student is not None else prob.student(seed)
  teacher = teacher if teacher is not None else prob.teacher(seed + 1)
  projectors = build_projectors(method, prob.student_cfg.hidden_size,
                                prob.teacher_cfg.hidden_size, rngs=nnx.Rngs(seed + 2))
  optimizer = state_lib.make_optimizer(opt_cfg)
  state, (s_gd, p_gd) = state_lib.init_state(student, projectors, opt_cfg, seed,
                                             optimizer=optimizer)
  state = jax.tree.map(jnp.copy, state)
  t_gd, t_params = state_lib.split_params(teacher)
  return TinySetup(method, kd_cfg, opt_cfg, optimizer, state, s_gd, t_gd, p_gd,
                   jax.tree.map(jnp.copy, t_params))
