"""Orbax checkpoints: a pytree of jax arrays + a grain iterator + the run config
(docs/architecture.md §10).

    ckpt = Checkpointer(workdir / "checkpoints", CheckpointConfig(save_every=500))
    ckpt.save(step, state, data_iter=it, config=cfg_dict, metrics=dev)   # asynchronous
    step, state, saved_cfg = ckpt.restore(abstract_like(state, shardings), data_iter=it)

One directory per saved step, ``<dir>/<step>/``, with items ``state/`` (StandardSave),
``data_iter/`` (the grain iterator state, one JSON per process) and ``meta/`` (``{"step",
"config", "metrics"}``). In a multi-process job every process calls save and restore (Orbax
coordinates the processes and process 0 finalizes the step); a checkpoint restores under
another process count (the arrays onto the new mesh; the data position through ``seek``).
Retention: the latest ``keep`` steps plus the best by ``best_metric``. Only finalized
(atomically renamed) steps are listed; a latest step that fails to restore falls back to the
previous one. Restoring targets ``jax.ShapeDtypeStruct`` leaves carrying the
current sharding (any mesh). :class:`PreemptionGuard` turns SIGTERM into a flag the loop polls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

try:  # grain registers its orbax handler (CheckpointSave/Restore) only when orbax is importable.
  from grain.checkpoint import CheckpointRestore as _GrainRestore
  from grain.checkpoint import CheckpointSave as _GrainSave
except ImportError:  # pragma: no cover - grain is a hard dependency of the project
  _GrainSave = _GrainRestore = None

logger = logging.getLogger(__name__)

STATE_ITEM = "state"
DATA_ITER_ITEM = "data_iter"
META_ITEM = "meta"
_TMP_STEP_RE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
_ITER_FILE_RE = re.compile(r"^process_(\d+)-of-(\d+)\.json$")  # grain's per-process state

__all__ = [
    "CheckpointConfig", "CheckpointError", "Checkpointer", "PreemptionGuard",
    "abstract_like", "install_sigterm_handler",
]


class CheckpointError(RuntimeError):
  """No usable checkpoint (or the requested one is unusable)."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """How often to save and what to keep.

  save_every: periodic saves at steps that are multiples of this.
  keep: how many of the latest steps to keep.
  best_metric: a key of the ``metrics`` passed to :meth:`Checkpointer.save`;
    the best step by it is kept besides the latest ``keep``.
  best_mode: ``"max"`` or ``"min"``: which direction of ``best_metric`` is better.
  async_save: write in a background thread (``wait()`` joins it).
  """
  save_every: int
  keep: int = 3
  best_metric: str | None = None
  best_mode: Literal["max", "min"] = "max"
  async_save: bool = True

  def __post_init__(self):
    if int(self.save_every) < 1:
      raise ValueError(f"CheckpointConfig.save_every must be >= 1, got {self.save_every}")
    if int(self.keep) < 1:
      raise ValueError(f"CheckpointConfig.keep must be >= 1, got {self.keep}")
    if self.best_mode not in ("max", "min"):
      raise ValueError(f"CheckpointConfig.best_mode must be 'max' or 'min', got {self.best_mode!r}")


# ----------------------------------------------------------------------------- helpers


def abstract_like(tree: Any, shardings: Any = None) -> Any:
  """A pytree of ``jax.ShapeDtypeStruct`` mirroring ``tree``, each with a sharding.

  ``shardings``: None (keep each jax.Array's own sharding; other leaves, e.g.
  numpy arrays or existing ShapeDtypeStructs without one, go to the first local
  device), a single ``jax.sharding.Sharding`` for every leaf, or a pytree of
  shardings with the structure of ``tree`` (a prefix of it is not accepted).
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def one(leaf, sharding=None):
    if sharding is None:
      sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      sharding = default
    shape, dtype = np.shape(leaf), getattr(leaf, "dtype", None)
    if dtype is None:
      dtype = np.asarray(leaf).dtype
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  if shardings is None:
    return jax.tree.map(one, tree)
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda leaf: one(leaf, shardings), tree)
  return jax.tree.map(one, tree, shardings)


