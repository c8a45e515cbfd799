r"""Run an experiment: python -m cot2align_jax.experiment --spec=FILE[:ARG] --workdir=DIR

    python -m cot2align_jax.experiment --spec=experiments/demo.py --workdir=runs/exp_demo
    python -m cot2align_jax.experiment --spec=experiments/demo.py:size=ci --workdir=/tmp/e \
        --only=sft,cot2align --seeds=0,1 --dry_run
    python -m cot2align_jax.experiment --spec=experiments/demo.py --workdir=runs/exp_demo \
        --aggregate_only

Runs the spec's prepare step once, then every (run, budget, seed) as `python -m
cot2align_jax.train` + an evaluation worker in DIR/runs/<run>/<budget>/seed<k>/, skipping
finished units and resuming interrupted ones, and writes DIR/results.{md,json} and
DIR/plots/. --dry_run prints the plan and its estimated cost; --aggregate_only rebuilds the
report from the saved results. Exit status: 0 all done, 1 some units failed (listed), 2 bad
spec or flags (one line), 130 stopped by a signal (rerun to continue).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from absl import app, flags

from cot2align_jax.core import cli
from cot2align_jax.experiment import plan as P
from cot2align_jax.experiment import report, runner
from cot2align_jax.experiment.spec import SpecError, load_spec

FLAGS = flags.FLAGS
flags.DEFINE_string("spec", None, "experiment spec file (experiments/*.py), optionally :arg")
flags.DEFINE_string("workdir", None, "experiment directory (resumable)")
flags.DEFINE_string("only", "", "comma-separated run names (default: all)")
flags.DEFINE_string("seeds", "", "comma-separated seeds instead of the spec's")
flags.DEFINE_string("budgets", "", "comma-separated budgets of the spec (default: all)")
flags.DEFINE_bool("dry_run", False, "print the plan and its estimated cost; train nothing")
flags.DEFINE_bool("aggregate_only", False, "rebuild results.{md,json} and plots from saved results")
flags.DEFINE_bool("progress", True, "progress bar over the units")
flags.DEFINE_bool("plots", True, "write plots/ with the report")

EXIT_FAILED = 1  # some units failed; they are listed and a rerun retries them


def _list(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> list[int]:
  """"0,1,2" or "0-1-2" (the spec args' separator) → [0, 1, 2]."""
  try:
    return [int(s) for s in _list(text.replace("-", ","))]
  except ValueError:
    raise SpecError(f"--seeds must be integers separated by ',' or '-', got {text!r}") from None


def main(argv) -> None:
  cli.no_arguments(argv)
  logging.getLogger("absl").setLevel(logging.WARNING)
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  if not FLAGS.spec:
    cli.fail("--spec=<experiments/file.py[:arg]> is required")
  if not FLAGS.workdir:
    cli.fail("--workdir=<dir> is required")
  if FLAGS.dry_run and FLAGS.aggregate_only:
    cli.fail("--dry_run and --aggregate_only exclude each other")
  workdir = Path(FLAGS.workdir).expanduser().resolve()
  try:
    spec = load_spec(FLAGS.spec)
    selection = dict(only=_list(FLAGS.only), seeds=_seeds(FLAGS.seeds),
                     budgets=_list(FLAGS.budgets))
    if FLAGS.dry_run:
      print(P.format_plan(P.make_plan(spec, workdir, **selection), spec, workdir))
      return
    if FLAGS.aggregate_only:
      units = P.make_plan(spec, workdir, **selection, count=False)
      results = [r for r in (P.read_result(u.dir(workdir)) for u in units) if r is not None]
      paths = report.write_report(report.aggregate(spec, units, results), workdir,
                                  plots=FLAGS.plots)
      print(f"wrote {', '.join(str(p) for p in paths)}")
      return
    P.make_plan(spec, workdir, **selection, count=False)   # a bad spec fails before prepare
    runner.prepare(spec, workdir)
    units = P.make_plan(spec, workdir, **selection)
  except SpecError as e:
    cli.fail(str(e))
  except runner.UnitFailed as e:
    print(f"error: prepare failed: {e}", file=sys.stderr)
    sys.exit(EXIT_FAILED)
  except runner.Interrupted as e:
    cli.stopped(e)
  print(P.format_plan(units, spec, workdir), flush=True)
  try:
    results, failed = runner.run_units(spec, workdir, units, progress=FLAGS.progress)
  except runner.Interrupted as e:
    cli.stopped(e)
  payload = report.aggregate(spec, units, results)
  paths = report.write_report(payload, workdir, plots=FLAGS.plots)
  print(report.markdown(payload))
  print(f"wrote {', '.join(str(p) for p in paths)}")
  if failed:
    print(f"{len(failed)} unit(s) failed (rerun to retry them):", file=sys.stderr)
    for line in failed:
      print(f"  {line}", file=sys.stderr)
    sys.exit(EXIT_FAILED)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
