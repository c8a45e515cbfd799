r"""Train a student: python -m cot2align_jax.train --config=FILE[:ARG] --workdir=DIR [overrides]

    python -m cot2align_jax.train --config=configs/tiny.py:cot2align --workdir=/tmp/tiny
    python -m cot2align_jax.train --config=configs/paper/qwen15_to_gpt2.py --workdir=/runs/q2g \
        --config.teacher.path=/ckpt/qwen1.5-1.8b-dolly --config.data.rationales=/data/r.jsonl
    python -m cot2align_jax.train --config=configs/methods/dskd_cma.py:tiny --workdir=/tmp/d \
        --config.train.steps=50 --config.optim.lr=1e-3

Every --config.<section>.<key>=<value> must name an existing key (configs/base.py lists them).
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
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py), optionally with :arg.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (logs, checkpoints, export).")

EXIT_USAGE = 2


def _fail(message: str) -> None:
  """Prints one line and exits with status 2 (no traceback)."""
  first = " ".join(str(message).split("\n")[0].split())
  print(f"error: {first}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


def _config_arg(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a[len("--config="):]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _override_keys(argv: list[str]) -> list[str]:
  out = []
  for i, a in enumerate(argv):
    if a.startswith("--config.") or a.startswith("--noconfig."):
      key = a.split("=", 1)[0].split("config.", 1)[1]
      out.append(key)
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors for the config file and its overrides."""
  from cot2align_jax.training import config as C  # pylint: disable=g-import-not-at-top
  if any(a.split("=")[0] in ("--help", "-h", "--helpshort", "--helpfull", "--helpxml")
         for a in argv[1:]):
    return flags.FLAGS(argv)  # absl prints the usage and exits
  spec = _config_arg(argv[1:])
  if spec is None:
    _fail("--config=<file.py[:arg]> is required")
  path, arg = C.split_config_arg(spec)
  if not Path(path).is_file():
    _fail(f"config file not found: {path}")
  try:
    cfg = C.load_config(path, arg)
    for key in _override_keys(argv[1:]):
      C.check_key(cfg, key)
  except C.ConfigError as e:
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"config file {spec}: {type(e).__name__}: {e}")
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"{type(e).__name__}: {e}")
  if not _WORKDIR.value:
    _fail("--workdir=<dir> is required")
  return rest


def _quiet_logs() -> None:
  """Orbax and grain log every file they write at INFO: show warnings only (unless
  --verbosity was given), but keep this package's INFO lines (resume, stop)."""
  import logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("cot2align_jax").setLevel(logging.INFO)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  _quiet_logs()
  from cot2align_jax.data.records import DataError  # pylint: disable=g-import-not-at-top
  from cot2align_jax.models.config import ModelError  # pylint: disable=g-import-not-at-top
  from cot2align_jax.training import config as C  # pylint: disable=g-import-not-at-top
  from cot2align_jax.training import loop  # pylint: disable=g-import-not-at-top
  from cot2align_jax.training.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  try:
    summary = loop.train(_CONFIG.value, _WORKDIR.value)
  except (C.ConfigError, ModelError, DataError, CheckpointError, FileNotFoundError) as e:
    _fail(str(e))
  keys = ("step", "start_step", "resumed", "preempted", "export")
  print(json.dumps({k: summary.get(k) for k in keys}), flush=True)
  if summary.get("preempted"):
    print(f"stopped by signal at step {summary['step']}; checkpoint saved in "
          f"{Path(summary['workdir']) / loop.CKPT_DIR}", file=sys.stderr, flush=True)


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
