"""The embedded demo: a complete cross-tokenizer distillation, offline, on a CPU.

    python -m cot2align_jax.demo --workdir=runs/demo                  # ~7 min on 2 CPU cores
    python -m cot2align_jax.demo --workdir=/tmp/d --size=ci          # a reduced run (tests)
    python -m cot2align_jax.demo --workdir=runs/demo --methods=sft,cot2align

The stages (data, teacher, rationales, students, evaluation, report) and what each writes are
described in cot2align_jax/training/demo.py. Rerunning skips finished stages; --force starts
over. Bad flags: one line on stderr, exit 2; Ctrl-C: exit 130, rerun to continue.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags

from cot2align_jax.training.demo import DEFAULT_CONFIG, DemoError, make_demo, run

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo", "output directory (resumable)")
flags.DEFINE_enum("size", "full", ["full", "small", "ci"],
                  "full: the README's run; small: about half; ci: a seconds-long smoke run")
flags.DEFINE_string("methods", "sft,uld,dskd_cma,cot2align", "student methods (comma list)")
flags.DEFINE_integer("seed", 0, "data, initialisation and training seed")
flags.DEFINE_bool("force", False, "delete the workdir's demo outputs and start over")
flags.DEFINE_string("config", str(DEFAULT_CONFIG), "the demo's config file")


def main(argv) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  logging.getLogger("absl").setLevel(logging.WARNING)
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  from cot2align_jax.data.records import DataError  # pylint: disable=g-import-not-at-top
  from cot2align_jax.training.config import ConfigError  # pylint: disable=g-import-not-at-top
  try:
    demo = make_demo(FLAGS.workdir, FLAGS.size, FLAGS.methods, FLAGS.seed, FLAGS.config,
                     FLAGS.force)
    run(demo)
  except (DemoError, ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt as e:
    print(f"\nstopped: {e or 'interrupted'}; rerun the same command to continue",
          file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  app.run(main)
