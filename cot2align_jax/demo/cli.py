"""The demo's command line (python -m cot2align_jax.demo; the stages are in demo/stages.py).

    python -m cot2align_jax.demo --workdir=runs/demo                  # ~7 min on 2 CPU cores
    python -m cot2align_jax.demo --workdir=/tmp/d --size=ci          # a reduced run (tests)
    python -m cot2align_jax.demo --workdir=runs/demo --methods=sft,cot2align
    python -m cot2align_jax.demo --workdir=runs/demo --stop_after=rationales   # data, teacher,
                                                                               # rationales only

Rerunning skips finished stages; --force starts over. Bad flags: one line on stderr, exit 2;
Ctrl-C: exit 130, rerun to continue.
"""

from __future__ import annotations

import logging
import os

from absl import flags

from cot2align_jax.core import cli
from cot2align_jax.data.records import DataError
from cot2align_jax.demo.stages import DEFAULT_CONFIG, STAGES, DemoError, make_demo, run
from cot2align_jax.training.config import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo", "output directory (resumable)")
flags.DEFINE_string("size", "full",
                    "a size of --config's SIZES: full (the README's run), large (full with a "
                    "wider student), small (about half), ci (a seconds-long smoke run)")
flags.DEFINE_string("methods", "sft,uld,dskd_cma,cot2align", "student methods (comma list)")
flags.DEFINE_integer("seed", 0, "data, initialisation and training seed")
flags.DEFINE_bool("force", False, "delete the workdir's demo outputs and start over")
flags.DEFINE_string("config", str(DEFAULT_CONFIG), "the demo's config file")
flags.DEFINE_enum("stop_after", None, list(STAGES),
                  "stop after this stage (e.g. rationales: data, teacher and its rationales "
                  "only, for an experiment runner); default: run every stage")


def main(argv) -> None:
  """absl main: the demo with the flags; known errors exit 2 with one line on stderr, Ctrl-C
  exits 130."""
  cli.no_arguments(argv)
  logging.getLogger("absl").setLevel(logging.WARNING)
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

  def body() -> None:
    demo = make_demo(FLAGS.workdir, FLAGS.size, FLAGS.methods, FLAGS.seed, FLAGS.config,
                     FLAGS.force)
    run(demo, stop_after=FLAGS.stop_after)

  cli.guarded(body, (DemoError, ConfigError, DataError), interruptible=True)
