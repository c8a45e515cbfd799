"""Wall time of one demo training run per method, to plan a sweep of experiments/demo.py.

Run from the repository root:

  python bench/demo_runs.py --workdir=runs/exp_demo --size=full   # uses (or makes) its prepare/
  python bench/demo_runs.py --workdir=/tmp/b --size=ci --steps=4   # smoke

For every run of the spec's main set, one process trains it side by side with the others, on
the experiment's own prepared data and models, for --steps steps at seed 0 (the unit's exact
config: records, batch, CoT records, OT settings), and records the time to the first step
(start-up: loading, pipeline, the first compile) and the mean time of the later steps (new
bucket shapes recompile inside them). The projection of a run is start-up + (steps of the
run - 1) × mean step time, for each budget's step count (experiments/demo.py: epochs and
compute); evaluation is not included (the experiment report shows its measured seconds).
JSON to --out (default bench/results/demo_runs.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from cot2align_jax.experiment import plan as P  # noqa: E402
from cot2align_jax.experiment import runner  # noqa: E402
from cot2align_jax.experiment.spec import load_spec  # noqa: E402
from cot2align_jax.training import config as C  # noqa: E402
from cot2align_jax.training import loop  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "demo_runs.json"
FIXED = {"train.eval_every": -1, "checkpoint.best_metric": "", "checkpoint.async_save": False,
         "train.export": False, "train.epochs": 0}


def _parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="experiment workdir (its prepare/ is used)")
  p.add_argument("--size", default="full", choices=("full", "small", "ci"))
  p.add_argument("--steps", type=int, default=20, help="timed steps per run (>= 2)")
  p.add_argument("--only", default="", help="comma-separated runs (default: all)")
  p.add_argument("--out", default=str(DEFAULT_OUT))
  return p


def time_run(unit: P.Unit, steps: int, workdir: Path) -> dict:
  """Trains `unit`'s config for `steps` steps; start-up and step seconds."""
  cfg = C.load_config(unit.config_path, unit.config_arg,
                      {**unit.overrides, **FIXED, "train.steps": steps})
  stamps: list[float] = []
  start = time.perf_counter()
  loop.train(cfg, workdir, after_step=lambda step: stamps.append(time.perf_counter()))
  later = [b - a for a, b in zip(stamps, stamps[1:])]
  return {"startup_s": round(stamps[0] - start, 2), "step_s_mean": statistics.fmean(later),
          "step_s_median": statistics.median(later), "timed_steps": len(stamps)}


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.steps < 2:
    print("error: --steps must be >= 2", file=sys.stderr)
    return 2
  os.environ.setdefault("COT2ALIGN_NO_PROGRESS", "1")
  spec = load_spec(f"{ROOT / 'experiments' / 'demo.py'}:size={args.size}")
  workdir = Path(args.workdir).expanduser().resolve()
  runner.prepare(spec, workdir)
  only = [r for r in args.only.split(",") if r]
  units = P.make_plan(spec, workdir, only=only, seeds=[spec.seeds[0]])
  rows = {}
  for unit in units:
    if unit.budget != "epochs":
      continue
    with tempfile.TemporaryDirectory() as tmp:
      t = time_run(unit, args.steps, Path(tmp))
    planned = {u.budget: u.steps for u in units if u.run == unit.run}
    t["run_steps"] = planned
    t["projected_train_s"] = {b: round(t["startup_s"] + (n - 1) * t["step_s_mean"], 1)
                              for b, n in planned.items()}
    rows[unit.run] = t
    print(f"{unit.run:16s} start-up {t['startup_s']:6.1f} s  step {t['step_s_mean']:.3f} s  "
          + "  ".join(f"{b} {n} steps ≈ {t['projected_train_s'][b]:.0f} s"
                      for b, n in planned.items()), flush=True)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": platform.machine(), "cpus": os.cpu_count(), "size": args.size,
      "steps": args.steps, "runs": rows}, indent=1) + "\n")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
