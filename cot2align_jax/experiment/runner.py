"""Running the units of a plan, each as subprocesses: train (the project's CLI) then evaluate.

    results = run_units(spec, workdir, units)    # skips finished units, resumes partial ones

A unit's directory (workdir/runs/<run>/<budget>/seed<k>/) holds unit.json (what it is),
train/ (the training workdir: checkpoints, metrics.jsonl, export/), train.log / eval.log (the
subprocesses' stderr), train_done.json, eval.json and, written atomically and last,
result.json: the done-marker. A unit with result.json is never rerun; a unit that is the same
training as a finished one (plan.Unit.same_as) gets a copy of its result; one without resumes:
`python -m cot2align_jax.train` continues from train/checkpoints. A failed subprocess writes
failed.json and the sweep goes on with the next unit. SIGINT / SIGTERM stop the sweep: the
running trainer gets SIGTERM (it saves a checkpoint) and `Interrupted` is raised. The children
ignore SIGINT and get SIGTERM when the runner dies (Linux), so killing the runner leaves a
resumable unit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from cot2align_jax.experiment import plan as P
from cot2align_jax.experiment.spec import ExperimentSpec, substitute
from cot2align_jax.experiment.worker import EVAL_FILE, write_json_atomic

TRAIN_MODULE = "cot2align_jax.train"
WORKER_MODULE = "cot2align_jax.experiment.worker"
TRAIN_DONE = "train_done.json"
ATTEMPTS = "train_attempts.jsonl"
PREPARED = "prepared.json"

# Every child starts through this launcher, then execs the real command: it ignores SIGINT (a
# Ctrl-C reaches the runner, which sends SIGTERM so the trainer saves a checkpoint) and asks
# Linux for SIGTERM when the runner dies (prctl PR_SET_PDEATHSIG = 1). A launcher instead of
# Popen(preexec_fn=...): the runner has imported JAX, and forking a multithreaded process to
# run Python code in the child can deadlock.
LAUNCHER = ("import ctypes, os, signal, sys\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "if sys.platform.startswith('linux'):\n"
            "  ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
            "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n")


class Interrupted(RuntimeError):
  """The sweep was stopped by a signal; rerunning the command continues it."""


class UnitFailed(RuntimeError):
  """A unit's subprocess failed (its message is the last line of its log)."""


