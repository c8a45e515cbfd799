"""The run-side half of the teacher cache (the format is data/teacher_cache.py): what a run's
cache must hold, its fingerprint, building it (`build_cache`, the cache_teacher command) and
opening it for the training loop."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from cot2align_jax.core import spec
from cot2align_jax.core.numerics import F32
from cot2align_jax.data import teacher_cache as cache_lib
from cot2align_jax.data.pipeline import Pipeline
from cot2align_jax.losses.methods import KDConfig, Method
from cot2align_jax.training import config as C
from cot2align_jax.training import mesh as mesh_lib
from cot2align_jax.training import setup
from cot2align_jax.training import state as state_lib
from cot2align_jax.training.steps import hidden_states_needed, teacher_cache_layout

# the teacher settings the cached states depend on (the path is left out: the same weights sit
# under other paths on other machines; the parameter statistics identify them)
TEACHER_KEYS = ("tiny", "dtype", "param_dtype", "init", "valid_vocab_size")
TOKENIZATION_KEYS = ("max_len", "max_prompt", "special_tokens")


@jax.jit
def _leaf_stats(leaves: Sequence[jax.Array]) -> jax.Array:
  """[n_leaves, 2] float32: Σx² and Σ|x| of each parameter (positive, so rounding-stable)."""
  return jnp.stack([jnp.stack([jnp.sum(jnp.square(x.astype(F32))), jnp.sum(jnp.abs(
      x.astype(F32)))]) for x in leaves])


def param_stats(params: Any) -> list[tuple[float, float]]:
  """Per-parameter (Σx², Σ|x|) of a parameter tree (an nnx.State or module), leaf order."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  leaves = jax.tree.leaves(params)
  stats = np.asarray(jax.device_get(_leaf_stats(leaves)), np.float64)
  return [(float(a), float(b)) for a, b in stats]


def tokenizer_digest(tok) -> str:
  """The tokenizer's size and a SHA-256 of its vocabulary (paths differ across machines)."""
  vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  h = hashlib.sha256("\x00".join(f"{t}\x01{i}" for t, i in vocab).encode("utf-8",
                                                                        "surrogatepass"))
  return f"{len(tok)}:{h.hexdigest()[:16]}"


def fingerprint(config: ml_collections.ConfigDict, teacher_tok, teacher_params: Any,
                teacher_config: Any, records: Sequence[Any]) -> cache_lib.Fingerprint:
  """What the cached states of this config's teacher over `records` depend on."""
  t = C.model_spec(config, "teacher")
  pipe = C.pipeline_config(config)
  settings = {k: getattr(t, k) for k in TEACHER_KEYS}
  settings.update(hidden_size=int(teacher_config.hidden_size),
                  num_layers=int(teacher_config.num_layers),
                  vocab_size=int(teacher_config.vocab_size))
  return cache_lib.Fingerprint(
      teacher=settings, params=param_stats(teacher_params), tokenizer=tokenizer_digest(
          teacher_tok), records=cache_lib.records_digest(records), n_records=len(records),
      tokenization={k: getattr(pipe, k) for k in TOKENIZATION_KEYS})


def run_layout(method: Method, kd_cfg: KDConfig, teacher_config: Any,
               dtype: str = "bfloat16") -> cache_lib.CacheLayout:
  """The cache layout a run of `method` reads (training/steps.py teacher_cache_layout)."""
  return teacher_cache_layout(method, kd_cfg, int(teacher_config.num_layers),
                              int(teacher_config.hidden_size), dtype)


def open_for_run(config: ml_collections.ConfigDict, method: Method, kd_cfg: KDConfig,
                 teacher_tok, teacher: nnx.Module, records: Sequence[Any]
                 ) -> tuple[cache_lib.TeacherCache, cache_lib.CacheLayout] | tuple[None, None]:
  """(the opened and checked cache, the layout the step reads) when teacher.cache is set, else
  (None, None). CacheError / ConfigError (one line) when it cannot serve this run."""
  path = C.model_spec(config, "teacher").cache
  if not path:
    return None, None
  if not method.needs_teacher or teacher is None:
    raise C.ConfigError(f"teacher.cache is set but {method.name} runs no teacher")
  cache = cache_lib.TeacherCache.open(path)
  layout = run_layout(method, kd_cfg, teacher.config, cache.layout.dtype)
  cache.check(fingerprint(config, teacher_tok, teacher, teacher.config, records), layout)
  return cache, layout


# --------------------------------------------------------------------------------------------
# Building (python -m cot2align_jax.cache_teacher)
# --------------------------------------------------------------------------------------------


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
  layout = run_layout(method, kd_cfg, teacher.config, dtype)
  fp = fingerprint(config, problem.teacher_tok, teacher, teacher.config,
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
