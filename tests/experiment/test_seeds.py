"""Methods compared at one seed start from the same student: the initial weights depend on
train.seed only, not on the method, its projectors or its teacher."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from cot2align_jax.core.paths import PROJECT_ROOT
from cot2align_jax.training import config as C
from cot2align_jax.training import loop

TINY = PROJECT_ROOT / "configs" / "tiny.py"
FROZEN = {"optim.lr": 0.0, "optim.proj_lr": 0.0, "optim.end_lr": 0.0, "optim.warmup_steps": 0,
          "train.steps": 1, "train.eval_every": -1, "checkpoint.best_metric": "",
          "checkpoint.async_save": False, "data.max_examples": 8}


def _exported(tmp_path, method, seed):
  """The student after one step at learning rate 0 = its initial weights."""
  cfg = C.load_config(TINY, method, {**FROZEN, "train.seed": seed})
  workdir = tmp_path / f"{method}_{seed}"
  loop.train(cfg, workdir)
  files = sorted((workdir / loop.EXPORT_DIR).glob("*.safetensors"))
  assert files
  out = {}
  for f in files:
    out.update(load_file(str(f)))
  return out


@pytest.mark.slow
def test_student_init_depends_on_the_seed_only(tmp_path):
  sft0 = _exported(tmp_path, "sft", 0)
  kd0 = _exported(tmp_path, "dskd_cma", 0)      # a teacher and projectors, another objective
  sft1 = _exported(tmp_path, "sft", 1)
  assert sft0.keys() == kd0.keys() == sft1.keys()
  for k in sft0:
    np.testing.assert_array_equal(sft0[k], kd0[k], err_msg=k)
  assert any(not np.array_equal(sft0[k], sft1[k]) for k in sft0)


@pytest.mark.slow
def test_epochs_and_the_same_steps_train_identically(tmp_path):
  # what lets the runner reuse an epochs unit for a compute unit of equal step count
  # (plan.Unit.same_as): 3 epochs, then train.steps = the steps those took.
  base = {**FROZEN, "optim.lr": 1e-2, "data.batch_size": 4, "data.drop_remainder": True,
          "train.log_every": 1}
  runs, steps = {}, None
  for name in ("epochs", "steps"):
    budget = ({"train.epochs": 3, "train.steps": 0} if name == "epochs" else
              {"train.epochs": 0, "train.steps": steps})
    summary = loop.train(C.load_config(TINY, "sft", {**base, **budget}), tmp_path / name)
    steps = summary["step"]
    files = sorted((tmp_path / name / loop.EXPORT_DIR).glob("*.safetensors"))
    rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    runs[name] = ({k: v for f in files for k, v in load_file(str(f)).items()},
                  [(r["step"], r["loss"]) for r in rows if r["split"] == "train"])
  assert steps >= 6 and len(runs["epochs"][1]) == steps
  assert runs["epochs"][1] == runs["steps"][1]
  for k in runs["epochs"][0]:
    np.testing.assert_array_equal(runs["epochs"][0][k], runs["steps"][0][k], err_msg=k)
