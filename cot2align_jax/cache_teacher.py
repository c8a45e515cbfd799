r"""Run the teacher once over the training records and store what the method reads from it.

    python -m cot2align_jax.cache_teacher --config=configs/tiny.py:cot2align --out=/tmp/tcache
    python -m cot2align_jax.train --config=configs/tiny.py:cot2align --workdir=/tmp/run \
        --config.teacher.cache=/tmp/tcache

The config is the training run's (the same file and overrides): it decides the teacher, the
training records, the tokenization and, through the method, which views and layers are cached
(training/steps.py teacher_cache_layout). Every process of a multi-process job writes the rows of
its own data shard into --out (a directory all of them see). Re-running with the same --out
resumes after the last complete chunk; a cache built for another teacher, data or settings is
refused in one line. docs/memory.md ("Teacher cache") describes the format and when it pays.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from absl import app, flags

from cot2align_jax.core import cli
from cot2align_jax.data import teacher_cache as cache_lib
from cot2align_jax.data.records import DataError
from cot2align_jax.models.config import ModelError
from cot2align_jax.training import cli_flags
from cot2align_jax.training import config as C
from cot2align_jax.training import mesh as mesh_lib
from cot2align_jax.training.teacher_cache import build_cache

_CONFIG = cli.define_config_flag("The training config (configs/*.py[:arg]) whose teacher to cache.")
_OUT = flags.DEFINE_string("out", None, "Cache directory (resumed when it holds a partial cache).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Rows per teacher forward on this process "
                              "(0 = the config's data.batch_size / processes).")
_CHUNK = flags.DEFINE_integer("chunk_batches", 16, "Batches per shard file (the resume unit).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", list(cache_lib.DTYPES),
                           "Storage dtype of the hidden states (float32: the online teacher's "
                           "float32 states exactly).")

INPUT_ERRORS = (C.ConfigError, ModelError, DataError, FileNotFoundError, cache_lib.CacheError,
                mesh_lib.DistributedError)


def main(argv: list[str]) -> None:
  cli.no_arguments(argv)
  cli.quiet_logging()
  summary = cli.guarded(lambda: mesh_lib.exit_on_peer_loss(lambda: build_cache(
      _CONFIG.value, Path(_OUT.value).expanduser(), batch_size=_BATCH.value,
      chunk_batches=_CHUNK.value, dtype=_DTYPE.value,
      progress=os.environ.get("COT2ALIGN_NO_PROGRESS") != "1")), INPUT_ERRORS)
  print(json.dumps(summary), flush=True)


def run() -> None:
  app.run(main, flags_parser=cli_flags.config_parser(config_required=True,
                                                     required={"out": "dir"}))


if __name__ == "__main__":
  run()
