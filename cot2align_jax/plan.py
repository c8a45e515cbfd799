r"""Memory planner: compile the train step ahead of time from the models' config.json alone and
say, per device, what it needs and on which accelerators it fits (docs/memory.md).

    python -m cot2align_jax.plan --config=configs/tiny.py:cot2align --devices=2
    python -m cot2align_jax.plan --config=configs/paper/llama2_to_tinyllama.py --devices=8 \
        --mesh.fsdp=8 --json=/tmp/plan.json
    python -m cot2align_jax.plan --config=configs/real/gemma3_to_smollm2.py:full \
        --config.data.batch_size=8 --levers=compile

No weight is read: the student, the teacher and the projectors are built under
`nnx.eval_shape`, the optimizer state under `jax.eval_shape`, the batch is one of
`data.batch_size` rows at the largest bucket (`data.buckets`), and the jitted train step of
training/steps.py is lowered and compiled for them on `--devices` fake CPU devices (the mesh of
`mesh.*`, overridable with `--mesh.data/fsdp/tensor` or `--config.mesh.*`). Models come from a
local checkpoint's config.json, a GGUF header (`gguf:<name>`), the tiny spec, or, for the
paper settings' Hub ids, `configs/paper/architectures.json`.

Printed per device: student parameters (trainable and frozen), projectors, optimizer state,
teacher parameters, batch (computed from the abstract shapes and their shardings), and from
XLA's memory analysis of the compiled program its arguments, non-aliased outputs and
temporaries; the peak estimate is arguments + outputs − aliased (donated) + temporaries. Then
whether that fits each accelerator in ACCELERATORS (with `--margin`, the usable fraction of its
memory), and the levers that would lower it (mesh.fsdp, mesh.tensor, optim.accumulate,
student.remat, kd.vocab_chunk, a teacher cache), ranked by the bytes they would save:
estimated from the breakdown (`--levers=estimate`, the default) or each compiled again
(`--levers=compile`).

The CPU compiler's buffer assignment is not an accelerator's: the figures are a plan, not a
measurement on TPU/GPU (docs/memory.md says how close they came where checked). A bad config,
flag or mesh prints one line "error: ..." and exits 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding

from cot2align_jax.core import cli, spec
from cot2align_jax.core.paths import PROJECT_ROOT
from cot2align_jax.data.records import DataError
from cot2align_jax.losses.methods import build_projectors
from cot2align_jax.models import hf
from cot2align_jax.models.config import ModelConfig, ModelError
from cot2align_jax.training import cli_flags
from cot2align_jax.training import config as C
from cot2align_jax.training import mesh as mesh_lib
from cot2align_jax.training import setup
from cot2align_jax.training import state as state_lib
from cot2align_jax.training import steps as steps_lib

GiB = 2 ** 30
MiB = 2 ** 20
ARCHITECTURES_FILE = PROJECT_ROOT / "configs" / "paper" / "architectures.json"

# Memory per chip in bytes: TPUs from Google's system pages, GPUs as nvidia-smi reports them.
ACCELERATORS: tuple[tuple[str, int], ...] = (
    ("TPU v5e", 16 * GiB),
    ("TPU v4", 32 * GiB),
    ("TPU v6e", 32 * GiB),
    ("A100 40GB", 40960 * MiB),
    ("H100 80GB", 81559 * MiB),
    ("A100 80GB", 81920 * MiB),
    ("TPU v5p", 95 * GiB),
    ("H200 141GB", 143771 * MiB),
)
DEFAULT_MARGIN = 0.9   # usable fraction of a chip's memory (runtime, fragmentation)
# The planner never runs its programs: LLVM's optimisation level changes code, not XLA's
# buffer assignment (equal temp bytes at levels 0 and 2 on the tiny step), and level 0 compiles
# about twice as fast on CPU.
PLAN_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
ACCUMULATE_CHOICES = (2, 4, 8, 16, 32)
FSDP_DEVICES = 8        # a one-device plan's fsdp lever: this many devices
VOCAB_CHUNK = 8192      # kd.vocab_chunk the lever tries
LEVER_MODES = ("estimate", "compile")
_DEVICES_ENV = "COT2ALIGN_PLAN_DEVICES"   # set on the re-executed command (once)

# Bad input: one line on stderr, exit 2.
INPUT_ERRORS = (C.ConfigError, ModelError, DataError, FileNotFoundError, cli.UsageError)


# --------------------------------------------------------------------------------------------
# Models without weights
# --------------------------------------------------------------------------------------------


def architectures(path: Path = ARCHITECTURES_FILE) -> dict[str, dict[str, Any]]:
  """{Hub id: config.json dict} of the paper settings' models (configs/paper/architectures.json;
  keys starting with "_" are comments)."""
  table = json.loads(Path(path).read_text())
  return {k: v for k, v in table.items() if not k.startswith("_")}


def config_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every dotted key of a ConfigDict (sections walked), e.g. ["kd.method", "kd.ot.cost"]."""
  out = []
  for k, v in cfg.items():
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out += config_keys(ml_collections.ConfigDict(v) if isinstance(v, dict) else v,
                         f"{prefix}{k}.")
    else:
      out.append(f"{prefix}{k}")
  return out


