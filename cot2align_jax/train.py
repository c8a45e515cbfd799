r"""Train a student: python -m cot2align_jax.train --config=FILE[:ARG] --workdir=DIR [overrides]

    python -m cot2align_jax.train --config=configs/tiny.py:cot2align --workdir=/tmp/tiny
    python -m cot2align_jax.train --config=configs/paper/qwen15_to_gpt2.py --workdir=/runs/q2g \
        --config.teacher.path=/ckpt/qwen1.5-1.8b-dolly --config.data.rationales=/data/r.jsonl
    python -m cot2align_jax.train --config=configs/tiny.py:dskd_cma --workdir=/tmp/d \
        --config.train.steps=50 --config.optim.lr=1e-3

Every --config.<section>.<key>=<value> must name an existing key (docs/config.md lists them).
Re-running with the same --workdir resumes from its latest checkpoint. SIGTERM saves a
checkpoint and exits 0. Errors in the config (unknown key, missing config file, missing model or
data path) print one line "error: ..." and exit with status 2.

Writes into the workdir: metrics.jsonl, tb/ (TensorBoard), checkpoints/, export/ (the student as
a Hugging Face checkpoint).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

from cot2align_jax.core import cli
from cot2align_jax.data.records import DataError
from cot2align_jax.data.teacher_cache import CacheError
from cot2align_jax.models.config import ModelError
from cot2align_jax.training import cli_flags
from cot2align_jax.training import config as C
from cot2align_jax.training import loop
from cot2align_jax.training.checkpoint import CheckpointError
from cot2align_jax.training.mesh import DistributedError, exit_on_peer_loss

_CONFIG = cli.define_config_flag(
    "Experiment config file (configs/*.py), optionally with :arg.")
_WORKDIR = cli.define_once(flags.DEFINE_string, "workdir", None,
                           "Run directory (logs, checkpoints, export).")

# Bad input: one line on stderr, exit 2.
# DistributedError: the processes of a multi-process job could not join (launch/README.md).
INPUT_ERRORS = (C.ConfigError, ModelError, DataError, CheckpointError, FileNotFoundError,
                DistributedError, CacheError)


def main(argv: list[str]) -> None:
  cli.no_arguments(argv)
  cli.quiet_logging()
  summary = cli.guarded(
      lambda: exit_on_peer_loss(lambda: loop.train(_CONFIG.value, _WORKDIR.value)),
      INPUT_ERRORS)
  keys = ("step", "start_step", "resumed", "preempted", "export")
  print(json.dumps({k: summary.get(k) for k in keys}), flush=True)
  if summary.get("preempted"):
    print(f"stopped by signal at step {summary['step']}; checkpoint saved in "
          f"{Path(summary['workdir']) / loop.CKPT_DIR}", file=sys.stderr, flush=True)


def run() -> None:
  app.run(main, flags_parser=cli_flags.config_parser(config_required=True,
                                                     required={"workdir": "dir"}))


if __name__ == "__main__":
  run()
