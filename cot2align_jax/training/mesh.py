"""The device mesh, logical-axis sharding rules, and placing batches on the mesh
(docs/architecture.md §7).

    mesh = make_mesh(data=-1, fsdp=1, tensor=1)          # -1: all the remaining devices
    shardings = state_shardings(abstract_state, mesh)    # follows the params' logical axes
    batch = shard_batch(numpy_batch, mesh)               # leading dim over ("data", "fsdp")
    maybe_initialize_distributed()                       # JAX_* variables: join the job

Mesh axes "data" (parameters replicated), "fsdp" (parameters and optimizer state sharded along
"embed") and "tensor" (heads, MLP width, vocabulary), all `AxisType.Auto`. Parameters carry
logical axis names in their `out_sharding` metadata (models/layers.py `param`); `LOGICAL_RULES`
maps each to a mesh axis or to replication, falling back to replication where the mesh axis
does not divide the dimension or is already used by the array. Variables without logical axes
(projectors, counters, step, rng) are replicated; optimizer moments follow their parameters.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from typing import Any, Callable, Mapping, Sequence, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

_log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Multi-process timeouts (seconds), from the environment like the JAX_* variables.
HEARTBEAT_TIMEOUT_ENV = "COT2ALIGN_HEARTBEAT_TIMEOUT"  # a peer silent this long is dead (jax: 100)
INIT_TIMEOUT_ENV = "COT2ALIGN_INIT_TIMEOUT"            # waiting for all processes to join (jax: 300)
PEER_RELAY_ENV = "COT2ALIGN_PEER_RELAY"                # "0": no stderr relay (training/peer_loss.py)
DEFAULT_HEARTBEAT_TIMEOUT = 100
DEFAULT_INIT_TIMEOUT = 300
EXIT_PEER_LOST = 75  # a peer process died; restarting all processes resumes (EX_TEMPFAIL)
# A collective that failed because a peer is gone (gloo on CPU, NCCL on GPU, the coordinator).
_PEER_LOST_RE = re.compile(r"gloo|nccl|connection (reset|closed|refused)|socket closed|"
                           r"unavailable|deadline.exceeded|heartbeat", re.IGNORECASE)
T = TypeVar("T")


class DistributedError(ConnectionError):
  """Joining the multi-process job failed (one line; the commands exit with status 2)."""


BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (None = replicated). First match wins.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("position", None),
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: all).

  One of the sizes may be -1: it takes the devices the others leave. The product must equal
  the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(data), int(fsdp), int(tensor)]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got (data, fsdp, tensor) = {sizes}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not split over the fixed axes {sizes}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh (data, fsdp, tensor) = {tuple(sizes)} needs {int(np.prod(sizes))} "
                     f"devices, have {len(devices)}")
  try:  # topology-aware device order where jax knows one (TPU slices)
    grid = mesh_utils.create_device_mesh(tuple(sizes), devices=devices)
  except Exception:  # pylint: disable=broad-except
    grid = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _rule_table(rules) -> dict[str, Any]:
  table: dict[str, Any] = {}
  for logical, axis in rules:
    table.setdefault(logical, axis)
  return table


def _axis_size(mesh: Mesh, axis) -> int:
  names = axis if isinstance(axis, tuple) else (axis,)
  return int(np.prod([mesh.shape[a] for a in names]))


def logical_spec(axes: Sequence[str | None] | None, mesh: Mesh, rules=LOGICAL_RULES,
                 shape: Sequence[int] | None = None) -> P:
  """PartitionSpec of one array from its logical axes (None entries and unknown names are
  replicated). With `shape`, dimensions the mesh axis does not divide are replicated; a mesh
  axis is used at most once per array; mesh axes of size 1 are dropped."""
  if not axes:
    return P()
  table = _rule_table(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    axis = table.get(name) if name is not None else None
    if axis is not None:
      names = tuple(a for a in (axis if isinstance(axis, tuple) else (axis,))
                    if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
      size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
      if not names or (shape is not None and shape[i] % size):
        axis = None
      else:
        axis = names if len(names) > 1 else names[0]
        used.update(names)
    out.append(axis)
  return P(*out)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _var_axes(v: nnx.Variable):
  meta = v.get_metadata()
  return meta.get("out_sharding") or meta.get("sharding") or meta.get("sharding_names")


def logical_to_sharding(pspec_tree, mesh: Mesh, rules=LOGICAL_RULES, shapes=None):
  """A tree of logical PartitionSpecs / axis-name tuples (e.g. `nnx.get_partition_spec(state)`)
  -> the same tree of NamedShardings. `shapes`: an optional matching tree of arrays or
  ShapeDtypeStructs; given, non-dividing dimensions are replicated (see `logical_spec`)."""
  is_leaf = lambda x: isinstance(x, P) or x is None or (
      isinstance(x, tuple) and all(isinstance(a, (str, type(None), tuple)) for a in x))
  if shapes is None:
    return jax.tree.map(lambda s: NamedSharding(mesh, logical_spec(tuple(s or ()), mesh, rules)),
                        pspec_tree, is_leaf=is_leaf)
  return jax.tree.map(
      lambda s, x: NamedSharding(mesh, logical_spec(tuple(s or ()), mesh, rules, x.shape)),
      pspec_tree, shapes, is_leaf=is_leaf)


def state_shardings(abstract_state, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for every leaf of a (possibly abstract) train state or params tree.

  nnx Variables with logical axes in their metadata (params and the optimizer moments built
  over them) follow `rules`; every other leaf is replicated.
  """
  def leaf(x):
    if _is_var(x):
      value = x.get_value() if hasattr(x, "get_value") else x[...]
      spec = logical_spec(_var_axes(x), mesh, rules, getattr(value, "shape", None))
      return jax.tree.map(lambda _: NamedSharding(mesh, spec), x)
    return NamedSharding(mesh, P())
  return jax.tree.map(leaf, abstract_state, is_leaf=_is_var)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
  """`batch_sharding(mesh)` for every key of a batch dict."""
  return {k: batch_sharding(mesh) for k in batch}


