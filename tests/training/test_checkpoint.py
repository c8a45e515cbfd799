"""Checkpointing: round trip, retention, mesh reshape, corruption fallback, SIGTERM, SIGKILL resume.

This file doubles as the worker script of the subprocess tests
(``python tests/training/test_checkpoint.py <mode> ...``, see ``_worker_main``).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from cot2align_jax.training.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    Checkpointer,
    PreemptionGuard,
    abstract_like,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
LOGGER = "cot2align_jax.training.checkpoint"
# A failed tensorstore read leaves orbax's sibling read coroutines un-awaited (harmless).
_IGNORE_ORBAX_UNAWAITED = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


def _grain_iter(seed: int = 7):
  import grain
  return iter(grain.MapDataset.range(100).shuffle(seed=seed).batch(4).to_iter_dataset())


def _bitwise_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if jax.tree.structure(a) != jax.tree.structure(b) or len(la) != len(lb):
    return False
  for x, y in zip(la, lb):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
      return False
  return True


def _small_tree():
  return {
      "step": jnp.int32(17),
      "params": {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7,
                 "emb": (jnp.arange(6, dtype=jnp.bfloat16) * 0.1).reshape(2, 3)},
      "nested": (jnp.array([1, 2, 3], jnp.int32), (jnp.float32(-0.5), jnp.ones((2,), jnp.float16))),
      "rng": jax.random.key(3),
  }


# ----------------------------------------------------------------------------- in-process tests


def test_round_trip_state_config_metrics_and_iterator(tmp_path):
  tree = _small_tree()
  config = {"model": {"name": "toy", "layers": 2}, "lr": 1e-3, "tags": ["a", "b"], "none": None}
  it = _grain_iter()
  for _ in range(3):
    next(it)
  ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(save_every=5))
  assert ckpt.save(3, tree, data_iter=it) is False  # 3 % 5 != 0 and not forced
  assert ckpt.save(10, tree, data_iter=it, config=config, metrics={"loss": jnp.float32(0.25)})
  expected_next = next(it)  # the iterator moves on while the async save runs
  ckpt.wait()
  assert ckpt.latest_step() == 10 and ckpt.all_steps() == [10]
  assert ckpt.save(10, tree, force=True) is False  # an existing step is not rewritten
  ckpt.close()

  fresh = Checkpointer(tmp_path / "ckpt", CheckpointConfig(save_every=5))
  it2 = _grain_iter()
  step, restored, cfg = fresh.restore(abstract_like(tree), data_iter=it2)
  assert step == 10
  assert _bitwise_equal(restored, tree)
  assert restored["step"].dtype == jnp.int32
  assert cfg == config
  assert fresh.metrics(10) == {"loss": 0.25}
  np.testing.assert_array_equal(next(it2), expected_next)
  fresh.close()


def test_retention_latest_k_plus_best(tmp_path):
  cfg = CheckpointConfig(save_every=1, keep=2, best_metric="acc", best_mode="max")
  accs = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.2, 5: 0.4, 6: 0.5}
  tree = {"x": jnp.zeros((2,))}
  with Checkpointer(tmp_path, cfg) as ckpt:
    for step, acc in accs.items():
      assert ckpt.save(step, tree, metrics={"acc": acc, "loss": 1 - acc})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 5, 6]
  # Best tracking survives a restart; a save without the metric never becomes "best".
  with Checkpointer(tmp_path, cfg) as ckpt:
    assert ckpt.best_step() == 2
    ckpt.save(7, tree)
    ckpt.save(8, tree, metrics={"acc": 0.95})
    ckpt.wait()
    assert ckpt.all_steps() == [7, 8]
    assert ckpt.best_step() == 8


def test_retention_min_mode(tmp_path):
  cfg = CheckpointConfig(save_every=1, keep=1, best_metric="loss", best_mode="min", async_save=False)
  with Checkpointer(tmp_path, cfg) as ckpt:
    for step, loss in {1: 3.0, 2: 1.0, 3: 2.0, 4: 5.0}.items():
      ckpt.save(step, {"x": jnp.zeros(())}, metrics={"loss": loss})
    assert ckpt.all_steps() == [2, 4]
    assert ckpt.best_step() == 2


def test_restore_onto_different_mesh_shape(tmp_path):
  assert jax.device_count() >= 8, "tests/conftest.py should force 8 CPU devices"
  auto2, auto3 = (AxisType.Auto,) * 2, (AxisType.Auto,) * 3
  mesh42 = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=auto2)
  w = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
  b = np.arange(8, dtype=np.float32) - 3
  tree = {
      "w": jax.device_put(w, NamedSharding(mesh42, P("data", "fsdp"))),
      "b": jax.device_put(b, NamedSharding(mesh42, P("fsdp"))),
      "step": jax.device_put(jnp.int32(5), NamedSharding(mesh42, P())),
  }
  with Checkpointer(tmp_path, CheckpointConfig(save_every=1)) as ckpt:
    ckpt.save(5, tree)
    ckpt.wait()

    mesh222 = jax.make_mesh((2, 2, 2), ("a", "b", "c"), axis_types=auto3)
    want = {"w": NamedSharding(mesh222, P(("a", "b"), "c")),
            "b": NamedSharding(mesh222, P("c")),
            "step": NamedSharding(mesh222, P())}
    step, restored, _ = ckpt.restore(abstract_like(tree, want))
    assert step == 5
    for k in tree:
      assert restored[k].sharding == want[k], k
    np.testing.assert_array_equal(np.asarray(restored["w"]), w)
    np.testing.assert_array_equal(np.asarray(restored["b"]), b)
    assert int(restored["step"]) == 5

    single = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    _, restored1, _ = ckpt.restore(abstract_like(tree, single))
    for k in tree:
      assert restored1[k].sharding == single, k
    assert _bitwise_equal(restored1, jax.tree.map(np.asarray, tree))


def _save_two_steps(directory, tree):
  with Checkpointer(directory, CheckpointConfig(save_every=1, keep=5)) as ckpt:
    for s in (1, 2):
      ckpt.save(s, jax.tree.map(lambda x, s=s: x + s, tree), config={"step": s})
    ckpt.wait()


def _largest_state_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(p: pathlib.Path):
  with open(p, "r+b") as f:
    f.truncate(p.stat().st_size // 2)


@_IGNORE_ORBAX_UNAWAITED
@pytest.mark.parametrize("damage", ["truncate_data", "delete_data", "delete_state_item"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, damage):
  tree = {"w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64), "b": jnp.ones((3,))}
  _save_two_steps(tmp_path, tree)
  step_dir = tmp_path / "2"
  if damage == "truncate_data":
    _truncate(_largest_state_file(step_dir))
  elif damage == "delete_data":
    _largest_state_file(step_dir).unlink()
  else:
    shutil.rmtree(step_dir / "state")
  with caplog.at_level(logging.WARNING, logger=LOGGER), \
      Checkpointer(tmp_path, CheckpointConfig(save_every=1)) as ckpt:
    assert ckpt.latest_step() == 2
    step, restored, cfg = ckpt.restore(abstract_like(tree))
  assert step == 1 and cfg == {"step": 1}
  assert _bitwise_equal(restored, jax.tree.map(lambda x: x + 1, tree))
  assert any("step 2" in r.getMessage() and "falling back to step 1" in r.getMessage()
             for r in caplog.records if r.levelno == logging.WARNING), caplog.text


def test_unfinalized_tmp_dir_is_never_latest(tmp_path, caplog):
  tree = {"w": jnp.ones((4,))}
  _save_two_steps(tmp_path, tree)
  # What a process killed mid-save leaves behind: orbax's temporary directory.
  shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp-1234567")
  with caplog.at_level(logging.WARNING, logger=LOGGER), \
      Checkpointer(tmp_path, CheckpointConfig(save_every=1)) as ckpt:
    assert ckpt.latest_step() == 2
    step, restored, _ = ckpt.restore(abstract_like(tree))
  assert step == 2 and _bitwise_equal(restored, jax.tree.map(lambda x: x + 2, tree))
  assert "unfinalized" in caplog.text and "3.orbax-checkpoint-tmp-1234567" in caplog.text


@_IGNORE_ORBAX_UNAWAITED
def test_no_usable_checkpoint_raises(tmp_path):
  tree = {"w": jnp.ones((64, 64))}
  with Checkpointer(tmp_path / "empty", CheckpointConfig(save_every=1)) as ckpt:
    with pytest.raises(CheckpointError, match="No finalized checkpoint"):
      ckpt.restore(abstract_like(tree))
  _save_two_steps(tmp_path / "bad", tree)
  for s in ("1", "2"):
    _truncate(_largest_state_file(tmp_path / "bad" / s))
  with Checkpointer(tmp_path / "bad", CheckpointConfig(save_every=1)) as ckpt:
    with pytest.raises(CheckpointError, match="No usable checkpoint"):
      ckpt.restore(abstract_like(tree))
    with pytest.raises(CheckpointError, match="step 9"):
      ckpt.restore(abstract_like(tree), step=9)


def test_preemption_guard_flag_and_handler_restore():
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionGuard() as guard:
    assert not guard.stop_requested
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not guard.stop_requested and time.time() < deadline:
      time.sleep(0.01)
    assert guard.stop_requested and guard.signal_received == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- subprocess tests

TOTAL_2N, SAVE_N = 8, 4


class _Worker:
  """A worker subprocess; stdout lines go to a queue (read by a thread), stderr to a file."""

  def __init__(self, *args: str, stderr_path: pathlib.Path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    self.stderr_path = stderr_path
    self._stderr = open(stderr_path, "w")
    self.proc = subprocess.Popen(
        [sys.executable, str(pathlib.Path(__file__).resolve()), *args], cwd=str(REPO), env=env,
        stdout=subprocess.PIPE, stderr=self._stderr, text=True)
    self.lines: queue.Queue[str | None] = queue.Queue()
    self.out: list[str] = []
    threading.Thread(target=self._pump, daemon=True).start()

  def _pump(self):
    for line in self.proc.stdout:
      self.lines.put(line.strip())
    self.lines.put(None)

  def _fail(self, msg: str):
    self.proc.kill()
    self.proc.wait()
    raise AssertionError(f"{msg}\nstdout: {self.out}\nstderr:\n{self.stderr_path.read_text()[-4000:]}")

  def wait_for(self, prefix: str, timeout: float = 90.0) -> str:
    deadline = time.time() + timeout
    while True:
      try:
        line = self.lines.get(timeout=max(0.01, deadline - time.time()))
      except queue.Empty:
        self._fail(f"worker did not print {prefix!r} within {timeout}s")
      if line is None:
        self._fail(f"worker exited (rc={self.proc.wait()}) before printing {prefix!r}")
      self.out.append(line)
      if line.startswith(prefix):
        return line

  def finish(self, timeout: float = 90.0) -> list[str]:
    try:
      rc = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self._fail(f"worker still running after {timeout}s")
    while (line := self.lines.get(timeout=10)) is not None:
      self.out.append(line)
    self._stderr.close()
    if rc != 0:
      self._fail(f"worker exited with rc={rc}")
    return self.out

  def kill(self) -> int:
    self.proc.send_signal(signal.SIGKILL)
    rc = self.proc.wait(timeout=30)
    self._stderr.close()
    return rc


def _read_log(path: pathlib.Path) -> dict[int, str]:
  rows = {}
  for line in path.read_text().splitlines():
    step, value = line.split()
    rows[int(step)] = value
  return rows


def test_sigterm_saves_and_exits_zero(tmp_path):
  workdir = tmp_path / "run"
  worker = _Worker("sigterm", str(workdir), str(tmp_path / "loss.log"), "100000",
                   stderr_path=tmp_path / "stderr.txt")
  worker.wait_for("READY")
  os.kill(worker.proc.pid, signal.SIGTERM)
  out = worker.finish()  # asserts exit status 0
  stopped = [line for line in out if line.startswith("STOPPED")]
  assert stopped, out
  _, stop_step, params_hex = stopped[0].split()
  stop_step = int(stop_step)
  assert stop_step >= 2

  state0, _ = _toy_init()
  with Checkpointer(workdir, CheckpointConfig(save_every=SAVE_N)) as ckpt:
    assert ckpt.latest_step() == stop_step
    step, state, config = ckpt.restore(abstract_like(state0), data_iter=_toy_iter())
  assert step == stop_step == int(state["step"])
  assert _params_hex(state["params"]) == params_hex
  assert config == {"task": "toy-linreg", "total": 100000}


def test_sigkill_exact_resume(tmp_path):
  # Run A: 2N uninterrupted steps.  Run B: killed (SIGKILL) right after its step-N save is
  # finalized, then resumed from the workdir for N more.  Same params and per-step losses.
  run_a = _Worker("plain", str(tmp_path / "a"), str(tmp_path / "a.log"), str(TOTAL_2N),
                  stderr_path=tmp_path / "a.err")
  run_b1 = _Worker("kill", str(tmp_path / "b"), str(tmp_path / "b1.log"), str(TOTAL_2N),
                   stderr_path=tmp_path / "b1.err")
  marker = run_b1.wait_for("SAVED")
  assert run_b1.kill() == -signal.SIGKILL
  assert marker == f"SAVED {SAVE_N}"
  run_b2 = _Worker("plain", str(tmp_path / "b"), str(tmp_path / "b2.log"), str(TOTAL_2N),
                   stderr_path=tmp_path / "b2.err")
  out_a, out_b2 = run_a.finish(), run_b2.finish()

  final = lambda out: [line for line in out if line.startswith("FINAL")][0]
  assert f"RESUMED {SAVE_N}" in out_b2 and not any(x.startswith("RESUMED") for x in out_a)
  assert final(out_a) == final(out_b2)
  log_a = _read_log(tmp_path / "a.log")
  log_b1 = _read_log(tmp_path / "b1.log")
  log_b2 = _read_log(tmp_path / "b2.log")
  assert sorted(log_a) == list(range(1, TOTAL_2N + 1))
  assert sorted(log_b2) == list(range(SAVE_N + 1, TOTAL_2N + 1))
  log_b = {s: v for s, v in log_b1.items() if s <= SAVE_N} | log_b2
  assert log_b == log_a
  assert len(set(log_a.values())) > 1  # the loss actually changes between steps


# ----------------------------------------------------------------------------- the toy worker


def _toy_iter():
  import grain

  def example(i):
    rng = np.random.default_rng(int(i))
    x = rng.normal(size=(4,)).astype(np.float32)
    y = np.float32(x @ np.array([1.0, -2.0, 3.0, 0.5], np.float32) + 0.7 + 0.01 * rng.normal())
    return {"x": x, "y": y}

  ds = grain.MapDataset.range(64).shuffle(seed=3).repeat(100).map(example).batch(8)
  return iter(ds.to_iter_dataset())


def _toy_init():
  import optax
  opt = optax.adam(0.05)
  params = {"w": jnp.zeros((4,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
  state = {"step": jnp.int32(0), "params": params, "opt_state": opt.init(params),
           "rng": jax.random.key(0)}
  return state, opt


def _params_hex(params) -> str:
  return "".join(np.asarray(x).tobytes().hex() for x in jax.tree.leaves(params))


def _worker_main(mode: str, workdir: str, log_path: str, total: int) -> None:
  import optax

  state, opt = _toy_init()
  it = _toy_iter()
  ckpt = Checkpointer(workdir, CheckpointConfig(save_every=SAVE_N, keep=2))
  if ckpt.latest_step() is not None:
    step, state, _ = ckpt.restore(abstract_like(state), data_iter=it)
    print("RESUMED", step, flush=True)

  @jax.jit
  def train_step(state, batch):
    rng, sub = jax.random.split(state["rng"])
    noise = 1e-3 * jax.random.normal(sub, batch["y"].shape)  # exercises the rng in the state

    def loss_fn(p):
      pred = batch["x"] @ p["w"] + p["b"]
      return jnp.mean((pred - batch["y"] - noise) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}, loss

  config = {"task": "toy-linreg", "total": total}
  with PreemptionGuard() as guard, open(log_path, "a") as log:
    while int(state["step"]) < total:
      state, loss = train_step(state, next(it))
      step = int(state["step"])
      log.write(f"{step} {np.asarray(loss, np.float32).tobytes().hex()}\n")
      log.flush()
      if ckpt.save(step, state, data_iter=it, config=config) and mode == "kill":
        ckpt.wait()
        print("SAVED", step, flush=True)
      if mode == "kill" and step >= SAVE_N:
        time.sleep(0.5)  # keep going (slowly) until the parent's SIGKILL lands
      if mode == "sigterm":
        if step == 2:
          print("READY", flush=True)
        time.sleep(0.02)
        if guard.stop_requested:
          ckpt.save(step, state, data_iter=it, config=config, force=True)
          ckpt.wait()
          ckpt.close()
          print("STOPPED", step, _params_hex(state["params"]), flush=True)
          sys.exit(0)
  ckpt.wait()
  ckpt.close()
  print("FINAL", _params_hex(state["params"]), flush=True)


if __name__ == "__main__":
  _worker_main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