def has_vocab_chunk() -> bool:
  """Whether this version's KDConfig has the `kd.vocab_chunk` key (vocabulary-chunked losses)."""
  return "vocab_chunk" in C.defaults().kd


# --------------------------------------------------------------------------------------------
# The abstract problem
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Abstract:
  """Everything the step needs, as shapes: configs, graphdefs, abstract state / teacher / batch
  (leaves jax.ShapeDtypeStruct) and their shardings on `mesh`."""
  config: ml_collections.ConfigDict
  method: Any
  kd_cfg: Any
  opt_cfg: state_lib.OptimConfig
  student_cfg: ModelConfig
  teacher_cfg: ModelConfig | None
  optimizer: Any
  mesh: Any
  state: Any
  graphdefs: tuple[Any, Any, Any]       # student, teacher, projectors
  teacher_params: Any
  batch: dict[str, jax.ShapeDtypeStruct]
  state_shardings: Any
  teacher_shardings: Any
  batch_shardings: dict[str, NamedSharding]
  vocab_map: np.ndarray | None
  seq_len: int
  memory: dict[str, int] | None = None   # compiled_memory of the step, once compiled
  cache_layout: Any = None               # the teacher-cache layout the step reads, or None


def abstract_batch(batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch contract (core/spec.py) as shapes: [B, L] int32 per sequence and alignment
  field (both sides at the same bucket L), has_pair [B] bool, example_id [B] int32."""
  out = {}
  for k in spec.all_keys():
    if k == "has_pair":
      out[k] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_)
    elif k == "example_id":
      out[k] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    else:
      out[k] = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  return out


def check_batch(batch_size: int, accumulate: int, mesh) -> None:
  """ConfigError unless the global batch splits into `accumulate` micro-batches and its rows
  over the mesh's data axes (the loop's rule)."""
  data_devices = int(mesh.shape["data"] * mesh.shape["fsdp"])
  if batch_size % max(accumulate, 1):
    raise C.ConfigError(f"data.batch_size {batch_size} is not divisible by optim.accumulate "
                        f"{accumulate}")
  if batch_size % data_devices:
    raise C.ConfigError(f"data.batch_size {batch_size} does not split over the {data_devices} "
                        "devices of mesh.data x mesh.fsdp")


def make_plan_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]):
  """The config's (data, fsdp, tensor) mesh over `devices` (ConfigError if it does not fit)."""
  sizes = dataclasses.asdict(C.mesh_config(config))
  try:
    return mesh_lib.make_mesh(**sizes, devices=list(devices))
  except ValueError as e:
    raise C.ConfigError(f"mesh: {e} (--devices sets the number of fake devices)") from None


def truncated(cfg: ModelConfig, num_layers: int) -> ModelConfig:
  """The same architecture with its first `num_layers` layers (for measuring what the loss adds
  on top of the models: bench/memory.py)."""
  return cfg.replace(num_layers=num_layers, layer_types=cfg.layer_types[:num_layers])


