"""Specs and plans: budget protocols' step counts, seeds, bad specs, --dry_run."""

import json
import subprocess
import sys

import pytest

from cot2align_jax.core.paths import PROJECT_ROOT
from cot2align_jax.experiment import plan as P
from cot2align_jax.experiment import runner
from cot2align_jax.experiment.spec import SpecError, from_value, load_spec

TINY = str(PROJECT_ROOT / "experiments" / "tiny.py")


def _plan(tmp_path, arg):
  spec = load_spec(f"{TINY}:{arg}")
  runner.prepare(spec, tmp_path)
  return spec, {u.key: u for u in P.make_plan(spec, tmp_path)}


def test_budget_protocols_step_counts(tmp_path):
  # 10 problems, batch 4, drop_remainder: plain has 10 records (2 steps an epoch), cot 20
  # (every problem has a CoT record: 5 steps an epoch).
  spec, units = _plan(tmp_path, "epochs=3,examples=10,seeds=0-1")
  assert [u.key for u in units.values()][:4] == [
      "plain/epochs/seed0", "cot/epochs/seed0", "plain/compute/seed0", "cot/compute/seed0"]
  assert units["plain/epochs/seed0"].records == 10 and units["cot/epochs/seed0"].records == 20
  # epochs: 3 epochs over each run's own records
  assert units["plain/epochs/seed0"].steps == 3 * (10 // 4)
  assert units["cot/epochs/seed0"].steps == 3 * (20 // 4)
  # compute: the baseline's epoch budget in sequences (3 × 2 × 4 = 24) for every run
  assert units["plain/compute/seed1"].steps == units["cot/compute/seed1"].steps == 24 // 4
  ep, cp = units["cot/epochs/seed1"].overrides, units["cot/compute/seed1"].overrides
  assert (ep["train.epochs"], ep["train.steps"]) == (3, 0)
  assert (cp["train.epochs"], cp["train.steps"]) == (0, 6)
  # plain's compute unit is the same training as its epochs unit (6 steps both): reused
  assert units["plain/compute/seed1"].same_as == "plain/epochs/seed1"
  assert units["cot/compute/seed1"].same_as == "" and units["cot/epochs/seed1"].same_as == ""
  assert ep["train.seed"] == 1 and "data.seed" not in ep          # spec.seed_keys
  assert ep["data.rationales"] == str(tmp_path.resolve() / "prepare" / "cot.jsonl")
  assert json.loads((tmp_path / "prepare" / runner.PREPARED).read_text())["seconds"] >= 0


def test_filters(tmp_path):
  spec = load_spec(f"{TINY}:seeds=0-1-2")
  units = P.make_plan(spec, tmp_path, only=["cot"], seeds=[2], budgets=["compute"], count=False)
  assert [u.key for u in units] == ["cot/compute/seed2"]
  with pytest.raises(SpecError, match="unknown run 'nope'"):
    P.make_plan(spec, tmp_path, only=["nope"], count=False)
  with pytest.raises(SpecError, match="--budgets"):
    P.make_plan(spec, tmp_path, budgets=["config"], count=False)


def _write_spec(tmp_path, runs, **extra):
  fields = dict(name="bad", runs=runs, baseline=next(iter(runs)), seeds=[0], **extra)
  path = tmp_path / "bad_spec.py"
  path.write_text(f"def get_spec(arg=None):\n  return {fields!r}\n")
  return str(path)


@pytest.mark.parametrize("runs,match", [
    ({"a": {"confg": "configs/tiny.py:sft"}}, "unknown key 'confg'"),
    ({"a": {"config": "configs/nope.py:sft"}}, "run 'a': config file not found"),
    ({"a": {"config": "configs/tiny.py:sft", "overrides": {"train.stepz": 3}}},
     "unknown config key 'train.stepz'"),
    ({"a": {"config": "configs/tiny.py:nomethod"}}, "run 'a'"),
])
def test_bad_specs_raise_one_line(tmp_path, runs, match):
  with pytest.raises(SpecError, match=match) as e:
    P.make_plan(load_spec(_write_spec(tmp_path, runs)), tmp_path, count=False)
  assert "\n" not in str(e.value)


def test_bad_spec_values(tmp_path):
  with pytest.raises(SpecError, match="spec.baseline 'b' is not a run"):
    from_value(dict(name="x", runs={"a": "configs/tiny.py"}, baseline="b", seeds=[0]))
  with pytest.raises(SpecError, match="spec.epochs"):
    load_spec(_write_spec(tmp_path, {"a": "configs/tiny.py:sft"}, budgets=["epochs"]))
  with pytest.raises(SpecError, match="spec file not found"):
    load_spec(str(tmp_path / "missing.py"))


def _cli(*args, cwd=None):
  return subprocess.run([sys.executable, "-m", "cot2align_jax.experiment", *args],
                        capture_output=True, text=True, timeout=600, cwd=cwd)


def test_cli_bad_spec_exits_2_with_one_line(tmp_path):
  path = _write_spec(tmp_path, {"a": {"confg": "configs/tiny.py:sft"}})
  out = _cli(f"--spec={path}", f"--workdir={tmp_path / 'w'}", "--dry_run")
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and "confg" in lines[0]
  assert not (tmp_path / "w").exists()


def test_cli_dry_run_prints_the_plan_without_training(tmp_path):
  spec = load_spec(TINY)
  runner.prepare(spec, tmp_path)            # so that the records can be counted
  out = _cli(f"--spec={TINY}", f"--workdir={tmp_path}", "--dry_run", "--only=cot")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0].startswith("experiment tiny: 4 units (1 runs x 2 budgets x 2 seeds)")
  row = next(l.split() for l in lines if l.startswith("cot/epochs/seed0"))
  assert row[:7] == ["cot/epochs/seed0", "sft", "32", "4", "32", "128", "pending"]
  assert "total to do: 4 units, 96 steps" in out.stdout
  assert not (tmp_path / "runs").exists()
