"""Mesh, sharding rules and a sharded train step (8 fake CPU devices from tests/conftest.py)."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from cot2align_jax.losses.methods import KDConfig
from cot2align_jax.losses.ot import OTConfig
from cot2align_jax.training import mesh as mesh_lib
from cot2align_jax.training import state as state_lib
from tests.support import tiny

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


@needs8
def test_make_mesh_shapes_and_auto_axes():
  m = mesh_lib.make_mesh(2, 2, 2)
  assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == AxisType.Auto for t in m.axis_types)
  assert dict(mesh_lib.make_mesh(data=-1, tensor=2).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert dict(mesh_lib.make_mesh(fsdp=-1).shape)["fsdp"] == 8
  with pytest.raises(ValueError, match="needs 12 devices"):
    mesh_lib.make_mesh(3, 2, 2)
  with pytest.raises(ValueError, match="at most one"):
    mesh_lib.make_mesh(-1, -1, 1)


@needs8
def test_logical_spec_rules_and_fallbacks():
  m = mesh_lib.make_mesh(2, 2, 2)
  assert mesh_lib.logical_spec(("vocab", "embed"), m) == P("tensor", "fsdp")
  assert mesh_lib.logical_spec(("embed", "heads", "head_dim"), m) == P("fsdp", "tensor", None)
  # 3 heads do not split over tensor=2: replicated along that dim
  assert mesh_lib.logical_spec(("embed", "heads", "head_dim"), m, shape=(32, 3, 8)) == P(
      "fsdp", None, None)
  # a mesh axis is used once per array
  assert mesh_lib.logical_spec(("heads", "mlp"), m) == P("tensor", None)
  # size-1 axes are dropped
  m1 = mesh_lib.make_mesh(data=8)
  assert mesh_lib.logical_spec(("vocab", "embed"), m1) == P(None, None)


TIMEOUTS = dict(heartbeat_timeout_seconds=100, initialization_timeout=300)  # mesh.py defaults


@needs8
def test_maybe_initialize_distributed_single_host(monkeypatch):
  monkeypatch.setenv("COT2ALIGN_PEER_RELAY", "0")  # keep this process's stderr as it is
  for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
            "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"):
    monkeypatch.delenv(k, raising=False)
  with mock.patch.object(jax.distributed, "initialize") as init:
    assert mesh_lib.maybe_initialize_distributed() is False
    init.assert_not_called()
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert mesh_lib.maybe_initialize_distributed() is True
    init.assert_called_once_with(coordinator_address="10.0.0.1:1234", **TIMEOUTS)


def test_maybe_initialize_distributed_passes_jax_env(monkeypatch):
  """jax's own detection reads the coordinator but not the process count / id: both are passed;
  a TPU pod slice sets only JAX_NUM_PROCESSES (the rest comes from the TPU metadata)."""
  monkeypatch.setenv("COT2ALIGN_PEER_RELAY", "0")
  monkeypatch.setenv("COT2ALIGN_HEARTBEAT_TIMEOUT", "15")
  for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
            "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
            "COT2ALIGN_DISTRIBUTED"):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  with mock.patch.object(jax.distributed, "initialize") as init, \
       mock.patch.object(jax, "process_index", return_value=3), \
       mock.patch.object(jax, "process_count", return_value=4):
    assert mesh_lib.maybe_initialize_distributed() is True
    init.assert_called_once_with(coordinator_address="10.0.0.1:1234", num_processes=4,
                                 process_id=3, heartbeat_timeout_seconds=15,
                                 initialization_timeout=300)
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
  monkeypatch.delenv("JAX_PROCESS_ID")
  with mock.patch.object(jax.distributed, "initialize") as init, \
       mock.patch.object(jax, "process_count", return_value=4):
    assert mesh_lib.maybe_initialize_distributed() is True
    init.assert_called_once_with(num_processes=4, heartbeat_timeout_seconds=15,
                                 initialization_timeout=300)
  with mock.patch.object(jax.distributed, "is_initialized", return_value=True), \
       mock.patch.object(jax.distributed, "initialize") as init:
    assert mesh_lib.maybe_initialize_distributed() is True
    init.assert_not_called()


@needs8
def test_train_step_on_2x2x2_mesh_matches_one_device():
  """cot2align (dskd_cma base, OT with the cross terms) on a (data 2, fsdp 2, tensor 2) mesh vs
  unsharded on one device, one step from the same state on the same batch.

  Tolerance: the sharded program reduces the same float32 numbers in a different order
  (partial matmul sums over fsdp/tensor, cross-device psums for the batch-global CE / KD / OT
  sums and the std normalisation), so results agree to float32 rounding amplified by the
  depth of the computation: 1e-5 relative on the loss and on each (sum, count) metric, 2e-4
  relative on the gradient norm. Updated parameters: Adam's first step is lr·g/(|g| + eps),
  ~lr·sign(g), so entries agree to 1e-6 absolute except where |g| is at the rounding level;
  we require 1e-6 absolute on 99.9% of entries and lr (= 1e-3) absolute on all.
  """
  prob = tiny.tiny_problem()
  batch = prob.batches(batch_size=8, n=1)[0]
  kd = KDConfig(method="cot2align", base="dskd_cma", ot=OTConfig(num_iters=10))
  opt_cfg = state_lib.OptimConfig(lr=1e-3, schedule="constant")
  su = tiny.make_setup(prob, kd, opt_cfg)
  state0 = jax.tree.map(jnp.copy, su.state)

  ref_state, ref_m = su.train_step(compiler_options=FAST)(su.state, su.teacher_params, batch)

  mesh = mesh_lib.make_mesh(2, 2, 2)
  s_sh = mesh_lib.state_shardings(state0, mesh)
  t_sh = mesh_lib.state_shardings(su.teacher_params, mesh)
  state = jax.device_put(state0, s_sh)
  tparams = jax.device_put(su.teacher_params, t_sh)
  with mock.patch.object(jax, "make_array_from_process_local_data",
                         wraps=jax.make_array_from_process_local_data) as spy:
    gbatch = mesh_lib.shard_batch(batch, mesh)
  assert spy.call_count == len(batch)
  assert gbatch["main/student/input_ids"].sharding.spec == P(("data", "fsdp"))
  assert len(gbatch["has_pair"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(gbatch["main/student/labels"]),
                                batch["main/student/labels"])

  # parameters and their Adam moments follow the logical rules
  emb = state.params["embed"]
  assert emb.sharding.spec == P("tensor", "fsdp")
  q = state.params["layers"][0]["attn"]["q"]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  mu = state.opt_state[1].inner_states["student"].inner_state[0].mu["student"]
  assert mu["embed"].sharding.spec == P("tensor", "fsdp")
  assert tparams["lm_head"].sharding.spec == P("fsdp", "tensor")

  step = su.train_step(mesh=mesh, state_shardings=s_sh, teacher_shardings=t_sh,
                       batch_shardings=mesh_lib.batch_shardings(batch, mesh),
                       compiler_options=FAST)
  new_state, m = step(state, tparams, gbatch)
  assert new_state.params["embed"].sharding.spec == P("tensor", "fsdp")

  for k in ref_m:
    if k == "grad_norm":
      np.testing.assert_allclose(np.asarray(m[k]), np.asarray(ref_m[k]), rtol=2e-4)
    else:
      np.testing.assert_allclose(np.asarray(m[k]), np.asarray(ref_m[k]), rtol=1e-5, atol=1e-6,
                                 err_msg=k)
  diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in
                          zip(jax.tree.leaves(new_state.trainable),
                              jax.tree.leaves(ref_state.trainable))])
  assert np.mean(diffs <= 1e-6) >= 0.999, np.sort(diffs)[-10:]
  assert diffs.max() <= 1e-3 + 1e-6
  assert int(new_state.step) == 1
