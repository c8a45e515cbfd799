"""The run-side half of the teacher cache (the format is data/teacher_cache.py): what a run's
cache must hold, its fingerprint, and opening it for the training loop."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from cot2align_jax.core.numerics import F32
from cot2align_jax.data import teacher_cache as cache_lib
from cot2align_jax.losses.methods import KDConfig, Method
from cot2align_jax.training import config as C
from cot2align_jax.training.steps import teacher_cache_layout

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