def build_abstract(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], *,
                   table: Mapping[str, Mapping[str, Any]] | None = None,
                   num_layers: int | None = None) -> Abstract:
  """The abstract training problem of `config` on a mesh over `devices` (see the module doc).
  `table`: {Hub id: config.json} for models without local files (default: architectures()).
  `num_layers`: both models cut to that many layers (`truncated`)."""
  C.validate(config)
  table = architectures() if table is None else table
  kd_cfg = C.kd_config(config)
  method = C.method_of(kd_cfg)
  pipe = C.pipeline_config(config)
  opt_cfg = C.optim_config(config, derived_steps=1000)
  seed = C.train_config(config).seed
  s_cfg = setup.abstract_model_config(config, "student", table)
  t_cfg = setup.abstract_model_config(config, "teacher", table) if method.needs_teacher else None
  if num_layers is not None:
    s_cfg = truncated(s_cfg, num_layers)
    t_cfg = truncated(t_cfg, num_layers) if t_cfg is not None else None
  if method.same_vocab and t_cfg is not None and t_cfg.vocab_size != s_cfg.vocab_size:
    setup.check_vocabularies(kd_cfg, range(s_cfg.vocab_size), range(t_cfg.vocab_size))
  mesh = make_plan_mesh(config, devices)
  check_batch(pipe.batch_size, opt_cfg.accumulate, mesh)
  d_t = t_cfg.hidden_size if t_cfg is not None else s_cfg.hidden_size
  optimizer = state_lib.make_optimizer(opt_cfg)
  state, (student_gd, proj_gd) = state_lib.abstract_state(
      lambda: hf.create_model(s_cfg, seed),
      lambda: build_projectors(method, s_cfg.hidden_size, d_t, rngs=nnx.Rngs(seed), kd=kd_cfg),
      opt_cfg, seed, optimizer=optimizer)
  if t_cfg is not None:
    teacher_gd, teacher_params = state_lib.abstract_params(lambda: hf.create_model(t_cfg, seed))
  else:
    teacher_gd, teacher_params = None, nnx.State({})
  s_shard = mesh_lib.state_shardings(state, mesh)
  if C.model_spec(config, "teacher").sharding == "replicated":
    t_shard = jax.tree.map(lambda _: mesh_lib.replicated(mesh), teacher_params)
  else:
    t_shard = mesh_lib.state_shardings(teacher_params, mesh)
  seq_len = max(int(b) for b in pipe.buckets)
  batch = abstract_batch(pipe.batch_size, seq_len)
  cache_layout = None
  if C.model_spec(config, "teacher").cache and t_cfg is not None:
    # the batch carries the teacher's states (bfloat16, the cache's default) instead
    cache_layout = steps_lib.teacher_cache_layout(method, kd_cfg, t_cfg.num_layers,
                                                  t_cfg.hidden_size)
    for k, (d, dtype) in cache_layout.fields().items():
      batch[k] = jax.ShapeDtypeStruct((pipe.batch_size, seq_len, d), dtype)
  vocab_map = (np.zeros((t_cfg.vocab_size,), np.int32)
               if method.needs_vocab_map and t_cfg is not None else None)
  return Abstract(config, method, kd_cfg, opt_cfg, s_cfg, t_cfg, optimizer, mesh, state,
                  (student_gd, teacher_gd, proj_gd), teacher_params, batch, s_shard, t_shard,
                  mesh_lib.batch_shardings(batch, mesh), vocab_map, seq_len,
                  cache_layout=cache_layout)


def train_step(problem: Abstract, *, compiler_options: Mapping[str, Any] | None = None):
  """The loop's jitted train step (training/steps.py) for the abstract problem."""
  s_gd, t_gd, p_gd = problem.graphdefs
  return steps_lib.make_train_step(
      s_gd, t_gd, p_gd, problem.method, problem.kd_cfg, problem.optimizer, mesh=problem.mesh,
      state_shardings=problem.state_shardings, teacher_shardings=problem.teacher_shardings,
      batch_shardings=problem.batch_shardings, vocab_map=problem.vocab_map,
      accumulate=problem.opt_cfg.accumulate, teacher_cache=problem.cache_layout,
      compiler_options=dict(compiler_options) if compiler_options is not None else None)


def compile_step(problem: Abstract, *, compiler_options: Mapping[str, Any] | None = None):
  """The train step lowered for the abstract arguments and compiled (nothing is run)."""
  options = PLAN_COMPILER_OPTIONS if compiler_options is None else compiler_options
  step = train_step(problem, compiler_options=options)
  return step.lower(problem.state, problem.teacher_params, problem.batch).compile()


# --------------------------------------------------------------------------------------------
# Per-device bytes
# --------------------------------------------------------------------------------------------


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def shard_bytes(shape: Sequence[int], dtype, sharding) -> int:
  """Bytes of one device's shard of an array (the largest shard: uneven splits round up)."""
  local = sharding.shard_shape(tuple(shape)) if sharding is not None else tuple(shape)
  return int(np.prod(local, dtype=np.int64)) * jnp.dtype(dtype).itemsize


def tree_device_bytes(tree, shardings) -> int:
  """Per-device bytes of a tree of arrays / ShapeDtypeStructs with a matching tree of
  shardings (nnx Variables unwrapped on both sides)."""
  leaves = jax.tree.leaves(tree)
  shards = jax.tree.leaves(shardings)
  if len(leaves) != len(shards):
    raise ValueError(f"{len(leaves)} leaves but {len(shards)} shardings")
  return sum(shard_bytes(x.shape, x.dtype, s) for x, s in zip(leaves, shards))


