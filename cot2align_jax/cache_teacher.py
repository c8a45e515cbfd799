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

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from cot2align_jax.core import cli, spec
from cot2align_jax.data import teacher_cache as cache_lib
from cot2align_jax.data.pipeline import Pipeline
from cot2align_jax.data.records import DataError
from cot2align_jax.models.config import ModelError
from cot2align_jax.training import cli_flags
from cot2align_jax.training import config as C
from cot2align_jax.training import mesh as mesh_lib
from cot2align_jax.training import setup
from cot2align_jax.training import state as state_lib
from cot2align_jax.training import teacher_cache as run_cache
from cot2align_jax.training.steps import hidden_states_needed

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


def _forward_fn(teacher_gd, layout: cache_lib.CacheLayout, request: str, mesh):
  """jit fn(teacher_params, ids, mask) -> tuple of the cached states [B, L, d] (storage dtype),
  rows split over the local devices."""
  dtype = cache_lib.DTYPES[layout.dtype]

  def fn(params, ids, mask):
    teacher = nnx.merge(teacher_gd, params)
    states = teacher(ids, mask, hidden_states=request, logits="none").hidden_states
    return tuple(states[i].astype(dtype) for i in layout.states)

  rows = NamedSharding(mesh, P("data"))
  jitted = jax.jit(fn, in_shardings=(None, rows, rows), out_shardings=rows)
  # host arrays placed explicitly: jit refuses numpy inputs with a sharding in multi-process jobs
  return lambda params, ids, mask: jitted(params, jax.device_put(ids, rows),
                                          jax.device_put(mask, rows))


def build_cache(config, out: Path, *, batch_size: int = 0, chunk_batches: int = 16,
                dtype: str = "bfloat16", progress: bool = True) -> dict:
  """Writes (or completes) the teacher cache of `config` in `out`; returns a summary
  {"out", "records", "chunks", "chunks_skipped", "bytes_written", "layout"}."""
  C.validate(config)
  kd_cfg = C.kd_config(config)
  method = C.method_of(kd_cfg)
  if not method.needs_teacher:
    raise C.ConfigError(f"{method.name} runs no teacher: there is nothing to cache")
  if chunk_batches < 1:
    raise C.ConfigError(f"--chunk_batches must be >= 1, got {chunk_batches}")
  mesh_lib.maybe_initialize_distributed()
  host, hosts = jax.process_index(), jax.process_count()
  problem = setup.build_problem(config, True, kd_cfg)
  teacher = problem.teacher
  layout = run_cache.run_layout(method, kd_cfg, teacher.config, dtype)
  fp = run_cache.fingerprint(config, problem.teacher_tok, teacher, teacher.config,
                             problem.train_records)
  pipe = C.pipeline_config(config)
  rows = batch_size or max(pipe.batch_size // hosts, 1)
  local = jax.local_devices()[:math.gcd(rows, jax.local_device_count())]  # rows split evenly
  if host == 0:
    cache_lib.write_manifest(out, layout, fp, process_count=hosts, batch_size=rows,
                             chunk_batches=chunk_batches)
  if hosts > 1:
    multihost_utils.sync_global_devices("teacher cache manifest")
  if host != 0:
    cache_lib.write_manifest(out, layout, fp, process_count=hosts, batch_size=rows,
                             chunk_batches=chunk_batches)  # checks the one host 0 wrote

  cfg = dataclasses.replace(pipe, batch_size=rows, shuffle=False, num_epochs=1,
                            drop_remainder=False, alignment=(), group_by_pair=0, worker_count=0)
  pipeline = Pipeline(problem.train_records, problem.student_tok, problem.teacher_tok, cfg)
  data_iter = iter(pipeline)
  n_batches = len(pipeline.records()) // rows + bool(len(pipeline.records()) % rows)
  skipped = cache_lib.done_chunks(out, host)
  start = min(skipped * chunk_batches, n_batches)
  data_iter.set_state({"next_index": start})

  local_mesh = mesh_lib.make_mesh(data=len(local), devices=local)
  teacher_gd, params = state_lib.split_params(teacher)
  params = jax.device_put(params, NamedSharding(local_mesh, P()))
  forward = _forward_fn(teacher_gd, layout, hidden_states_needed(method, kd_cfg), local_mesh)
  written, chunk, keys, entries = 0, skipped, [], []
  bar = tqdm(total=n_batches, initial=start, desc="teacher cache", unit="batch",
             disable=not progress or host != 0, dynamic_ncols=True, file=sys.stderr)
  for b in range(start, n_batches):
    batch = next(data_iter)
    states = {}
    for v in layout.views:
      if v == "pair" and not batch["has_pair"].any():
        states[v] = ()
        continue
      ids, mask = (batch[spec.key(v, "teacher", f)] for f in ("input_ids", "attention_mask"))
      states[v] = [np.asarray(s) for s in forward(params, ids, mask)]
    for r in np.flatnonzero(batch["example_id"] >= 0):
      keys.append(cache_lib.record_key(batch["example_id"][r], batch["has_pair"][r]))
      entries.append(cache_lib.encode_entry(cache_lib.entry_arrays(batch, states, layout, r)))
    if (b + 1) % chunk_batches == 0 or b + 1 == n_batches:
      written += cache_lib.write_chunk(out, host, chunk, keys, entries)
      chunk, keys, entries = chunk + 1, [], []
    bar.update(1)
  bar.close()
  n_chunks = max(chunk, skipped)
  n_local = sum(len(np.load(out / f"{cache_lib.chunk_name(host, c)}.keys.npy"))
                for c in range(n_chunks))
  cache_lib.mark_done(out, host, n_local, n_chunks)
  return {"out": str(out), "records": n_local, "chunks": n_chunks,
          "chunks_skipped": min(skipped, n_chunks), "bytes_written": written,
          "layout": layout.to_json()}


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