def format_override(value: Any) -> str:
  """A Python value as an absl --config.<key>= string."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def train_command(unit: P.Unit, workdir: Path) -> list[str]:
  cmd = [sys.executable, "-m", TRAIN_MODULE, f"--config={unit.config_text}",
         f"--workdir={unit.dir(workdir) / P.TRAIN_DIR}"]
  cmd += [f"--config.{k}={format_override(v)}" for k, v in unit.overrides.items()]
  return cmd


class _Signals:
  """SIGINT / SIGTERM → stop flag + SIGTERM to the running child."""

  def __init__(self):
    self.stop = False
    self.child: subprocess.Popen | None = None
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGINT, signal.SIGTERM):
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread: no handlers
        pass
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    return False

  def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
    self.stop = True
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signal.SIGTERM)


def _call(cmd: Sequence[str], stdout: Path, log: Path, signals: _Signals) -> int:
  """Runs cmd (stdout to `stdout`, stderr appended to `log`); its exit status."""
  env = dict(os.environ, COT2ALIGN_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false")
  with stdout.open("w") as out, log.open("a") as err:
    err.write(f"\n$ {' '.join(cmd)}\n")
    err.flush()
    argv = list(cmd)
    if argv and argv[0] == sys.executable:
      argv = [sys.executable, "-c", LAUNCHER, *argv[1:]]
    child = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
    signals.child = child
    try:
      while True:
        try:
          return child.wait()
        except KeyboardInterrupt:  # pragma: no cover - handlers replace it
          signals.stop = True
    finally:
      signals.child = None


def _last_line(path: Path) -> str:
  lines = [l.strip() for l in path.read_text(errors="replace").splitlines() if l.strip()] if (
      path.is_file()) else []
  errors = [l for l in lines if l.startswith("error:")]
  return (errors or lines or ["(no output)"])[-1][:300]


def _summary(stdout: Path) -> dict[str, Any]:
  """The JSON summary line the train CLI prints last."""
  for line in reversed(stdout.read_text().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except ValueError:
        continue
  return {}


def _append(path: Path, row: dict[str, Any]) -> None:
  with path.open("a") as f:
    f.write(json.dumps(row) + "\n")


def unit_payload(unit: P.Unit, spec: ExperimentSpec, workdir: Path) -> dict[str, Any]:
  out = unit.to_json()
  out["dir"] = str(unit.dir(workdir))
  out["evaluation"] = {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in dataclasses.asdict(spec.evaluation).items()}
  out["spec"] = spec.source
  return out


def train_unit(unit: P.Unit, workdir: Path, signals: _Signals) -> dict[str, Any]:
  """Trains (or resumes) a unit; the train_done.json payload."""
  d = unit.dir(workdir)
  done = d / TRAIN_DONE
  if done.is_file():
    return json.loads(done.read_text())
  attempts = d / ATTEMPTS
  _append(attempts, {"event": "start", "time": time.time(),
                     "checkpoint_step": P.latest_checkpoint_step(d / P.TRAIN_DIR)})
  start = time.perf_counter()
  rc = _call(train_command(unit, workdir), d / "train.out", d / "train.log", signals)
  seconds = time.perf_counter() - start
  summary = _summary(d / "train.out")
  _append(attempts, {"event": "end", "rc": rc, "seconds": round(seconds, 2), **summary})
  if rc != 0:
    if signals.stop:
      raise Interrupted(f"{unit.key}: training stopped by a signal")
    raise UnitFailed(f"train exited with {rc}: {_last_line(d / 'train.log')}")
  if summary.get("preempted") or signals.stop:
    raise Interrupted(f"{unit.key}: training stopped at step {summary.get('step')}")
  ends = [json.loads(l) for l in attempts.read_text().splitlines() if l.strip()]
  ends = [e for e in ends if e.get("event") == "end" and e.get("rc") == 0]
  payload = {"summary": summary, "seconds": round(sum(e["seconds"] for e in ends), 2),
             "attempts": sum(1 for l in attempts.read_text().splitlines() if '"start"' in l)}
  write_json_atomic(done, payload)
  return payload


def evaluate_unit(unit: P.Unit, workdir: Path, signals: _Signals) -> tuple[dict, float]:
  d = unit.dir(workdir)
  start = time.perf_counter()
  rc = _call([sys.executable, "-m", WORKER_MODULE, str(d / P.UNIT_FILE)], d / "eval.out",
             d / "eval.log", signals)
  if signals.stop:
    raise Interrupted(f"{unit.key}: evaluation stopped by a signal")
  if rc != 0:
    raise UnitFailed(f"evaluation exited with {rc}: {_last_line(d / 'eval.log')}")
  return json.loads((d / EVAL_FILE).read_text()), time.perf_counter() - start


def run_unit(unit: P.Unit, spec: ExperimentSpec, workdir: Path,
             signals: _Signals) -> dict[str, Any]:
  """Train + evaluate one unit; writes and returns its result (the done-marker)."""
  d = unit.dir(workdir)
  d.mkdir(parents=True, exist_ok=True)
  if unit.steps is None:
    raise UnitFailed(f"its step count is unknown ({unit.note})")
  write_json_atomic(d / P.UNIT_FILE, unit_payload(unit, spec, workdir))
  (d / P.FAILED_FILE).unlink(missing_ok=True)
  trained = train_unit(unit, workdir, signals)
  scores, eval_seconds = evaluate_unit(unit, workdir, signals)
  steps = int(trained["summary"].get("step") or 0)
  result = {"unit": unit.key, "run": unit.run, "budget": unit.budget, "seed": unit.seed,
            "method": unit.method, "config": unit.config_text,
            "overrides": unit.to_json()["overrides"], "records": unit.records,
            "batch_size": unit.batch_size, "planned_steps": unit.steps, "steps": steps,
            "sequences": steps * unit.batch_size,
            "steps_match_plan": steps == unit.steps,
            "train": trained["summary"], "train_attempts": trained["attempts"],
            "train_seconds": trained["seconds"], "eval_seconds": round(eval_seconds, 2),
            "scores": scores}
  write_json_atomic(d / P.RESULT_FILE, result)
  return result


def reuse_result(unit: P.Unit, workdir: Path) -> dict[str, Any] | None:
  """A unit with `same_as` whose twin is done: the twin's result under this unit's name and
  overrides (written as this unit's result.json); None if the twin has no result yet."""
  twin = P.read_result(P.unit_dir(unit.same_as, workdir))
  if twin is None:
    return None
  result = dict(twin, unit=unit.key, budget=unit.budget,
                overrides=unit.to_json()["overrides"], planned_steps=unit.steps,
                steps_match_plan=twin["steps"] == unit.steps, same_as=unit.same_as)
  d = unit.dir(workdir)
  d.mkdir(parents=True, exist_ok=True)
  write_json_atomic(d / P.RESULT_FILE, result)
  return result


def prepare(spec: ExperimentSpec, workdir: Path) -> None:
  """The spec's prepare step, once (workdir/prepare/prepared.json marks it done)."""
  if spec.prepare is None:
    return
  out = workdir / "prepare"
  marker = out / PREPARED
  if marker.is_file():
    return
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  if spec.prepare.command:
    cmd = [sys.executable if a == "{python}" else substitute(a, workdir)
           for a in spec.prepare.command]
    print(f"prepare: {' '.join(cmd)}", flush=True)
    with _Signals() as signals:
      rc = _call(cmd, out / "prepare.out", out / "prepare.log", signals)
      if signals.stop:
        raise Interrupted("prepare stopped by a signal")
    if rc != 0:
      raise UnitFailed(f"prepare exited with {rc}: {_last_line(out / 'prepare.log')} "
                       f"(log: {out / 'prepare.log'})")
  if spec.prepare.fn is not None:
    spec.prepare.fn(out)
  write_json_atomic(marker, {"seconds": round(time.perf_counter() - start, 1),
                             "command": list(spec.prepare.command)})


def run_units(spec: ExperimentSpec, workdir: Path, units: Sequence[P.Unit], *,
              progress: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
  """(results of every unit done now or before, "unit: reason" of the failed ones)."""
  results, failed = [], []
  with _Signals() as signals, tqdm(total=len(units), desc="experiment", unit="run",
                                   disable=not progress, dynamic_ncols=True,
                                   file=sys.stderr) as bar:
    for unit in units:
      bar.set_postfix_str(unit.key)
      old = P.read_result(unit.dir(workdir))
      if old is not None:
        results.append(old)
        bar.update(1)
        continue
      if signals.stop:
        raise Interrupted("stopped by a signal")
      old = reuse_result(unit, workdir) if unit.same_as else None
      if old is not None:
        results.append(old)
        bar.update(1)
        continue
      try:
        results.append(run_unit(unit, spec, workdir, signals))
      except UnitFailed as e:
        failed.append(f"{unit.key}: {e}")
        write_json_atomic(unit.dir(workdir) / P.FAILED_FILE, {"unit": unit.key, "error": str(e)})
        tqdm.write(f"FAILED {unit.key}: {e}", file=sys.stderr)
      bar.update(1)
  return results, failed
