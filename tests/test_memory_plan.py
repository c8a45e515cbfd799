"""The memory planner (cot2align_jax/plan.py) on the tiny config.

* the CLI prints the per-device table, the accelerator verdicts and the levers on 2 and on 4
  fake CPU devices (it sets the device count itself);
* per-device parameter and optimizer bytes halve with mesh.fsdp=2, against a numpy count from
  the shapes and the logical axes, and the device-less shard count agrees with the mesh's;
* the planner's per-device peak is within 20% of what the same compiled step uses when run: the
  bytes of the real state, teacher and batch shards on each device plus the growth of the
  process heap (glibc mallinfo2: CPU device buffers are host memory) while steps run, per device;
* a bad config key or a mesh that does not fit the devices: one line "error: ...", exit 2.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cot2align_jax import plan as P
from cot2align_jax.core import spec
from cot2align_jax.losses.methods import build_projectors
from cot2align_jax.models import hf
from cot2align_jax.models.config import ModelError
from cot2align_jax.training import config as C
from cot2align_jax.training import mesh as mesh_lib
from cot2align_jax.training import setup
from cot2align_jax.training import state as state_lib

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")


def _env():
  e = dict(os.environ)
  e.update(HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""))
  return e


def _cli(*args, timeout=240):
  return subprocess.run([sys.executable, "-m", "cot2align_jax.plan", *args], cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=timeout)


def _tiny(method="sft", **overrides):
  cfg = C.load_config(TINY, method)
  for k, v in overrides.items():
    C.set_key(cfg, k, v)
  return cfg


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4])
def test_cli_prints_the_table(n):
  proc = _cli(f"--config={TINY}", f"--devices={n}", f"--mesh.data={n}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert f"{n} device(s), mesh data={n} fsdp=1 tensor=1" in out
  for row in ("student params (trainable)", "optimizer state", "teacher params",
              "XLA temporaries", "peak estimate"):
    assert row in out
  for name, _ in P.ACCELERATORS:
    assert name in out
  assert "--mesh.data=1 --mesh.fsdp=" in out          # the fsdp lever (data > 1)


def test_cli_bad_config_key_is_one_line():
  proc = _cli(f"--config={TINY}", "--config.kd.no_such_key=1")
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and "no_such_key" in lines[0]


def test_cli_bad_mesh_is_one_line():
  proc = _cli(f"--config={TINY}", "--devices=2", "--mesh.data=3")
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: mesh:"), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# Shard counts
# --------------------------------------------------------------------------------------------


def _numpy_param_bytes(problem, fsdp: int) -> int:
  """Σ over student params of size × itemsize, divided by fsdp where a dimension is "embed"
  and fsdp divides it (the first such dimension; the rules' only fsdp axis)."""
  total = 0
  for v in jax.tree.leaves(problem.state.params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    value = v.get_value()
    axes = v.get_metadata().get("out_sharding") or ()
    n = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
    for dim, name in zip(value.shape, axes):
      if name == "embed" and dim % fsdp == 0:
        n //= fsdp
        break
    total += n
  return total


def test_fsdp_halves_param_and_optimizer_bytes():
  devices = jax.devices("cpu")[:2]
  data = P.breakdown(P.build_abstract(_tiny(**{"mesh.data": 2}), devices))
  fsdp_problem = P.build_abstract(_tiny(**{"mesh.data": 1, "mesh.fsdp": 2}), devices)
  fsdp = P.breakdown(fsdp_problem)
  assert fsdp["student_trainable"] == _numpy_param_bytes(fsdp_problem, 2)
  assert data["student_trainable"] == _numpy_param_bytes(fsdp_problem, 1)
  assert fsdp["student_trainable"] < 0.55 * data["student_trainable"]
  assert fsdp["optimizer"] < 0.55 * data["optimizer"]
  assert fsdp["batch"] == data["batch"]          # the batch is split over data x fsdp either way
  # the device-less count (used by the mesh levers) equals the real mesh's shard sizes
  for sizes, parts in (((2, 1, 1), data), ((1, 2, 1), fsdp)):
    est = P.persistent_bytes(fsdp_problem, *sizes)
    assert est["student"] == parts["student_trainable"] + parts["student_frozen"]
    assert est["optimizer"] == parts["optimizer"]
    assert est["batch"] == parts["batch"]


def test_fits_and_fixing_lever():
  rows = P.fits(20 * P.GiB, margin=0.9)
  by = {r["name"]: r for r in rows}
  assert not by["TPU v5e"]["fits"] and by["TPU v4"]["fits"]
  assert by["TPU v5e"]["headroom"] == int(16 * P.GiB * 0.9) - 20 * P.GiB
  levers = [P.Lever("a", "x", 15 * P.GiB, "estimate"), P.Lever("b", "y", 12 * P.GiB, "estimate"),
            P.Lever("c", "z", None, "not available")]
  assert P.fixing_lever(levers, int(16 * P.GiB * 0.9)).name == "b"
  assert P.fixing_lever(levers, 10 * P.GiB) is None
  assert [lv.name for lv in P.rank_levers(levers, 20 * P.GiB)] == ["b", "a", "c"]


# --------------------------------------------------------------------------------------------
# The estimate against the running step
# --------------------------------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                             "usmblks", "fsmblks", "uordblks", "fordblks",
                                             "keepcost")]


