"""Host-side metrics: the (sum, count) reducer and metrics.jsonl / TensorBoard writing."""

import json

import jax.numpy as jnp
import numpy as np

from cot2align_jax.training import metrics as metrics_lib


def test_reduce_metrics_exact():
  ms = [{"ce": (np.float32(6.0), np.float32(3.0))}, {"ce": (np.float32(2.0), np.float32(5.0))}]
  assert metrics_lib.reduce_metrics(ms) == {"ce": 1.0}  # (6 + 2) / (3 + 5), not mean(2, 0.4)


def test_reduce_metrics_device_arrays_and_zero_count():
  ms = [{"kd": (jnp.float32(3.0), jnp.float32(2.0)), "ot": (jnp.float32(1.0), jnp.float32(0.0))}]
  out = metrics_lib.reduce_metrics(ms)
  assert out["kd"] == 1.5 and np.isnan(out["ot"])


def _rows(path):
  return [json.loads(l) for l in path.read_text().splitlines()]


def test_writer_lines_and_resume_truncation(tmp_path):
  w = metrics_lib.MetricWriter(tmp_path, None)
  for step in (1, 2, 3):
    w.write(step, "train", {"loss": float(step), "bad": float("nan")})
  w.write(3, "dev", {"dev/loss": 0.5})
  w.close()
  path = tmp_path / metrics_lib.METRICS_FILE
  rows = _rows(path)
  assert rows[0] == {"step": 1, "split": "train", "loss": 1.0, "bad": "nan"}
  assert rows[-1] == {"step": 3, "split": "dev", "dev/loss": 0.5}
  assert list((tmp_path / metrics_lib.TB_DIR).glob("events.out.tfevents.*"))

  # resumed at step 2: the lines of step 3 (lost steps) go, the others stay
  metrics_lib.MetricWriter(tmp_path, 2).close()
  assert [r["step"] for r in _rows(path)] == [1, 2]
  # a fresh run (no resume) starts a new file
  metrics_lib.MetricWriter(tmp_path, None).close()
  assert not path.exists()
