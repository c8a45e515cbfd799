"""A whole sweep of experiments/tiny.py through the CLI: SIGKILL in the middle, rerun, report.

Four units at seed 0 (plain / cot × epochs / compute). The first sweep is killed (SIGKILL of
its whole process group: runner and trainer) while cot/epochs is training; the rerun must keep
the finished unit, resume the killed one from its last checkpoint and finish the others, and
--aggregate_only must rebuild the same report.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cot2align_jax.core.paths import PROJECT_ROOT
from cot2align_jax.experiment import plan as P

SPEC = f"{PROJECT_ROOT / 'experiments' / 'tiny.py'}:seeds=0"
KILL_AT = 4      # kill once cot/epochs has a checkpoint at or past this step (of 32)


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "cot2align_jax.experiment", f"--spec={SPEC}",
          f"--workdir={workdir}", "--noprogress", "--noplots", *extra]


def _starts(unit_dir: Path) -> int:
  return sum(1 for l in (unit_dir / "train_attempts.jsonl").read_text().splitlines()
             if json.loads(l)["event"] == "start")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sweep")
  done_dir = workdir / "runs" / "plain" / "epochs" / "seed0"
  killed_dir = workdir / "runs" / "cot" / "epochs" / "seed0"
  log = (workdir.parent / "first_sweep.log").open("w")
  first = subprocess.Popen(_cmd(workdir), stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
  killed_at = None
  deadline = time.time() + 900
  try:
    while time.time() < deadline and first.poll() is None:
      step = P.latest_checkpoint_step(killed_dir / P.TRAIN_DIR)
      if step is not None and step >= KILL_AT and not (killed_dir / "train_done.json").exists():
        os.killpg(first.pid, signal.SIGKILL)
        killed_at = step
        break
      time.sleep(0.05)
  finally:
    if first.poll() is None and killed_at is None:
      os.killpg(first.pid, signal.SIGKILL)
    first.wait()
  assert killed_at is not None, "the first sweep ended before cot/epochs could be killed"
  before = {"mtime": (done_dir / P.RESULT_FILE).stat().st_mtime_ns,
            "metrics": (done_dir / P.TRAIN_DIR / "metrics.jsonl").stat().st_mtime_ns,
            "result": (done_dir / P.RESULT_FILE).read_text(),
            "killed_result": (killed_dir / P.RESULT_FILE).exists(),
            "killed_step": P.latest_checkpoint_step(killed_dir / P.TRAIN_DIR)}
  second = subprocess.run(_cmd(workdir), capture_output=True, text=True, timeout=1500)
  return dict(workdir=workdir, done_dir=done_dir, killed_dir=killed_dir, killed_at=killed_at,
              before=before, second=second)


@pytest.mark.slow
def test_rerun_skips_finished_and_resumes_killed(sweep):
  assert sweep["second"].returncode == 0, sweep["second"].stderr[-2000:]
  before, done_dir, killed_dir = sweep["before"], sweep["done_dir"], sweep["killed_dir"]
  assert not before["killed_result"]
  # the finished unit was not touched: same result file, no second training attempt
  assert (done_dir / P.RESULT_FILE).stat().st_mtime_ns == before["mtime"]
  assert (done_dir / P.TRAIN_DIR / "metrics.jsonl").stat().st_mtime_ns == before["metrics"]
  assert (done_dir / P.RESULT_FILE).read_text() == before["result"]
  assert _starts(done_dir) == 1
  # the killed unit resumed from the checkpoint it left (not from step 0) and finished
  result = json.loads((killed_dir / P.RESULT_FILE).read_text())
  assert _starts(killed_dir) == 2
  assert result["train"]["resumed"] is True
  assert result["train"]["start_step"] == before["killed_step"] >= sweep["killed_at"]
  assert 0 < result["train"]["start_step"] < 32
  assert result["steps"] == 32


@pytest.mark.slow
def test_budgets_ran_the_planned_steps(sweep):
  runs = sweep["workdir"] / "runs"
  steps = {f"{r}/{b}": json.loads((runs / r / b / "seed0" / P.RESULT_FILE).read_text())
           for r in ("plain", "cot") for b in ("epochs", "compute")}
  # 16 plain records vs 32 with CoT records, batch 4, 4 epochs; compute = 64 sequences each
  assert {k: v["steps"] for k, v in steps.items()} == {
      "plain/epochs": 16, "cot/epochs": 32, "plain/compute": 16, "cot/compute": 16}
  assert all(v["steps_match_plan"] for v in steps.values())
  assert steps["cot/compute"]["sequences"] == steps["plain/epochs"]["sequences"] == 64
  # plain/compute is the same training as plain/epochs: its result is reused, not retrained
  assert steps["plain/compute"]["same_as"] == "plain/epochs/seed0"
  assert steps["plain/compute"]["scores"] == steps["plain/epochs"]["scores"]
  assert not (runs / "plain" / "compute" / "seed0" / P.TRAIN_DIR).exists()
  assert "same_as" not in steps["cot/compute"]
  cols = set(steps["cot/epochs"]["scores"])
  assert cols == {"tiny/test:plain", "tiny/test:cot"}
  for v in steps.values():
    for c in cols:
      assert v["scores"][c]["n"] == 8 and len(v["scores"][c]["items"]) == 8


@pytest.mark.slow
def test_aggregate_only_rebuilds_the_report(sweep):
  workdir = sweep["workdir"]
  report_json = (workdir / "results.json").read_text()
  report_md = (workdir / "results.md").read_text()
  payload = json.loads(report_json)
  assert payload["done"] == payload["units"] == 4 and payload["missing"] == []
  assert {r["run"] for r in payload["rows"]} == {"plain", "cot"}
  (workdir / "results.json").unlink()
  (workdir / "results.md").unlink()
  out = subprocess.run(_cmd(workdir, "--aggregate_only"), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr
  assert (workdir / "results.json").read_text() == report_json
  assert (workdir / "results.md").read_text() == report_md
