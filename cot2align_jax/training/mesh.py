"""The device mesh, logical-axis sharding rules, and placing batches on the mesh
(docs/architecture.md §7).

    mesh = make_mesh(data=-1, fsdp=1, tensor=1)          # -1: all the remaining devices
    shardings = state_shardings(abstract_state, mesh)    # follows the params' logical axes
    batch = shard_batch(numpy_batch, mesh)               # leading dim over ("data", "fsdp")

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
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

_log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
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


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when the environment says this is one process of a
  multi-process job, and returns whether jax.distributed is (now) initialised. Must run before
  anything touches the devices.

  Multi-process when: JAX_NUM_PROCESSES > 1 (with JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID on
  GPU clusters; on a Cloud TPU pod slice JAX_NUM_PROCESSES alone is enough: jax reads the rest
  from the TPU metadata), JAX_COORDINATOR_ADDRESS set, TPU_WORKER_HOSTNAMES listing several
  hosts (GKE), Slurm or Open MPI with several tasks, or COT2ALIGN_DISTRIBUTED=1. The JAX_*
  values are passed explicitly (jax's own environment detection does not read the count or
  the id); what is unset is auto-detected by jax (TPU metadata, Slurm, Open MPI).
  """
  env = os.environ
  if jax.distributed.is_initialized():
    return True
  multi = bool(env.get("JAX_COORDINATOR_ADDRESS")) or env.get("COT2ALIGN_DISTRIBUTED") == "1"
  if env.get("TPU_WORKER_HOSTNAMES") and len(env["TPU_WORKER_HOSTNAMES"].split(",")) > 1:
    multi = True
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")
                                                          or 1) > 1:
    multi = True
  if int(env.get("JAX_NUM_PROCESSES", "1") or 1) > 1:
    multi = True
  if not multi:
    return False
  kwargs = {}
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
  if env.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if env.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  _log.info("jax.distributed: process %d of %d, %d local / %d global devices",
            jax.process_index(), jax.process_count(), jax.local_device_count(),
            jax.device_count())
  return True
