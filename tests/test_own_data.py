"""Own data end to end through the CLIs (README "Train on your own data"): train a
cross-tokenizer student on a JSONL file, evaluate it on a chat file, write rationales for it,
cache its teacher and train from the cache.
The models are the demo's random initialisations (its data stage, ci size)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cot2align_jax.core.paths import PROJECT_ROOT

SAMPLES = PROJECT_ROOT / "tests" / "data" / "samples"


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                        timeout=timeout, cwd=PROJECT_ROOT)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  proc = _run("cot2align_jax.demo", f"--workdir={root}", "--size=ci", "--stop_after=data")
  assert proc.returncode == 0, proc.stderr[-2000:]
  return root / "models"


def _overrides(models, **extra):
  keys = {"data.dataset": "jsonl", "data.train_file": str(SAMPLES / "alpaca.jsonl"),
          "data.dev_split": "", "data.test_file": str(SAMPLES / "chat.jsonl"),
          "data.max_prompt": 200, "data.max_len": 240, "data.buckets": "(240,)",
          "data.batch_size": 2, "student.path": str(models / "student_init"),
          "teacher.path": str(models / "teacher_init"), "train.steps": 2,
          "train.eval_every": -1, "checkpoint.best_metric": "", **extra}
  return [f"--config.{k}={v}" for k, v in keys.items()]


@pytest.mark.slow
def test_train_and_evaluate_on_own_files(models, tmp_path):
  config = "--config=configs/demo.py:dskd_cma,size=ci"
  work = tmp_path / "run"
  proc = _run("cot2align_jax.train", config, f"--workdir={work}", *_overrides(models))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 2
  proc = _run("cot2align_jax.evaluate", config, f"--workdir={work}", "--seeds=1",
              "--max_new_tokens=4", *_overrides(models))
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads((work / "eval" / "eval_results.json").read_text())
  assert "jsonl/test" in json.dumps(results)
  # rationales for the own train file (cot_rule nonempty_input: a2 has no input)
  out = tmp_path / "rationales.jsonl"
  proc = _run("cot2align_jax.generate_cot", config, f"--out={out}", "--dataset=jsonl",
              "--max_new_tokens=4", *_overrides(models))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert {json.loads(l)["id"] for l in out.read_text().splitlines()} == {"a1", "a3"}
  # the teacher cache of the own file, and training from it: the online run's losses
  cache = tmp_path / "tcache"
  proc = _run("cot2align_jax.cache_teacher", config, f"--out={cache}", "--dtype=float32",
              *_overrides(models))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["records"] == 3
  cached = tmp_path / "cached"
  proc = _run("cot2align_jax.train", config, f"--workdir={cached}",
              *_overrides(models, **{"teacher.cache": str(cache)}))
  assert proc.returncode == 0, proc.stderr[-2000:]
  losses = [[json.loads(l)["loss"] for l in (w / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["split"] == "train"] for w in (work, cached)]
  assert losses[0] and losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.slow
def test_own_data_errors_are_one_line(models, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"instruction": "x"}\n')
  config = "--config=configs/demo.py:sft,size=ci"
  for extra, message in (
      ({"data.train_file": str(bad)}, f"error: {bad}: no usable rows ({bad}: skipped 1 bad "
                                      "rows (1 missing field 'output'); first at 1)"),
      ({"data.train_file": str(bad), "data.on_error": "raise"},
       f"error: {bad}:1: missing field 'output'"),
      ({"data.train_file": str(tmp_path / "none.csv")}, f"error: {tmp_path / 'none.csv'}: "
                                                        "file not found"),
      ({"data.max_prompt": 8, "data.on_error": "raise"}, "error: "),
  ):
    proc = _run("cot2align_jax.train", config, f"--workdir={tmp_path / 'w'}",
                *_overrides(models, **extra), timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert lines[-1].startswith(message), lines[-1]
    if extra.get("data.max_prompt") == 8:
      assert "longer than data.max_prompt=8 tokens" in lines[-1]
  assert not (tmp_path / "w" / "checkpoints").exists()
