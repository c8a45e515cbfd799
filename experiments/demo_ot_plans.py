r"""OT-plan pictures of trained demo-experiment students, one per run, side by side in a report.

    python experiments/demo_ot_plans.py --workdir=runs/exp_demo --runs=cot2align,cot2align_plus \
        --seed=0 --out=docs/experiments

For each run, the unit `<workdir>/runs/<run>/epochs/seed<k>` is restored from its checkpoint and
its OT plan for the first test problem is drawn with the run's own OT settings
(`demo.plots.ot_plan_example`); writes `<out>/ot_plan_<run>.png` and prints each plan's peak
(max P·n·m: 1 = the uniform coupling).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cot2align_jax.core import cli
from cot2align_jax.demo import plots
from cot2align_jax.training import config as C


def unit_config(unit_dir: Path):
  """The config a unit trained with: its config file[:arg] plus the unit's overrides."""
  result = json.loads((unit_dir / "result.json").read_text())
  path, arg = C.split_config_arg(result["config"])
  return C.load_config(path, arg, result["overrides"]), result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--runs", default="cot2align,cot2align_plus")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--budget", default="epochs")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for run in [r for r in args.runs.split(",") if r]:
    unit = Path(args.workdir) / "runs" / run / args.budget / f"seed{args.seed}"
    if not (unit / "result.json").is_file():
      cli.fail(f"{unit}: no finished unit (result.json missing)")
    config, result = unit_config(unit)
    example = plots.ot_plan_example(config, unit / "train", result["overrides"]["data.source"])
    path = plots.plot_ot_plan(example, out / f"ot_plan_{run}.png")
    print(f"{run}: plan peak {example['plan_peak']:.2f} (eps {example['epsilon']:.3g}, "
          f"{example['cost_kind']} cost) -> {path}")


if __name__ == "__main__":
  cli.guarded(main, (C.ConfigError, FileNotFoundError, ValueError))