def _trainable_split(params, shardings) -> tuple[int, int]:
  """(trainable, frozen) per-device bytes of the student's params: with LoRA factors in the
  student only they train (training/state.py)."""
  labels = state_lib._labels({"student": params})["student"]   # pylint: disable=protected-access
  frozen = trainable = 0
  for lab, x, s in zip(jax.tree.leaves(labels), jax.tree.leaves(params),
                       jax.tree.leaves(shardings)):
    n = shard_bytes(x.shape, x.dtype, s)
    if lab == state_lib.FROZEN:
      frozen += n
    else:
      trainable += n
  return trainable, frozen


def breakdown(problem: Abstract) -> dict[str, int]:
  """Per-device bytes of what the step holds as arguments, from the abstract shapes and their
  shardings: student_trainable, student_frozen, projectors, optimizer, teacher, batch, other
  (step counter, rng), and `arguments` (their sum)."""
  st, sh = problem.state, problem.state_shardings
  trainable, frozen = _trainable_split(st.params, sh.params)
  out = {
      "student_trainable": trainable,
      "student_frozen": frozen,
      "projectors": tree_device_bytes(st.proj, sh.proj),
      "optimizer": tree_device_bytes(st.opt_state, sh.opt_state),
      "teacher": tree_device_bytes(problem.teacher_params, problem.teacher_shardings),
      "batch": sum(shard_bytes(x.shape, x.dtype, problem.batch_shardings[k])
                   for k, x in problem.batch.items()),
      "other": (tree_device_bytes(st.step, sh.step) + tree_device_bytes(st.rng, sh.rng)),
  }
  out["arguments"] = sum(out.values())
  return out


def compiled_memory(compiled) -> dict[str, int]:
  """XLA's memory analysis of a compiled program, per device: argument, output, alias
  (outputs sharing a donated argument's buffer), temp and generated-code bytes."""
  ma = compiled.memory_analysis()
  return {"argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
          "alias": int(ma.alias_size_in_bytes), "temp": int(ma.temp_size_in_bytes),
          "code": int(ma.generated_code_size_in_bytes)}


def peak_bytes(arguments: int, mem: Mapping[str, int]) -> int:
  """Per-device peak estimate: what is on the device when the step starts (`arguments`: state,
  teacher and the whole batch; jit drops the arguments the program does not read, e.g. the pair
  view for SFT, from XLA's own count, but the loop has put them on the device) + outputs not
  written into a donated buffer + XLA's temporaries (all live at once: an upper bound)."""
  return max(arguments, mem["argument"]) + mem["output"] - mem["alias"] + mem["temp"]


def step_memory(problem: Abstract) -> dict[str, int]:
  """compiled_memory of the problem's step plus "peak" (`peak_bytes` with the breakdown's
  arguments); compiled once per Abstract (kept in .memory)."""
  if problem.memory is None:
    mem = compiled_memory(compile_step(problem))
    mem["peak"] = peak_bytes(breakdown(problem)["arguments"], mem)
    problem.memory = mem
  return problem.memory


# --------------------------------------------------------------------------------------------
# Fits and levers
# --------------------------------------------------------------------------------------------


def fits(peak: int, margin: float = DEFAULT_MARGIN,
         accelerators: Sequence[tuple[str, int]] = ACCELERATORS) -> list[dict[str, Any]]:
  """Per accelerator: {"name", "memory", "usable" (= margin × memory), "fits", "headroom"
  (usable − peak, bytes; negative = short)}."""
  rows = []
  for name, mem in accelerators:
    usable = int(mem * margin)
    rows.append({"name": name, "memory": int(mem), "usable": usable, "fits": peak <= usable,
                 "headroom": usable - peak})
  return rows


class _MeshShape:
  """A stand-in with the `shape` mapping of a mesh, for shard sizes on meshes this process has
  no devices for (mesh_lib.logical_spec reads only `mesh.shape`)."""

  def __init__(self, data: int, fsdp: int, tensor: int):
    self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor}


def _split_factor(pspec, mesh_shape: Mapping[str, int]) -> list[int]:
  out = []
  for entry in pspec:
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    out.append(int(np.prod([mesh_shape[a] for a in names])) if names else 1)
  return out


