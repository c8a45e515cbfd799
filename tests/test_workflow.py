"""End to end on the tiny problem through the CLIs (subprocesses, as a user runs them):
generate_cot (tiny teacher → rationale JSONL) → train cot2align (reads that file) → evaluate
(the export, then a checkpoint) → eval_results.{json,md,png} whose scores are recomputable from
the saved generations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from cot2align_jax.data import arith, records
from cot2align_jax.evaluation.protocol import SamplingSettings, score_texts
from cot2align_jax.evaluation.rationales import generate_rationales
from tests.support import tiny

REPO = Path(__file__).resolve().parents[1]
CONFIG = "--config=configs/tiny.py:cot2align"


def _run(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
  env = dict(os.environ, COT2ALIGN_NO_PROGRESS="1", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc


def _check_report(out_dir: Path, seeds: list[int], n: int) -> dict:
  for suffix in ("json", "md", "png"):
    assert (out_dir / f"eval_results.{suffix}").stat().st_size > 0
  report = json.loads((out_dir / "eval_results.json").read_text())
  assert "tiny/test" in (out_dir / "eval_results.md").read_text()
  (result,) = report["results"]
  assert (result["name"], result["metric"], result["n"]) == ("tiny/test", "rougeL", n)
  assert result["seeds"] == seeds
  examples = {ex.id: ex for ex in arith.tiny_examples("test", n)}
  per_seed = []
  for seed in seeds:
    rows = [json.loads(l) for l in
            (out_dir / "generations" / f"tiny_test_seed{seed}.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(examples)
    scores = score_texts([examples[r["id"]] for r in rows], [r["prediction"] for r in rows])
    np.testing.assert_allclose(scores, [r["score"] for r in rows], atol=1e-9)
    per_seed.append(float(np.mean(scores)))
  np.testing.assert_allclose(result["scores"], per_seed, atol=1e-9)
  np.testing.assert_allclose(result["mean"], np.mean(per_seed), atol=1e-9)
  np.testing.assert_allclose(result["std"], np.std(per_seed), atol=1e-9)
  return report


def test_generate_cot_train_evaluate(tmp_path):
  work = tmp_path / "run"
  rationales = tmp_path / "rationales.jsonl"
  data = [f"--config.data.rationales={rationales}", "--config.data.max_examples=8"]

  # 1. Teacher rationales (tiny teacher, as the training loop initialises it), resumable.
  # All 8 (virtual CPU) devices: the batch is sharded over the 'data' axis.
  _run("cot2align_jax.generate_cot", CONFIG, f"--workdir={work}", *data,
       "--max_new_tokens=12", "--batch_size=8", "--config.mesh.data=-1")
  rows = [json.loads(l) for l in rationales.read_text().splitlines()]
  assert [r["id"] for r in rows] == [f"tiny/train/{i}" for i in range(8)]
  assert all(isinstance(r["rationale"], str) for r in rows)
  # Resuming (in process, same library call as the CLI): nothing left to generate.
  prob = tiny.tiny_problem(8)
  again = generate_rationales(prob.teacher(), prob.teacher_tok,
                              arith.tiny_examples("train", 8), rationales,
                              settings=SamplingSettings(max_length=44, max_prompt_length=32),
                              prompt_fn=records.qa_cot_prompt)
  assert (again.generated, again.already_done, again.selected) == (0, 8, 8)
  assert len(rationales.read_text().splitlines()) == 8

  # 2. Train cot2align on the tiny problem with those rationales.
  train = _run("cot2align_jax.train", CONFIG, f"--workdir={work}", *data,
               "--config.train.steps=4", "--config.train.eval_every=2",
               "--config.checkpoint.save_every=2")
  summary = json.loads(train.stdout.strip().splitlines()[-1])
  assert summary["step"] == 4 and summary["export"]
  assert (work / "export" / "config.json").is_file()

  # 3. Evaluate the export: two seeds on the tiny test set.
  _run("cot2align_jax.evaluate", CONFIG, f"--workdir={work}", *data, "--seeds=10,20",
       "--max_examples=6", "--max_new_tokens=8", "--batch_size=4")
  report = _check_report(work / "eval", [10, 20], 6)
  assert report["meta"]["source"] == "export"

  # 4. The same from the best checkpoint (dev/loss), read-only, without the export.
  out = _run("cot2align_jax.evaluate", CONFIG, f"--workdir={work}", *data, "--seeds=10",
             "--max_examples=4", "--max_new_tokens=8", "--batch_size=4", "--nouse_export",
             "--checkpoint=best")
  report = _check_report(work / "eval", [10], 4)
  assert report["meta"]["source"] == "checkpoint" and report["meta"]["step"] in (2, 4)
  assert "tiny/test" in out.stdout