def _heap_reader():
  """Bytes the C heap has handed out (small blocks + mmapped blocks), or None off glibc."""
  try:
    libc = ctypes.CDLL("libc.so.6")
    fn = libc.mallinfo2
  except (OSError, AttributeError):
    return None
  fn.restype = _MallInfo2

  def read():
    m = fn()
    return int(m.uordblks + m.hblkhd)
  return read


def _real_batch(problem, rng):
  b, length = problem.batch["has_pair"].shape[0], problem.seq_len
  out = {}
  for view in spec.VIEWS:
    for side, cfg in (("student", problem.student_cfg), ("teacher", problem.teacher_cfg)):
      ids = rng.integers(3, cfg.vocab_size, size=(b, length)).astype(np.int32)
      loss = np.zeros((b, length), np.int32)
      loss[:, length // 2:] = 1
      out[spec.key(view, side, "input_ids")] = ids
      out[spec.key(view, side, "labels")] = np.roll(ids, -1, axis=1) * loss
      out[spec.key(view, side, "loss_mask")] = loss
      out[spec.key(view, side, "attention_mask")] = np.ones((b, length), np.int32)
  for f in spec.ALIGN_FIELDS:
    out[spec.align_key(f)] = np.zeros((b, length), np.int32)
  out["has_pair"] = np.arange(b) % 2 == 0
  out["example_id"] = np.arange(b, dtype=np.int32)
  return out


def _per_device_bytes(tree) -> dict:
  out: dict = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def test_peak_within_20_percent_of_the_running_step():
  """Measured in a fresh process: in a long test session the heap also holds other tests'
  allocations and caches, which the growth sampler would count."""
  if _heap_reader() is None:
    pytest.skip("needs glibc's mallinfo2 to read the heap")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  code = ("import runpy, sys; m = runpy.run_path(sys.argv[1]); "
          "m['measure_peak_against_the_running_step']()")
  proc = subprocess.run([sys.executable, "-c", code, __file__], env=env, capture_output=True,
                        text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "planned peak" in proc.stdout


def measure_peak_against_the_running_step():
  """The planner's per-device peak vs the running step's resident bytes + heap growth."""
  heap = _heap_reader()
  n = 2
  devices = jax.devices("cpu")[:n]
  cfg = _tiny("dskd_cma", **{"mesh.data": n, "data.batch_size": 8})
  problem = P.build_abstract(cfg, devices)
  parts = P.breakdown(problem)
  compiled = P.compile_step(problem)
  mem = P.compiled_memory(compiled)
  planned = P.peak_bytes(parts["arguments"], mem)

  seed = C.train_config(cfg).seed
  student = hf.create_model(problem.student_cfg, seed)
  proj = build_projectors(problem.method, problem.student_cfg.hidden_size,
                          problem.teacher_cfg.hidden_size, rngs=nnx.Rngs(seed),
                          kd=problem.kd_cfg)
  state, _ = state_lib.init_state(student, proj, problem.opt_cfg, seed,
                                  optimizer=problem.optimizer)
  state = jax.device_put(state, problem.state_shardings)
  _, teacher = state_lib.split_params(hf.create_model(problem.teacher_cfg, seed + 1))
  teacher = jax.device_put(teacher, problem.teacher_shardings)
  batch = mesh_lib.shard_batch(_real_batch(problem, np.random.default_rng(0)), problem.mesh)
  del student, proj

  state, metrics = compiled(state, teacher, batch)       # warm-up (first-run allocations)
  jax.block_until_ready((state, metrics))
  assert np.isfinite(float(metrics["loss"][0]))
  resident = _per_device_bytes((state, teacher, batch))
  assert set(resident) == set(devices)

  peak, stop = [0], threading.Event()

  def sample():
    while not stop.is_set():
      peak[0] = max(peak[0], heap())
      time.sleep(0.0002)

  base = heap()
  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  try:
    # 30 steps: on a busy machine the sampler thread is scheduled less often, and a longer
    # window gives it more chances to see a step's peak
    for _ in range(30):
      state, metrics = compiled(state, teacher, batch)
      jax.block_until_ready((state, metrics))
  finally:
    stop.set()
    sampler.join()
  growth = max(peak[0] - base, 0) / n                   # the step's own buffers, per device
  measured = max(resident.values()) + growth
  print(f"planned peak {planned} B, measured {measured:.0f} B (resident "
        f"{max(resident.values())}, step growth {growth:.0f} per device; XLA temp {mem['temp']})")
  assert abs(max(resident.values()) - parts["arguments"]) <= 0.05 * parts["arguments"]
  assert growth > 0.5 * mem["temp"], (growth, mem)      # the sampler saw the temporaries
  assert abs(planned - measured) <= 0.2 * measured, (planned, measured, mem, growth)


# Published parameter counts (model cards), in millions, to one decimal.
PAPER_PARAMS = {"gpt2": 124.4, "gpt2-xl": 1557.6, "Qwen/Qwen1.5-1.8B": 1836.8,
                "Qwen/Qwen2.5-7B-Instruct": 7615.6, "meta-llama/Llama-2-7b-hf": 6738.4,
                "mistralai/Mistral-7B-v0.1": 7241.7,
                "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": 1100.0}


PAPER = ("qwen15_to_gpt2", "gpt2xl_to_gpt2", "llama2_to_tinyllama", "mistral_to_tinyllama",
         "qwen25_to_gpt2_1_5b")


def test_paper_models_are_in_the_table():
  table = P.architectures()
  paths = {C.model_spec(C.load_config(REPO / "configs" / "paper" / f"{name}.py"), side).path
           for name in PAPER for side in ("student", "teacher")}
  assert paths == set(PAPER_PARAMS) and paths <= set(table)


@pytest.mark.parametrize("path", sorted(PAPER_PARAMS))
def test_paper_architecture_matches_the_model_card(path):
  model = hf.config_from_hf(P.architectures()[path])
  assert round(P._n_params(model) / 1e6, 1) == PAPER_PARAMS[path]


def test_abstract_model_config_applies_the_spec():
  cfg = C.load_config(REPO / "configs" / "paper" / "llama2_to_tinyllama.py")
  student = setup.abstract_model_config(cfg, "student", P.architectures())
  teacher = setup.abstract_model_config(cfg, "teacher", P.architectures())
  assert (student.param_dtype, student.dtype, student.lora_rank) == ("float32", "bfloat16", 256)
  assert teacher.param_dtype == "bfloat16" and teacher.lora_rank == 0
  with pytest.raises(ModelError, match="no config.json"):
    setup.hf_config_json("org/unknown-model", P.architectures())