def _with_default_shardings(abstract_state: Any) -> Any:
  """Fills in a single-device sharding for ShapeDtypeStruct leaves that lack one."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def fix(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      if leaf.sharding is None:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=default)
      return leaf
    return abstract_like(leaf)

  return jax.tree.map(fix, abstract_state)


def _to_json_dict(config: Any, what: str) -> dict | None:
  if config is None:
    return None
  if hasattr(config, "to_dict") and not isinstance(config, Mapping):  # ml_collections.ConfigDict
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise TypeError(f"{what} must be a dict (or have .to_dict()), got {type(config).__name__}")
  try:
    return json.loads(json.dumps(dict(config)))
  except (TypeError, ValueError) as e:
    raise TypeError(f"{what} must be JSON-serialisable: {e}") from e


def _to_float_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
  if metrics is None:
    return None
  return {str(k): float(np.asarray(v)) for k, v in metrics.items()}


class _IteratorSnapshot:
  """The iterator state captured at ``save()`` time, in the form grain's handler writes.

  grain's ``CheckpointHandler.save`` calls ``item.get_state()`` and, for
  non-``DatasetIterator`` items, ``.decode()``s the bytes it returns; it writes
  the result as ``process_<i>-of-<n>.json``.  For a ``DatasetIterator`` those
  bytes are the same JSON its own branch would write, so restoring with
  ``CheckpointRestore(item=<DatasetIterator>)`` reads it back unchanged.
  Capturing eagerly means the training loop may advance the iterator while an
  async save is still in flight.
  """

  def __init__(self, iterator: Any):
    state = iterator.get_state()
    if isinstance(state, (bytes, bytearray)):  # grain DataLoaderIterator
      self._payload = bytes(state)
    else:  # grain DatasetIterator: a JSON-able dict
      self._payload = json.dumps(state, indent=4).encode()

  def get_state(self) -> bytes:
    return self._payload


# ----------------------------------------------------------------------------- checkpointer


class Checkpointer:
  """``ocp.CheckpointManager`` over (state pytree, grain iterator, config dict).

  Args:
    directory: the workdir's checkpoint directory (created if missing; any
      ``etils.epath`` path, e.g. ``gs://...``).
    cfg: a :class:`CheckpointConfig`.
    read_only: never save or delete, and leave other writers' temporary
      directories alone (for evaluators reading a live workdir).
  """

  def __init__(self, directory: str | epath.PathLike, cfg: CheckpointConfig, *,
               read_only: bool = False):
    if _GrainSave is None:  # pragma: no cover
      raise ImportError("grain.checkpoint.CheckpointSave is unavailable (grain needs orbax installed)")
    self.directory = epath.Path(directory)
    self.cfg = cfg
    self._read_only = read_only
    if not read_only:
      self.directory.mkdir(parents=True, exist_ok=True)
      self._warn_unfinalized()

    policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=cfg.keep)]
    best_fn = None
    if cfg.best_metric is not None:
      best_fn = self._metric_value
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=self._metric_value,
          reverse=(cfg.best_mode == "min"),  # BestN keeps the tail of the sorted list
          n=1,
          keep_checkpoints_without_metrics=False,
      ))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        # best_fn is not a "delete option": with it set, orbax writes the metrics
        # item and re-reads it on start-up, so best tracking survives restarts.
        best_fn=best_fn,
        best_mode=cfg.best_mode,
        enable_async_checkpointing=cfg.async_save,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        create=not read_only,
    )
    self._mgr = ocp.CheckpointManager(self.directory, options=options)

  # ---- metrics / best

  def _metric_value(self, metrics: Any) -> float:
    """The tracked metric of one checkpoint; a missing or NaN value ranks worst."""
    worst = -math.inf if self.cfg.best_mode == "max" else math.inf
    if not isinstance(metrics, Mapping) or self.cfg.best_metric not in metrics:
      return worst
    try:
      value = float(metrics[self.cfg.best_metric])
    except (TypeError, ValueError):
      return worst
    return worst if math.isnan(value) else value

  def best_step(self) -> int | None:
    """The kept step with the best ``best_metric`` (None when untracked or never reported)."""
    if self.cfg.best_metric is None:
      return None
    best, best_value = None, None
    for step in self.all_steps():
      metrics = self._mgr.metrics(step)
      if not isinstance(metrics, Mapping) or self.cfg.best_metric not in metrics:
        continue
      value = self._metric_value(metrics)
      if math.isinf(value):
        continue
      better = best_value is None or (value > best_value if self.cfg.best_mode == "max"
                                      else value < best_value)
      if better:
        best, best_value = step, value
    return best

  # ---- listing

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def reload(self) -> None:
    """Re-reads the step list from disk (after another process wrote to the directory)."""
    self._mgr.reload()

  def _warn_unfinalized(self) -> None:
    try:
      names = [p.name for p in self.directory.iterdir()]
    except (FileNotFoundError, NotADirectoryError):
      return
    for name in sorted(names):
      m = _TMP_STEP_RE.match(name)
      if m:
        logger.warning(
            "Ignoring unfinalized checkpoint %s (step %s) in %s: a save that did not finish "
            "(process killed?); it is never restored and will be deleted.",
            name, m.group(1), self.directory)

  # ---- save

  def should_save(self, step: int, *, force: bool = False) -> bool:
    return force or int(step) % self.cfg.save_every == 0

  def save(self, step: int, state: Any, *, data_iter: Any = None,
           config: Mapping[str, Any] | None = None,
           metrics: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Starts a save of ``state`` (+ iterator, config, metrics) at ``step``.

    Saves when ``step % save_every == 0`` or ``force``; returns whether a save
    was started.  A step that is already saved is skipped (False).  Asynchronous
    when ``cfg.async_save``: the arrays are copied off the devices before this
    returns and written in the background; the iterator state is captured now,
    so the caller may keep consuming the iterator.  ``metrics`` (floats) are
    stored with the step and rank it for ``best_metric``.
    """
    if self._read_only:
      raise CheckpointError(f"Checkpointer over {self.directory} is read-only")
    step = int(step)
    if not self.should_save(step, force=force):
      return False
    if step in self._mgr.all_steps():
      logger.info("Checkpoint for step %d already exists in %s; not saving again.", step, self.directory)
      return False
    config_json = _to_json_dict(config, "config")
    metrics_f = _to_float_metrics(metrics)
    items: dict[str, Any] = {
        STATE_ITEM: ocp.args.StandardSave(state),
        META_ITEM: ocp.args.JsonSave({"step": step, "config": config_json, "metrics": metrics_f}),
    }
    if data_iter is not None:
      items[DATA_ITER_ITEM] = _GrainSave(_IteratorSnapshot(data_iter))
    orbax_metrics = None
    if self.cfg.best_metric is not None:
      orbax_metrics = metrics_f if metrics_f is not None else {}
    saved = self._mgr.save(step, args=ocp.args.Composite(**items), metrics=orbax_metrics, force=True)
    if saved:
      logger.info("Checkpoint save started: step %d -> %s", step, self.directory)
    return bool(saved)

  def wait(self) -> None:
    """Blocks until pending async saves are finalized (and old steps deleted)."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ---- restore

  def metrics(self, step: int) -> dict[str, float] | None:
    """The metrics saved with ``step`` (None if none were given)."""
    meta = self._restore_meta(step)
    return meta.get("metrics")

  def _restore_meta(self, step: int) -> dict:
    restored = self._mgr.restore(int(step), args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
    return restored[META_ITEM]

  def restore(self, abstract_state: Any, *, step: int | None = None, data_iter: Any = None,
              seek: Any = None) -> tuple[int, Any, dict | None]:
    """Restores ``(step, state, config)``.

    ``abstract_state``: a pytree of ``jax.ShapeDtypeStruct`` with ``.sharding``
    set (see :func:`abstract_like`); the arrays come back with those shardings,
    whatever mesh wrote them.  ``data_iter``: a fresh grain iterator of the same
    pipeline; its state is set in place to the saved one.  ``seek(step)``: positions
    ``data_iter`` when the checkpoint's iterator states were written by another number of
    processes (without it, such a step is unusable).

    With ``step=None`` the newest step is tried first; a step that fails to
    restore (missing or truncated files, missing items) is logged as a warning
    and the next older one is tried.  Raises :class:`CheckpointError` when no
    step is usable (or the explicitly requested one is not).
    """
    self.wait()
    self._mgr.reload()
    steps = self.all_steps()
    if step is not None:
      if int(step) not in steps:
        raise CheckpointError(f"No finalized checkpoint for step {step} in {self.directory} "
                              f"(have {steps})")
      candidates = [int(step)]
    else:
      if not steps:
        raise CheckpointError(f"No finalized checkpoint in {self.directory}")
      candidates = steps[::-1]
    abstract_state = _with_default_shardings(abstract_state)
    errors = []
    for i, s in enumerate(candidates):
      try:
        return self._restore_step(s, abstract_state, data_iter, seek)
      except Exception as e:  # noqa: BLE001 - any failure makes this step unusable
        errors.append(f"step {s}: {type(e).__name__}: {e}")
        if step is None:
          nxt = candidates[i + 1] if i + 1 < len(candidates) else None
          logger.warning(
              "Checkpoint step %d in %s is unusable (%s: %s); %s", s, self.directory,
              type(e).__name__, _short(e),
              f"falling back to step {nxt}" if nxt is not None else "no older step left")
    raise CheckpointError(f"No usable checkpoint in {self.directory}:\n  " + "\n  ".join(errors))

  def _restore_step(self, step: int, abstract_state: Any, data_iter: Any, seek: Any = None):
    step_dir = self.directory / str(step)
    items: dict[str, Any] = {
        STATE_ITEM: ocp.args.StandardRestore(abstract_state),
        META_ITEM: ocp.args.JsonRestore(),
    }
    seek_to = None
    if data_iter is not None:
      if not (step_dir / DATA_ITER_ITEM).exists():
        raise CheckpointError(f"step {step} has no '{DATA_ITER_ITEM}' item but an iterator "
                              "was given to restore")
      written_by = iterator_process_count(step_dir / DATA_ITER_ITEM)
      if written_by in (None, jax.process_count()):
        items[DATA_ITER_ITEM] = _GrainRestore(data_iter)
      elif seek is None:
        raise CheckpointError(f"step {step}: the data iterator was saved by {written_by} "
                              f"processes, this job has {jax.process_count()}")
      else:
        seek_to = step
    restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
    if seek_to is not None:
      seek(seek_to)
    meta = restored[META_ITEM]
    if not isinstance(meta, Mapping) or int(meta.get("step", -1)) != step:
      raise CheckpointError(f"step {step}: malformed '{META_ITEM}' item: {meta!r}")
    state = restored[STATE_ITEM]
    _check_restored(state, abstract_state)
    return step, state, meta.get("config")


def iterator_process_count(directory: epath.Path) -> int | None:
  """How many processes wrote a ``data_iter`` item (grain writes ``process_<i>-of-<n>.json``
  per process); None when it holds no such file."""
  try:
    names = [p.name for p in epath.Path(directory).iterdir()]
  except (FileNotFoundError, NotADirectoryError):
    return None
  counts = {int(m.group(2)) for m in map(_ITER_FILE_RE.match, names) if m}
  return counts.pop() if len(counts) == 1 else None


def _short(e: Exception, n: int = 300) -> str:
  s = str(e).replace("\n", " ")
  return s if len(s) <= n else s[:n] + "..."


def _check_restored(state: Any, abstract_state: Any) -> None:
  """Guards against silent structure/shape drift between the checkpoint and the target."""
  got = jax.tree.structure(state)
  want = jax.tree.structure(abstract_state)
  if got != want:
    raise CheckpointError(f"restored tree structure {got} != requested {want}")
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(abstract_state)):
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
      raise CheckpointError(f"restored leaf {a.shape}/{a.dtype} != requested {b.shape}/{b.dtype}")


# ----------------------------------------------------------------------------- preemption


class PreemptionGuard:
  """Context manager turning SIGTERM (preemption notice) into ``stop_requested``.

  Usage in a loop::

    with PreemptionGuard() as guard:
      for step in ...:
        state = train_step(...)
        ckpt.save(step, state, ...)
        if guard.stop_requested:
          ckpt.save(step, state, ..., force=True); ckpt.wait(); ckpt.close()
          sys.exit(0)

  The previous handlers are restored on exit.  Outside the main thread (where
  Python cannot install signal handlers) it warns and only reports
  :meth:`request_stop` calls.  On multi-host pods every host must reach the
  same decision: combine the flag with ``jax.experimental.multihost_utils``
  (e.g. a ``process_allgather`` of it) before saving.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
    self._signals = tuple(signals)
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}
    self.signal_received: int | None = None

  @property
  def stop_requested(self) -> bool:
    return self._event.is_set()

  def request_stop(self, signum: int | None = None) -> None:
    self.signal_received = signum
    self._event.set()

  def _handler(self, signum, frame):  # noqa: ARG002 - signal handler signature
    # Only set a flag: no logging or I/O inside a signal handler.
    self.request_stop(signum)

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is not threading.main_thread():
      logger.warning("PreemptionGuard entered outside the main thread: signals not handled")
      return self
    for sig in self._signals:
      self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for sig, prev in self._previous.items():
      signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
    self._previous.clear()
    if self.stop_requested:
      logger.warning("Stop requested by signal %s", self.signal_received)


def install_sigterm_handler() -> PreemptionGuard:
  """Installs a process-wide SIGTERM guard (never uninstalled) and returns it."""
  return PreemptionGuard().__enter__()