def _vars_bytes(tree, mesh_shape: _MeshShape, replicate: bool = False) -> int:
  """Per-device bytes of a tree of nnx Variables (ShapeDtypeStruct values) on a mesh of the
  given sizes, by the logical rules (mesh_lib.logical_spec); leaves without logical axes and
  everything when `replicate` are whole on every device."""
  total = 0
  for v in jax.tree.leaves(tree, is_leaf=_is_var):
    value = v.get_value() if _is_var(v) else v
    if not hasattr(value, "shape"):   # optax's MaskedNode (no moments for masked leaves)
      continue
    shape = tuple(value.shape)
    axes = None if replicate or not _is_var(v) else mesh_lib._var_axes(v)  # pylint: disable=protected-access
    pspec = mesh_lib.logical_spec(axes, mesh_shape, shape=shape)
    local = [-(-d // f) for d, f in zip(shape, _split_factor(pspec, mesh_shape.shape)
                                        + [1] * (len(shape) - len(pspec)))]
    total += int(np.prod(local, dtype=np.int64)) * jnp.dtype(value.dtype).itemsize
  return total


def persistent_bytes(problem: Abstract, data: int, fsdp: int, tensor: int) -> dict[str, int]:
  """Per-device bytes of student params, projectors, optimizer state, teacher and batch on a
  (data, fsdp, tensor) mesh (any sizes: no devices needed)."""
  m = _MeshShape(data, fsdp, tensor)
  replicate_teacher = C.model_spec(problem.config, "teacher").sharding == "replicated"
  rows = -(-problem.batch["has_pair"].shape[0] // (data * fsdp))
  batch = sum(rows * int(np.prod(x.shape[1:], dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
              for x in problem.batch.values())
  return {"student": _vars_bytes(problem.state.params, m),
          "projectors": _vars_bytes(problem.state.proj, m),
          "optimizer": _vars_bytes(problem.state.opt_state, m),
          "teacher": _vars_bytes(problem.teacher_params, m, replicate_teacher),
          "batch": batch}


CACHE_FLAG = "--config.teacher.cache=DIR (python -m cot2align_jax.cache_teacher)"
CACHE_NOTE = ("no teacher forward in the step (its temporaries and time); the teacher's "
              "parameters stay for its embedding and head; the batch carries its states")


@dataclasses.dataclass
class Lever:
  """One change that would lower the per-device peak."""
  name: str               # "fsdp", "tensor", "accumulate", "remat", "vocab_chunk", "teacher_cache"
  change: str             # the override, e.g. "--mesh.data=1 --mesh.fsdp=8"
  peak: int | None        # per-device peak with it (bytes), None = not known
  how: str                # "estimate", "compiled", or why not available
  note: str = ""

  def saving(self, base_peak: int) -> int:
    return base_peak - self.peak if self.peak is not None else 0


def _mesh_sizes(problem: Abstract) -> tuple[int, int, int]:
  return tuple(int(problem.mesh.shape[a]) for a in mesh_lib.MESH_AXES)


def estimate_levers(problem: Abstract, parts: Mapping[str, int],
                    mem: Mapping[str, int]) -> list[Lever]:
  """Levers estimated from the breakdown (no compile): mesh moves by exact shard sizes with
  the temporaries unchanged; accumulate k: temporaries ≈ (temp − G)/k + 2G (G = the gradient's
  bytes, kept and summed over micro-batches); a teacher cache is left to `--levers=compile`
  (it removes the teacher's forward, not its parameters).
  remat and vocab_chunk are left to `--levers=compile`."""
  data, fsdp, tensor = _mesh_sizes(problem)
  peak, temp = mem["peak"], mem["temp"]
  now = persistent_bytes(problem, data, fsdp, tensor)
  out = []

  def moved(name, sizes, flag):
    new = persistent_bytes(problem, *sizes)
    delta = sum(now.values()) - sum(new.values())
    out.append(Lever(name, flag, peak - delta, "estimate",
                     "params, optimizer and teacher re-sharded; temporaries taken unchanged"))

  rows = problem.batch["has_pair"].shape[0]
  grads = parts["student_trainable"] + parts["projectors"]
  if data > 1:
    moved("fsdp", (1, fsdp * data, tensor), f"--mesh.data=1 --mesh.fsdp={fsdp * data}")
    moved("tensor", (1, fsdp, tensor * data), f"--mesh.data=1 --mesh.tensor={tensor * data}")
  elif rows % (FSDP_DEVICES * fsdp) == 0:
    # more devices: the global batch splits further too (activations scale with the rows)
    n = FSDP_DEVICES * fsdp
    new = persistent_bytes(problem, 1, n, tensor)
    new_temp = max(temp - grads, 0) * fsdp / n + grads * fsdp / n
    out.append(Lever("fsdp", f"--devices={n * tensor} --mesh.fsdp={n}",
                     int(sum(new.values()) + mem["output"] - mem["alias"] + new_temp),
                     "estimate", f"{n} devices: params, optimizer, teacher and rows split "
                     f"{n // fsdp} ways more; temporaries scaled with the rows"))
  k_now = problem.opt_cfg.accumulate
  for k in ACCUMULATE_CHOICES:
    total = k * k_now
    if rows % total or rows // total < data * fsdp:
      continue
    new_temp = max(temp - grads, 0) / k + 2 * grads
    if new_temp < temp:
      out.append(Lever("accumulate", f"--config.optim.accumulate={total}",
                       int(peak - temp + new_temp), "estimate",
                       f"{total} micro-batches of {rows // total} rows"))
  if parts["teacher"] and problem.cache_layout is None:
    out.append(Lever("teacher_cache", CACHE_FLAG, None, "compile it (--levers=compile)",
                     CACHE_NOTE))
  return out


def _overridden(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]):
  cfg = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    C.set_key(cfg, key, value)
  return cfg


def compiled_levers(problem: Abstract, devices: Sequence[jax.Device],
                    table: Mapping[str, Mapping[str, Any]] | None = None,
                    log=lambda *_: None) -> list[Lever]:
  """Each applicable lever compiled again: the mesh moves (when mesh.data > 1), the smallest
  optim.accumulate that divides the batch, student.remat, kd.vocab_chunk (when this version has
  it); plus the teacher cache as estimated (not compilable here)."""
  data, fsdp, tensor = _mesh_sizes(problem)
  tries: list[tuple[str, dict, str]] = []
  if data > 1:
    tries.append(("fsdp", {"mesh.data": 1, "mesh.fsdp": fsdp * data},
                  f"--mesh.data=1 --mesh.fsdp={fsdp * data}"))
    tries.append(("tensor", {"mesh.data": 1, "mesh.tensor": tensor * data},
                  f"--mesh.data=1 --mesh.tensor={tensor * data}"))
  b = problem.batch["has_pair"].shape[0]
  k_now = problem.opt_cfg.accumulate
  for k in ACCUMULATE_CHOICES:
    if b % (k * k_now) == 0 and b // (k * k_now) >= data * fsdp:
      tries.append(("accumulate", {"optim.accumulate": k * k_now},
                    f"--config.optim.accumulate={k * k_now}"))
      break
  if not problem.student_cfg.remat:
    tries.append(("remat", {"student.remat": True}, "--config.student.remat=True"))
  out: list[Lever] = []
  if has_vocab_chunk():
    if not problem.config.kd.get("vocab_chunk", 0):
      tries.append(("vocab_chunk", {"kd.vocab_chunk": VOCAB_CHUNK},
                    f"--config.kd.vocab_chunk={VOCAB_CHUNK}"))
  else:
    out.append(Lever("vocab_chunk", "-", None, "not available",
                     "this version's KDConfig has no kd.vocab_chunk"))
  if problem.teacher_cfg is not None and problem.cache_layout is None:
    tries.append(("teacher_cache", {"teacher.cache": "planned"}, CACHE_FLAG))
  for name, overrides, flag in tries:
    log(f"compiling with {flag} ...")
    try:
      other = build_abstract(_overridden(problem.config, overrides), devices, table=table)
      out.append(Lever(name, flag, step_memory(other)["peak"], "compiled",
                       CACHE_NOTE if name == "teacher_cache" else ""))
    except (C.ConfigError, ValueError) as e:
      out.append(Lever(name, flag, None, "not possible", cli.one_line(e)))
  return out


def rank_levers(levers: Sequence[Lever], base_peak: int) -> list[Lever]:
  """Known savings first, largest first; then the ones without a figure."""
  known = sorted((lv for lv in levers if lv.peak is not None), key=lambda lv: lv.peak)
  return known + [lv for lv in levers if lv.peak is None]


def fixing_lever(levers: Sequence[Lever], usable: int) -> Lever | None:
  """The smallest change that brings the peak under `usable`: of the levers that do, the one
  with the largest resulting peak (e.g. the fewest micro-batches); None if none does."""
  ok = [lv for lv in levers if lv.peak is not None and lv.peak <= usable]
  return max(ok, key=lambda lv: lv.peak) if ok else None


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def plan(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], *,
         levers: str = "estimate", margin: float = DEFAULT_MARGIN,
         table: Mapping[str, Mapping[str, Any]] | None = None, log=lambda *_: None
         ) -> dict[str, Any]:
  """The whole plan of `config` on `devices` as a JSON-able dict: setting, per-device
  breakdown, XLA memory, fits per accelerator and the ranked levers (see the module doc)."""
  if levers not in LEVER_MODES:
    raise cli.UsageError(f"--levers must be one of {', '.join(LEVER_MODES)}, got {levers!r}")
  if not 0 < margin <= 1:
    raise cli.UsageError(f"--margin must be in (0, 1], got {margin}")
  problem = build_abstract(config, devices, table=table)
  parts = breakdown(problem)
  log("compiling the train step ...")
  mem = step_memory(problem)
  found = (compiled_levers(problem, devices, table, log) if levers == "compile"
           else estimate_levers(problem, parts, mem))
  ranked = rank_levers(found, mem["peak"])
  fit_rows = fits(mem["peak"], margin)
  for row in fit_rows:
    lever = None if row["fits"] else fixing_lever(ranked, row["usable"])
    row["lever"] = lever.change if lever is not None else None
  s, t = problem.student_cfg, problem.teacher_cfg
  data, fsdp, tensor = _mesh_sizes(problem)
  return {
      "setting": {
          "method": problem.method.name, "devices": len(problem.mesh.devices.flat),
          "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
          "batch": problem.batch["has_pair"].shape[0], "seq_len": problem.seq_len,
          "accumulate": problem.opt_cfg.accumulate,
          "student": _model_summary(s, C.model_spec(config, "student").path or "tiny"),
          "teacher": (_model_summary(t, C.model_spec(config, "teacher").path or "tiny")
                      if t is not None else None),
          "vocab_chunk": problem.config.kd.get("vocab_chunk") if has_vocab_chunk() else None,
      },
      "per_device": parts,
      "xla": mem,
      "peak": mem["peak"],
      "margin": margin,
      "fits": fit_rows,
      "levers": [dataclasses.asdict(lv) | {"saving": lv.saving(mem["peak"])} for lv in ranked],
      "lever_mode": levers,
  }


def _n_params(cfg: ModelConfig) -> int:
  abstract = nnx.eval_shape(lambda: hf.create_model(cfg.replace(lora_rank=0, lora_targets=())))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _model_summary(cfg: ModelConfig, name: str) -> dict[str, Any]:
  return {"name": name, "params": _n_params(cfg), "layers": cfg.num_layers,
          "hidden": cfg.hidden_size, "vocab": cfg.vocab_size, "param_dtype": cfg.param_dtype,
          "dtype": cfg.dtype, "remat": cfg.remat, "lora_rank": cfg.lora_rank}


def fmt_bytes(n: int | float | None) -> str:
  """Bytes as B / KiB / MiB / GiB with 3 significant figures."""
  if n is None:
    return "-"
  sign, n = ("-" if n < 0 else ""), abs(float(n))
  for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
    if n >= size:
      return f"{sign}{n / size:.3g} {unit}"
  return f"{sign}{int(n)} B"


def format_plan(p: Mapping[str, Any]) -> str:
  """The plan as the text the command prints."""
  s = p["setting"]
  lines = []

  def model_line(role, m):
    if m is None:
      return f"{role:8s} none"
    lora = f", LoRA r{m['lora_rank']}" if m["lora_rank"] else ""
    count = (f"{m['params'] / 1e6:.1f}M" if m["params"] >= 1e6 else f"{m['params'] / 1e3:.1f}K")
    return (f"{role:8s} {m['name']}: {count} params, {m['layers']} layers, "
            f"d {m['hidden']}, vocab {m['vocab']}, stored {m['param_dtype']}, compute "
            f"{m['dtype']}{', remat' if m['remat'] else ''}{lora}")

  mesh = s["mesh"]
  lines.append(f"method   {s['method']}; batch {s['batch']} x {s['seq_len']}, accumulate "
               f"{s['accumulate']}; {s['devices']} device(s), mesh data={mesh['data']} "
               f"fsdp={mesh['fsdp']} tensor={mesh['tensor']}"
               + ("" if s["vocab_chunk"] is None else f"; kd.vocab_chunk={s['vocab_chunk']}"))
  lines.append(model_line("student", s["student"]))
  lines.append(model_line("teacher", s["teacher"]))
  d, x = p["per_device"], p["xla"]
  lines.append("")
  lines.append("per device")
  rows = [("student params (trainable)", d["student_trainable"]),
          ("student params (frozen)", d["student_frozen"]),
          ("projectors", d["projectors"]),
          ("optimizer state", d["optimizer"]),
          ("teacher params", d["teacher"]),
          ("batch", d["batch"] + d["other"]),
          ("= arguments", d["arguments"]),
          ("XLA arguments (read)", x["argument"]),
          ("XLA outputs - donated", x["output"] - x["alias"]),
          ("XLA temporaries", x["temp"]),
          ("peak estimate", x["peak"])]
  for name, n in rows:
    lines.append(f"  {name:28s} {fmt_bytes(n):>11s}")
  lines.append("")
  lines.append(f"fits (usable = {p['margin']:.0%} of memory)")
  for r in p["fits"]:
    verdict = "yes" if r["fits"] else f"no, {fmt_bytes(-r['headroom'])} short"
    fix = f"; fits with {r['lever']}" if r["lever"] else ""
    lines.append(f"  {r['name']:12s} {fmt_bytes(r['memory']):>9s}  {verdict}{fix}")
  lines.append("")
  lines.append(f"levers ({p['lever_mode']}), largest saving first")
  accumulate = [lv for lv in p["levers"] if lv["name"] == "accumulate" and lv["peak"]]
  shown = False
  for lv in p["levers"]:
    if lv in accumulate:   # one line for every micro-batch count tried
      if not shown:
        ks = ", ".join(f"{a['change'].rsplit('=', 1)[1]}: {fmt_bytes(a['peak'])}"
                       for a in sorted(accumulate, key=lambda a: -a["peak"]))
        lines.append(f"  {'accumulate':13s} --config.optim.accumulate=k: peak by k {ks} "
                     f"[{lv['how']}]")
        shown = True
      continue
    if lv["peak"] is None:
      lines.append(f"  {lv['name']:13s} {lv['how']}: {lv['note'] or lv['change']}")
    else:
      note = f"  ({lv['note']})" if lv["note"] else ""
      lines.append(f"  {lv['name']:13s} {lv['change']}: peak {fmt_bytes(lv['peak'])}, saves "
                   f"{fmt_bytes(lv['saving'])} [{lv['how']}]{note}")
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


_CONFIG = cli.define_config_flag("Experiment config file (configs/*.py), optionally with :arg.")
_DEVICES = cli.define_once(flags.DEFINE_integer, "devices", None,
                           "fake CPU devices to plan on (default: the product of the fixed "
                           "mesh sizes, at least 1)")
_MESH = {axis: cli.define_once(flags.DEFINE_integer, f"mesh.{axis}", None,
                               f"mesh.{axis} (overrides the config's)")
         for axis in mesh_lib.MESH_AXES}
_LEVERS = cli.define_once(flags.DEFINE_enum, "levers", "estimate", list(LEVER_MODES),
                          "estimate the levers from the breakdown, or compile each")
_MARGIN = cli.define_once(flags.DEFINE_float, "margin", DEFAULT_MARGIN,
                          "usable fraction of an accelerator's memory")
_JSON = cli.define_once(flags.DEFINE_string, "json", None, "also write the plan to this file")


def default_devices(config: ml_collections.ConfigDict) -> int:
  """The product of the mesh sizes that are not −1 (at least 1)."""
  sizes = [s for s in dataclasses.astuple(C.mesh_config(config)) if s != -1]
  return max(int(np.prod(sizes)) if sizes else 1, 1)


def cpu_devices(n: int) -> list[jax.Device]:
  """`n` CPU devices: sets XLA_FLAGS (--xla_force_host_platform_device_count=n) before the CPU
  backend starts; if an earlier import had started it with fewer, re-executes this command
  once with the flag in its environment."""
  if n < 1:
    raise cli.UsageError(f"--devices must be >= 1, got {n}")
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # the CPU SPMD partitioner's warnings
  devices = jax.devices("cpu")
  if len(devices) >= n:
    return devices[:n]
  if os.environ.get(_DEVICES_ENV) == str(n):
    raise cli.UsageError(f"could not get {n} CPU devices (have {len(devices)})")
  os.environ[_DEVICES_ENV] = str(n)
  sys.stdout.flush()
  os.execv(sys.executable, [sys.executable, "-m", "cot2align_jax.plan", *sys.argv[1:]])
  raise AssertionError("unreachable")


def main(argv: list[str]) -> None:
  cli.no_arguments(argv)
  cli.quiet_logging()

  def work():
    config = _CONFIG.value
    for axis, holder in _MESH.items():
      if holder.value is not None:
        C.set_key(config, f"mesh.{axis}", holder.value)
    n = _DEVICES.value if _DEVICES.value is not None else default_devices(config)
    devices = cpu_devices(n)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    result = plan(config, devices, levers=_LEVERS.value, margin=_MARGIN.value, log=log)
    print(format_plan(result), flush=True)
    if _JSON.value:
      path = Path(_JSON.value)
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(result, indent=1))
    return result

  cli.guarded(work, INPUT_ERRORS)


def run() -> None:
  app.run(main, flags_parser=cli_flags.config_parser(config_required=True))


if __name__ == "__main__":
  run()
