"""Multi-process runs for real: the commands as a 2-process × 2-CPU-device JAX job on this
machine (coordinator on 127.0.0.1, the JAX_* variables launch/gpu.sh passes), against one process
with 4 devices on the same global batch (launch/README.md, "Rehearsing a multi-host run").

One shared set of runs (module fixtures, one persistent compilation cache):
* `reference`: tiny cot2align, 1 process × 4 devices, 12 steps.
* `killed`: the same as 2 processes; process 1 is SIGKILLed after step 5 (the step-4 checkpoint
  on disk); the survivor must exit non-zero with one error line within SURVIVOR_BOUND_S
  (its collective fails at once, or jax stops it after HEARTBEAT_S; whichever comes first).
* `restarted`: both processes restarted in the same workdir: they resume from the last
  finalized checkpoint and finish; loss curve and final params equal the reference's within
  the rounding of reordered sums.
* a 1-process run continuing the two-process checkpoint of step 8; evaluate (from the
  checkpoint) and generate_cot, each as 1 and as 2 processes: the same scores and texts.
* cache_teacher as 1 and as 2 processes (the same states), and a 2-process run from the cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cot2align_jax.data import teacher_cache
from cot2align_jax.data.pipeline import Pipeline
from cot2align_jax.models import from_pretrained, params_of
from cot2align_jax.training import peer_loss
from cot2align_jax.training import config as C
from cot2align_jax.training import setup
from tests.support.multiprocess import REPO, free_port, launch, wait_all

pytestmark = pytest.mark.slow

HEARTBEAT_S = 10                      # COT2ALIGN_HEARTBEAT_TIMEOUT of these runs
SURVIVOR_BOUND_S = HEARTBEAT_S + 50   # the survivor's exit after the kill (docs: timeout + slack)
TIMEOUT_S = 600
STEPS = 12
TRAIN = ["--config=configs/tiny.py:cot2align", "--config.mesh.data=-1",
         f"--config.train.steps={STEPS}", f"--config.optim.total_steps={STEPS}"]
RTOL, ATOL = 2e-5, 2e-6               # float32 sums in another order (per metric / parameter)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  e = dict(os.environ)
  e.update(HF_HUB_OFFLINE="1", COT2ALIGN_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false",
           COT2ALIGN_CACHE=str(tmp_path_factory.mktemp("cache")),
           JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
           COT2ALIGN_HEARTBEAT_TIMEOUT=str(HEARTBEAT_S),
           PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep +
           e.get("PYTHONPATH", ""))
  return e


def run(env, module, args, processes, devices=None):
  """Runs a command as a job of `processes` processes (4 devices in all); asserts exit 0."""
  procs = launch(module, args, env, processes=processes, devices=devices or 4 // processes)
  results = wait_all(procs, TIMEOUT_S)
  for i, (rc, out, err) in enumerate(results):
    assert rc == 0, f"{module} process {i} exited {rc}:\n{out[-2000:]}\n{err[-3000:]}"
  return results


def summary(result) -> dict:
  return json.loads(result[1].strip().splitlines()[-1])


def metrics(workdir, split="train"):
  rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if r["split"] == split]


def export_params(workdir):
  return params_of(from_pretrained(Path(workdir) / "export"))


def finalized_steps(ckpt_dir: Path) -> list[int]:
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()
                and (p / "state").is_dir()) if ckpt_dir.is_dir() else []


def assert_close_metrics(got, want, steps):
  assert [r["step"] for r in got] == [r["step"] for r in want] == list(steps)
  for g, w in zip(got, want):
    keys = {k for k, v in w.items() if isinstance(v, float) and k != "tokens_per_s"}
    assert keys and keys == {k for k, v in g.items() if isinstance(v, float)} - {"tokens_per_s"}
    for k in sorted(keys):
      np.testing.assert_allclose(g[k], w[k], rtol=RTOL, atol=ATOL, err_msg=f"step {w['step']} {k}")


def assert_close_params(got, want):
  assert got.keys() == want.keys() and got
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  work = tmp_path_factory.mktemp("ref")
  (res,) = run(env, "cot2align_jax.train", TRAIN + [f"--workdir={work}"], 1)
  assert summary(res)["step"] == STEPS
  return work


@pytest.fixture(scope="module")
def killed(env, tmp_path_factory, reference):
  """Two processes; process 1 SIGKILLed once step 5 is logged and checkpoint 4 is on disk."""
  work = tmp_path_factory.mktemp("two")
  procs = launch("cot2align_jax.train", TRAIN + [f"--workdir={work}"], env, processes=2,
                 devices=2)
  try:
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and all(p.poll() is None for p in procs):
      path = work / "metrics.jsonl"
      logged = [json.loads(l)["step"] for l in path.read_text().splitlines()] if (
          path.exists()) else []
      if logged and max(logged) >= 5 and 4 in finalized_steps(work / "checkpoints"):
        break
      time.sleep(0.05)
    assert all(p.poll() is None for p in procs), "a process ended before the kill"
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    out, err = procs[0].communicate(timeout=SURVIVOR_BOUND_S + 30)
    elapsed = time.time() - killed_at
    procs[1].communicate(timeout=30)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return {"work": work, "rc": procs[0].returncode, "stderr": err, "elapsed": elapsed,
          "last_step": max(finalized_steps(work / "checkpoints")),
          "logged": [r["step"] for r in metrics(work)]}


@pytest.fixture(scope="module")
def restarted(env, killed):
  """Both processes restarted by the documented rehearsal, `bash launch/gpu.sh rehearse`."""
  e = dict(env, VENV=sys.prefix, CONFIG=TRAIN[0].split("=", 1)[1], WORKDIR=str(killed["work"]),
           REHEARSE_PORT=str(free_port()))
  r = subprocess.run(["bash", str(REPO / "launch" / "gpu.sh"), "rehearse", *TRAIN[2:]], env=e,
                     cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
  assert r.returncode == 0, f"rehearse exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
  summaries = [json.loads(l) for l in r.stdout.splitlines() if l.startswith('{"step"')]
  assert len(summaries) == 2, r.stdout[-2000:]
  return killed["work"], summaries


def test_survivor_of_a_dead_peer_exits_with_one_line(killed):
  assert killed["rc"] != 0
  assert killed["elapsed"] < SURVIVOR_BOUND_S, killed["elapsed"]
  lines = [l for l in killed["stderr"].splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error:")]
  assert len(errors) == 1 and lines[-1] == errors[0], killed["stderr"][-3000:]
  # jax's abort (relay: which peer) or the failed collective (exit_on_peer_loss) came first
  assert re.search(r"^error: process 0 of 2: lost (peer process 1|a peer process) ", errors[0])
  assert "restart all 2 processes to resume from the last checkpoint" in errors[0]
  assert "Traceback" not in killed["stderr"] and "Check failure" not in killed["stderr"]


def test_restart_resumes_from_the_last_checkpoint(killed, restarted):
  work, summaries = restarted
  assert 5 <= max(killed["logged"]) < STEPS and killed["last_step"] in (4, 8)
  for s in summaries:
    assert s["resumed"] and s["start_step"] == killed["last_step"] and s["step"] == STEPS
  # process 0 alone writes metrics: each step once (lines past the checkpoint were dropped)
  assert [r["step"] for r in metrics(work)] == list(range(1, STEPS + 1))


def test_two_processes_follow_the_one_process_run(reference, restarted):
  work, _ = restarted
  assert_close_metrics(metrics(work), metrics(reference), range(1, STEPS + 1))
  assert_close_metrics(metrics(work, "dev"), metrics(reference, "dev"), (4, 8, 12))
  assert_close_params(export_params(work), export_params(reference))


def test_two_process_checkpoint_continues_in_one_process(env, reference, restarted,
                                                         tmp_path):
  work, _ = restarted
  one = tmp_path / "one"
  one.mkdir()
  shutil.copy(work / "metrics.jsonl", one / "metrics.jsonl")
  shutil.copytree(work / "checkpoints" / "8", one / "checkpoints" / "8")
  written_by = sorted(p.name for p in (one / "checkpoints" / "8" / "data_iter").iterdir()
                      if p.name.startswith("process_"))
  assert written_by == ["process_0-of-2.json", "process_1-of-2.json"]
  (res,) = run(env, "cot2align_jax.train", TRAIN + [f"--workdir={one}"], 1)
  s = summary(res)
  assert s["resumed"] and s["start_step"] == 8 and s["step"] == STEPS
  assert_close_metrics(metrics(one), metrics(reference), range(1, STEPS + 1))
  assert_close_params(export_params(one), export_params(reference))


def test_hosts_see_every_record_of_an_epoch_once():
  """The loop's pipelines (setup.build_problem / build_pipelines) for 2 hosts: the ids of one
  epoch over both hosts are every record once, and host 0's rows then host 1's are the
  one-process global batch."""
  config = C.load_config("configs/tiny.py", "cot2align")
  kd = C.kd_config(config)
  problem = setup.build_problem(config, C.method_of(kd).needs_teacher, kd)
  pipe = dataclasses.replace(C.pipeline_config(config), num_epochs=1, alignment=())
  global_batch = pipe.batch_size

  def epoch(index, count):
    cfg = dataclasses.replace(pipe, batch_size=global_batch // count, shard_index=index,
                              shard_count=count)
    p, _ = setup.build_pipelines(problem, cfg, None, with_dev=False)
    assert isinstance(p, Pipeline)
    return [b["example_id"] for b in p]

  hosts, (one,) = [epoch(i, 2) for i in range(2)], [epoch(0, 1)]
  n = len(problem.train_records)
  assert n % global_batch == 0 and len(hosts[0]) == len(hosts[1]) == len(one) == n // global_batch
  # A record's id is its example's (a plain and a CoT record share one): compare multisets.
  seen = Counter(int(i) for h in hosts for b in h for i in b if i >= 0)
  assert seen == Counter(int(r.example_index) for r in problem.train_records)
  assert all(i >= 0 for h in hosts for b in h for i in b)  # no padding rows in full batches
  for b0, b1, b in zip(*hosts, one):
    np.testing.assert_array_equal(np.concatenate([b0, b1]), b)


def test_teacher_cache_of_two_processes(env, reference, tmp_path):
  """cache_teacher as 2 processes: each writes its own shard's rows; the cache holds every
  record once with the one-process cache's states, and a 2-process run trained from it
  follows the online reference (float32 states: equal up to reordered sums)."""
  caches = {}
  for n in (1, 2):
    out = tmp_path / f"cache{n}"
    results = run(env, "cot2align_jax.cache_teacher",
                  ["--config=configs/tiny.py:cot2align", f"--out={out}", "--dtype=float32"], n)
    assert sum(summary(r)["records"] for r in results) == len(_train_records())
    caches[n] = teacher_cache.TeacherCache.open(out)
  assert sorted(p.name for p in (tmp_path / "cache2").glob("*.done.json")) == [
      "host000.done.json", "host001.done.json"]
  one, two = caches[1], caches[2]
  assert one.index.keys() == two.index.keys() and len(one) == len(_train_records())
  for key in one.index:
    a, b = (c.entry(key // 2, bool(key % 2)) for c in (one, two))
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=f"{key} {k}")
  work = tmp_path / "cached_run"
  run(env, "cot2align_jax.train", TRAIN + [f"--workdir={work}",
                                            f"--config.teacher.cache={tmp_path / 'cache2'}"], 2)
  got, want = metrics(work), metrics(reference)
  assert [r["step"] for r in got] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-4)


def _train_records():
  config = C.load_config("configs/tiny.py", "cot2align")
  return setup.build_problem(config, False).train_records


def _eval_args(workdir):
  return ["--config=configs/tiny.py:cot2align", f"--workdir={workdir}", "--nouse_export",
          "--seeds=10,20", "--max_examples=8", "--batch_size=4", "--max_new_tokens=8",
          "--config.mesh.data=-1"]


def test_evaluate_two_processes_equal_one(env, restarted, tmp_path):
  work, _ = restarted
  runs = {}
  for n in (1, 2):
    w = tmp_path / f"eval{n}"
    shutil.copytree(work / "checkpoints" / str(STEPS), w / "checkpoints" / str(STEPS))
    run(env, "cot2align_jax.evaluate", _eval_args(w), n)
    report = json.loads((w / "eval" / "eval_results.json").read_text())
    gens = {p.name: p.read_text() for p in sorted((w / "eval" / "generations").iterdir())}
    runs[n] = ([(r["name"], r["scores"]) for r in report["results"]], gens,
               report["meta"]["model"])
  assert runs[1][0] == runs[2][0] and runs[1][0][0][0] == "tiny/test"
  assert runs[1][1] == runs[2][1] and len(runs[1][1]) == 2
  assert all(len(t.splitlines()) == 8 for t in runs[2][1].values())
  assert runs[2][2].endswith(f"@{STEPS}")


def test_generate_cot_two_processes_equal_one(env, tmp_path):
  files = {}
  for n in (1, 2):
    out = tmp_path / f"rationales{n}.jsonl"
    run(env, "cot2align_jax.generate_cot",
        ["--config=configs/tiny.py:cot2align", f"--out={out}", "--config.data.max_examples=8",
         "--max_new_tokens=8", "--batch_size=4", "--config.mesh.data=-1"], n)
    files[n] = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["id"] for r in files[2]] == [f"tiny/train/{i}" for i in range(8)]
  assert files[1] == files[2]


JAX_DUMP = b"""E1203 14:55:10.055312    4811 coordination_service.cc:1549] Use error polling to propagate \
the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped \
sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error.
F1203 14:55:10.055808    4822 client.h:80] Terminating process because the JAX distributed \
service detected fatal errors. This most likely indicates that another task died
*** Check failure stack trace: ***
    @     0x7f6f9d640634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
"""


def _relayed(data: bytes) -> bytes:
  r_in, w_in = os.pipe()
  r_out, w_out = os.pipe()
  os.write(w_in, data)
  os.close(w_in)
  peer_loss.relay(r_in, w_out, 0, 2)
  os.close(w_out)
  out = os.read(r_out, 1 << 20)
  os.close(r_in)
  os.close(r_out)
  return out


def test_relay_replaces_jax_dump_with_one_line():
  normal = b"I1203 mesh.py:286] jax.distributed: process 0 of 2\ntrain: 40%\rtrain: 50%\n"
  out = _relayed(normal + JAX_DUMP)
  assert out == normal + (peer_loss.peer_loss_line(0, 2, JAX_DUMP) + "\n").encode()
  assert "lost peer process 1 " in peer_loss.peer_loss_line(0, 2, JAX_DUMP)
  # coordination lines that are not followed by jax's fatal line pass unchanged
  benign = JAX_DUMP.split(b"F1203")[0]
  assert _relayed(normal + benign) == normal + benign
