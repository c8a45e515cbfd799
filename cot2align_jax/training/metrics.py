"""Host-side metrics of a run: reducing the steps' (sum, count) pairs and writing them.

    values = reduce_metrics(window)              # [{name: (sum, count)}, ...] → {name: mean}
    writer = MetricWriter(workdir, resume_step)  # workdir/metrics.jsonl + workdir/tb/
    writer.write(step, "train", values)

One line of metrics.jsonl per write: {"step", "split", each metric} (non-finite values as
strings); TensorBoard scalars are named "<split>/<name>".
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def reduce_metrics(window: Sequence[Mapping[str, tuple[Any, Any]]]) -> dict[str, float]:
  """Σsum / Σcount per metric over steps (one device_get for the whole window); NaN for a
  metric whose counts add to 0."""
  host = jax.device_get(list(window))
  sums: dict[str, list[float]] = {}
  for m in host:
    for k, (s, c) in m.items():
      acc = sums.setdefault(k, [0.0, 0.0])
      acc[0] += float(s)
      acc[1] += float(c)
  return {k: (s / c if c else float("nan")) for k, (s, c) in sums.items()}


def _json_float(v):
  v = float(v)
  return v if math.isfinite(v) else str(v)


class MetricWriter:
  """metrics.jsonl (one JSON object a line) + TensorBoard scalars; process 0 writes.

  resume_step: None starts a fresh file; a step keeps the lines up to it (those after it came
  from steps lost with the run that wrote them).
  """

  def __init__(self, workdir: Path, resume_step: int | None):
    self.enabled = jax.process_index() == 0
    self.path = Path(workdir) / METRICS_FILE
    self.tb = None
    if not self.enabled:
      return
    if resume_step is not None and self.path.exists():
      self._truncate(resume_step)
    elif resume_step is None and self.path.exists():
      self.path.unlink()
    try:  # tensorboardX: an optional writer, imported only by the process that writes
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(logdir=str(Path(workdir) / TB_DIR))
    except ImportError:  # pragma: no cover - a requirement
      log.warning("tensorboardX is not installed: no TensorBoard event files")

  def _truncate(self, step: int) -> None:
    """Drops lines of steps after `step` (written by a run that was killed before saving)."""
    kept = []
    for line in self.path.read_text().splitlines():
      try:
        if int(json.loads(line).get("step", 0)) <= step:
          kept.append(line)
      except (ValueError, AttributeError):
        continue
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in kept))
    os.replace(tmp, self.path)

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": split}
    row.update({k: _json_float(v) for k, v in values.items()})
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self.tb.add_scalar(k if k.startswith(split + "/") else f"{split}/{k}", v, step)
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
