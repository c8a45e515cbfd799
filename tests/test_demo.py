"""The embedded demo (README command 1) at its reduced size, as a user runs it: a subprocess of
`python -m cot2align_jax.demo --size=ci`, with no ../shared and no network. Checks its table,
JSON and plots, recounts every accuracy from the saved generations, and checks that a rerun
resumes (every stage kept), that --stop_after=rationales stops there and that bad flags fail
in one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cot2align_jax.demo import plots, stages

REPO = Path(__file__).resolve().parents[1]
METHODS = ("sft", "uld", "dskd_cma", "cot2align")
NUMBER = re.compile(r"-?\d+")


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
  env = dict(os.environ, COT2ALIGN_NO_PROGRESS="1", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             COT2ALIGN_SHARED="/nonexistent/shared")   # the demo needs nothing from ../shared
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "cot2align_jax.demo", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo")
  proc = _run(f"--workdir={workdir}", "--size=ci", f"--methods={','.join(METHODS)}")
  assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return workdir, proc


def _recount(generations: Path, test_file: Path, answer_after_marker: bool) -> float:
  """Exact match (%) recomputed here: the final answer is the first number after the last
  "answer is" (CoT) or the first number of the output (plain prompt)."""
  golds = [json.loads(l)["output"] for l in test_file.read_text().splitlines() if l.strip()]
  preds = {}
  for line in generations.read_text().splitlines():
    row = json.loads(line)
    preds[row["id"]] = row["prediction"]
  assert len(preds) == len(golds)
  hits = 0
  for i, gold in enumerate(golds):
    text = preds[f"arith/test/{i}"]
    if answer_after_marker and "answer is" in text:
      text = text.rsplit("answer is", 1)[1]
    found = NUMBER.findall(text)
    if answer_after_marker and "answer is" not in preds[f"arith/test/{i}"]:
      found = found[-1:]  # no marker: the last number, as evaluation/gsm8k.py does
    hits += bool(found) and found[0] == gold
  return 100.0 * hits / len(golds)


def test_demo_writes_table_json_and_plots(demo_run):
  workdir, proc = demo_run
  out = proc.stdout
  for stage in ("[1/6] data", "[2/6] teacher", "[3/6] rationales", "[4/6] students",
                "[5/6] evaluate", "[6/6] report"):
    assert stage in out
  payload = json.loads((workdir / "demo_results.json").read_text())
  assert payload["size"] == "ci" and payload["methods"] == list(METHODS)
  names = [r["method"] for r in payload["results"]]
  assert names == ["teacher", "teacher"] + list(METHODS)
  assert [r["prompt"] for r in payload["results"]] == ["cot", "plain"] + ["plain"] * 4
  md = (workdir / "demo_results.md").read_text()
  for r in payload["results"]:
    assert f"| {r['model']} |" in md and f"| {r['accuracy']:.1f} |" in md
  assert payload["models"]["teacher"]["vocab"] != payload["models"]["student"]["vocab"]
  assert payload["models"]["teacher"]["params"] > payload["models"]["student"]["params"]
  for name in ("training_curves", "accuracy", "ot_plan"):
    png = workdir / "plots" / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert payload["plots"][name] == str(png)
  # every training run logged its curve and exported a Hugging Face checkpoint
  for role in ("teacher",) + tuple(f"students/{m}" for m in METHODS):
    assert (workdir / role / "metrics.jsonl").stat().st_size > 0
    assert (workdir / role / "export" / "config.json").is_file()
  assert payload["timings_s"]["total"] > 0


def test_demo_accuracies_are_recounted_from_the_generations(demo_run):
  workdir, _ = demo_run
  payload = json.loads((workdir / "demo_results.json").read_text())
  test_file = workdir / "data" / "arith" / "test.jsonl"
  n = len(test_file.read_text().splitlines())
  for row in payload["results"]:
    assert row["n"] == n
    gens = Path(row["generations"])
    assert gens.is_file() and gens.is_relative_to(workdir)
    assert _recount(gens, test_file, row["prompt"] == "cot") == pytest.approx(row["accuracy"],
                                                                              abs=1e-6)


def test_ot_plan_has_the_training_marginals(demo_run):
  workdir, _ = demo_run
  d = stages.make_demo(str(workdir), "ci", ",".join(METHODS), 0,
                       str(REPO / "configs" / "demo.py"))
  ex = plots.ot_plan_example(d.config("cot2align"), d.run_dir("cot2align"), d.data_dir)
  n, m = ex["plan"].shape
  assert (n, m) == (len(ex["student_tokens"]), len(ex["teacher_tokens"]))
  assert ex["student_tokens"][-1] == "</s>" and ex["teacher_tokens"][-1] == "</s>"
  assert abs(ex["plan"].sum(1) - 1 / n).max() < 1e-3
  assert abs(ex["plan"].sum(0) - 1 / m).max() < 1e-3
  assert ((ex["cost"] >= 0) & (ex["cost"] <= 1)).all()
  # the peak of P·n·m: 1 for the uniform coupling, at most min(n, m) for a balanced plan
  assert ex["plan_peak"] == pytest.approx(float(ex["plan"].max()) * n * m, rel=1e-5)
  assert 1.0 <= ex["plan_peak"] <= min(n, m) + 1e-4
  assert ex["epsilon"] == 10.0   # cot2align: the paper's absolute ε


def test_rerun_keeps_every_stage(demo_run):
  workdir, _ = demo_run
  before = json.loads((workdir / "demo_results.json").read_text())
  proc = _run(f"--workdir={workdir}", "--size=ci", f"--methods={','.join(METHODS)}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("kept from an earlier run") >= 3 + len(METHODS)
  after = json.loads((workdir / "demo_results.json").read_text())
  assert [r["accuracy"] for r in after["results"]] == [r["accuracy"] for r in before["results"]]
  # the kept stages report the seconds they took when they ran, not the rerun's
  bt, at = before["timings_s"], after["timings_s"]
  for stage in ("data", "teacher", "rationales") + tuple(f"student/{m}" for m in METHODS):
    assert at[stage] == bt[stage], stage
  assert at["this_run"] < at["total"]
  assert f"{at['this_run']:.0f} s in the last run" in (workdir / "demo_results.md").read_text()


def test_stop_after_rationales_prepares_data_teacher_and_rationales_only(demo_run, tmp_path):
  """An experiment runner's preparation: with the data and the teacher of a finished run copied
  into a new workdir, --stop_after=rationales writes the same rationales and stops there."""
  workdir, _ = demo_run
  new = tmp_path / "prep"
  new.mkdir()
  for name in ("data", "tokenizers", "models", "teacher"):
    shutil.copytree(workdir / name, new / name)
  shutil.copy(workdir / stages.SETTINGS_FILE, new / stages.SETTINGS_FILE)
  proc = _run(f"--workdir={new}", "--size=ci", "--methods=sft", "--stop_after=rationales")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[3/6] rationales" in proc.stdout and "[4/6]" not in proc.stdout
  assert "stopped after rationales" in proc.stdout
  # written although no sft student reads them, identical to the full run's
  assert (new / "rationales.jsonl").read_text() == (workdir / "rationales.jsonl").read_text()
  assert not (new / "students").exists() and not (new / "eval").exists()
  assert not (new / "demo_results.json").exists()


def test_other_size_in_the_same_workdir_is_refused(demo_run):
  workdir, _ = demo_run
  proc = _run(f"--workdir={workdir}", "--size=small", timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "holds a demo made with --size=ci --seed=0" in proc.stderr
  assert json.loads((workdir / "demo_results.json").read_text())["size"] == "ci"


@pytest.mark.parametrize("args,message", [
    (("--methods=sft,bogus",), "unknown method(s) bogus"),
    (("--methods=kd",), "needs one vocabulary"),
    (("--size=huge",), "size"),
    (("--stop_after=nothing",), "stop_after"),
    (("--config=/nonexistent/demo.py",), "config file not found"),
])
def test_bad_flags_fail_in_one_line(tmp_path, args, message):
  proc = _run(f"--workdir={tmp_path / 'w'}", *args, timeout=120)
  assert proc.returncode != 0
  err = [l for l in proc.stderr.splitlines() if l.strip() and "Warning" not in l]
  assert any(message in l for l in err), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w" / "demo_results.json").exists()


def test_large_size_widens_only_the_student(tmp_path):
  """size=large: full's data, teacher, steps and batch; a wider student, written as its
  initialisation's config and read by every student method's config at that size."""
  full = stages.Demo(tmp_path, "full", ("sft",), 0, stages.DEFAULT_CONFIG)
  large = stages.Demo(tmp_path, "large", ("sft",), 0, stages.DEFAULT_CONFIG)
  assert large.sizes() == full.sizes()
  (t_full, s_full), (t_large, s_large) = full.model_shapes(), large.model_shapes()
  assert t_large == t_full
  assert s_full["hidden_size"] == 64 and s_large["hidden_size"] == 128
  assert large.config("cot2align").train.steps == full.config("cot2align").train.steps
  assert large.config("cot2align").data.batch_size == full.config("cot2align").data.batch_size