def shard_batch(np_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's numpy batch -> global jax Arrays on the mesh (leading dim over the data
  axes) via `jax.make_array_from_process_local_data`. Each host passes its own rows; the global
  batch is the concatenation over hosts in process order. The local batch size must be
  divisible by this host's share of the data axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in np_batch.items()}


def process_max(values: Sequence[int]) -> list[int]:
  """Element-wise maximum of `values` over all processes (every process must call it with the
  same number of values); the values themselves in a one-process run."""
  if jax.process_count() == 1:
    return [int(v) for v in values]
  gathered = multihost_utils.process_allgather(np.asarray(values, np.int64))  # [P, n]
  return [int(v) for v in np.max(np.asarray(gathered).reshape(jax.process_count(), -1), 0)]


def is_peer_loss(error: BaseException) -> bool:
  """Whether `error` is a failed cross-process collective of a multi-process job (a peer
  process died and the collective saw its connection go)."""
  return (jax.process_count() > 1 and isinstance(error, jax.errors.JaxRuntimeError)
          and bool(_PEER_LOST_RE.search(str(error))))


def exit_on_peer_loss(body: Callable[[], T]) -> T:
  """body(); a failed collective after a peer died (`is_peer_loss`) prints one line
  "error: process i of n: lost a peer process ...; restart all n processes ..." and ends this
  process at once with EXIT_PEER_LOST (no exit handlers: jax's shutdown barrier would wait for
  the dead peer, then abort). Other errors propagate."""
  try:
    return body()
  except jax.errors.JaxRuntimeError as e:
    if not is_peer_loss(e):
      raise
    n = jax.process_count()
    cause = " ".join(str(e).split("\n")[0].split())[:200]
    sys.stdout.flush()
    print(f"error: process {jax.process_index()} of {n}: lost a peer process (a collective "
          f"failed: {cause}); restart all {n} processes to resume from the last checkpoint",
          file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


def _env_seconds(name: str, default: int) -> int:
  text = os.environ.get(name, "")
  try:
    value = int(text) if text.strip() else default
  except ValueError:
    raise DistributedError(f"{name} must be a whole number of seconds, got {text!r}") from None
  if value < 1:
    raise DistributedError(f"{name} must be >= 1 second, got {value}")
  return value


def _start_peer_loss_relay(process_id: int, num_processes: int) -> None:
  """Routes this process's stderr (fd 2) through training/peer_loss.py, which turns jax's
  crash dump on a lost peer into one error line (see that module)."""
  if os.environ.get(PEER_RELAY_ENV) == "0":
    return
  sys.stderr.flush()
  read_end, write_end = os.pipe()
  subprocess.Popen([sys.executable, "-m", "cot2align_jax.training.peer_loss", str(process_id),
                    str(num_processes)], stdin=read_end, stdout=2, close_fds=True)
  os.close(read_end)
  os.dup2(write_end, 2)  # sys.stderr and jax's C++ logs now go through the relay
  os.close(write_end)


def distributed_settings(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """The keyword arguments of `jax.distributed.initialize` this environment asks for, or None
  when it is not one process of a multi-process job (see maybe_initialize_distributed)."""
  env = os.environ if env is None else env
  multi = bool(env.get("JAX_COORDINATOR_ADDRESS")) or env.get("COT2ALIGN_DISTRIBUTED") == "1"
  if env.get("TPU_WORKER_HOSTNAMES") and len(env["TPU_WORKER_HOSTNAMES"].split(",")) > 1:
    multi = True
  try:
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")
                                                            or 1) > 1:
      multi = True
    if int(env.get("JAX_NUM_PROCESSES", "1") or 1) > 1:
      multi = True
    kwargs: dict[str, Any] = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
      kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    if env.get("JAX_NUM_PROCESSES"):
      kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
      kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  except ValueError as e:
    raise DistributedError(f"bad JAX_NUM_PROCESSES / JAX_PROCESS_ID / SLURM_NTASKS: {e}") from None
  if not multi:
    return None
  kwargs["heartbeat_timeout_seconds"] = _env_seconds(HEARTBEAT_TIMEOUT_ENV,
                                                     DEFAULT_HEARTBEAT_TIMEOUT)
  kwargs["initialization_timeout"] = _env_seconds(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT)
  return kwargs


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when the environment says this is one process of a
  multi-process job, and returns whether jax.distributed is (now) initialised. Must run before
  anything touches the devices.

  Multi-process when: JAX_NUM_PROCESSES > 1 (with JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID on
  GPU clusters and for the local rehearsal on CPU; on a Cloud TPU pod slice JAX_NUM_PROCESSES
  alone is enough: jax reads the rest from the TPU metadata), JAX_COORDINATOR_ADDRESS set,
  TPU_WORKER_HOSTNAMES listing several hosts (GKE), Slurm or Open MPI with several tasks, or
  COT2ALIGN_DISTRIBUTED=1. The JAX_* values are passed explicitly (jax's own environment
  detection does not read the count or the id); what is unset is auto-detected by jax (TPU
  metadata, Slurm, Open MPI). On CPU the cross-process collectives are gloo's.

  A dead peer: a collective that sees the peer's connection go fails at once
  (`exit_on_peer_loss`: one error line, exit EXIT_PEER_LOST); one that just waits is ended by
  jax, which stops every survivor once the coordinator has missed the peer's heartbeats for
  COT2ALIGN_HEARTBEAT_TIMEOUT seconds (default 100; a dead coordinator is noticed at once), so
  no process waits forever; that stop is a C++ abort, and the survivor's stderr goes through
  training/peer_loss.py, which prints it as one error line (exit status SIGABRT's).
  All processes must join within COT2ALIGN_INIT_TIMEOUT seconds (default 300), else
  DistributedError.
  """
  if jax.distributed.is_initialized():
    return True
  kwargs = distributed_settings()
  if kwargs is None:
    return False
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  _start_peer_loss_relay(kwargs.get("process_id", -1), kwargs.get("num_processes", -1))
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except - jaxlib raises its own runtime errors
    raise DistributedError(f"jax.distributed.initialize({kwargs.get('coordinator_address', '')})"
                           f" failed: {' '.join(str(e).split())[:300]}") from None
  _log.info("jax.distributed: process %d of %d, %d local / %d global devices",
            jax.process_index(), jax.process_count(), jax.local_device_count(),
            jax.device_count())
  return True
