"""The offline teacher cache (cot2align_jax.cache_teacher, data/teacher_cache.py) on the tiny
problem (configs/tiny.py): the cached step equals the online one, a cache for another teacher,
data or settings is refused in one line, an interrupted build resumes, and the CLIs."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx


from cot2align_jax.data import teacher_cache as cache_lib
from cot2align_jax.data.pipeline import Pipeline
from cot2align_jax.losses.methods import build_projectors
from cot2align_jax.training import config as C
from cot2align_jax.training import setup
from cot2align_jax.training import state as state_lib
from cot2align_jax.training import teacher_cache as run_cache
from cot2align_jax.training.steps import make_forward

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.py")


def _config(method: str, **overrides):
  return C.load_config(TINY, method, {"train.eval_every": -1, **overrides})


def _build(config, out, **kw):
  kw.setdefault("progress", False)
  return run_cache.build_cache(config, Path(out), **kw)


def _loss_and_grads(config, cached: bool):
  """[(loss, grads)] of the objective on two training batches (one without and one with paired
  views), with the teacher run online or read from the config's teacher.cache."""
  kd_cfg = C.kd_config(config)
  method = C.method_of(kd_cfg)
  problem = setup.build_problem(config, True, kd_cfg)
  cache, layout = run_cache.open_for_run(config, method, kd_cfg, problem.teacher_tok,
                                         problem.teacher, problem.train_records)
  assert (cache is not None) == cached
  pipe = Pipeline(problem.train_records, problem.student_tok, problem.teacher_tok,
                  dataclasses.replace(C.pipeline_config(config), num_epochs=1),
                  teacher_cache=cache)
  epoch = list(pipe)
  # a batch of plain records and one with CoT records (the paired views take part)
  batches = [next(b for b in epoch if not b["has_pair"].any()),
             next(b for b in epoch if b["has_pair"].any())]
  projectors = build_projectors(method, problem.student.config.hidden_size,
                                problem.teacher.config.hidden_size, rngs=nnx.Rngs(0), kd=kd_cfg)
  s_gd, s_params = state_lib.split_params(problem.student)
  p_gd, p_params = state_lib.split_params(projectors)
  t_gd, t_params = state_lib.split_params(problem.teacher)
  loss_fn = jax.jit(jax.value_and_grad(make_forward(s_gd, t_gd, p_gd, method, kd_cfg,
                                                    teacher_cache=layout), has_aux=True))
  out = []
  for b in batches:
    (loss, _), grads = loss_fn({"student": s_params, "proj": p_params}, t_params, b)
    out.append((float(loss), jax.tree.map(np.asarray, grads)))
  return out


def _max_rel(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  scale = max(float(np.max(np.abs(x))) for x in la)
  return max(float(np.max(np.abs(x - y))) for x, y in zip(la, lb)) / scale


CASES = {
    # the paper's layers ("ends": embedding output and final state), the teacher's paired view,
    # DSKD-CMA's teacher logits from the cached final state through the head
    "cot2align": ("cot2align", {}),
    # an intermediate layer ("all" states: only the used ones are cached) and chunked logits
    "cot2align_mid_chunked": ("cot2align", {"kd.ot.layers": ("embed", "mid", "final"),
                                            "kd.vocab_chunk": 16}),
    # no OT: the main view's final state only
    "dskd_cma": ("dskd_cma", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_cache_step_equals_online(case, tmp_path):
  method, overrides = CASES[case]
  config = _config(method, **overrides)
  summary = _build(config, tmp_path / "cache", dtype="float32")
  assert summary["records"] == len(setup.build_problem(config, True).train_records)
  online = _loss_and_grads(config, cached=False)
  cached = _loss_and_grads(_config(method, **overrides, **{"teacher.cache": str(
      tmp_path / "cache")}), cached=True)
  for (l_on, g_on), (l_c, g_c) in zip(online, cached):
    assert abs(l_c - l_on) <= 1e-5 * abs(l_on)
    assert _max_rel(g_c, g_on) <= 1e-4


def test_bfloat16_cache_is_close(tmp_path):
  """The default storage rounds the states to bfloat16 (8 bits of mantissa): the loss moves by
  about 1e-3 relative at most on the tiny problem, the gradients by a few percent of their
  largest entry."""
  _build(_config("cot2align"), tmp_path / "cache")
  online = _loss_and_grads(_config("cot2align"), cached=False)
  cached = _loss_and_grads(_config("cot2align", **{"teacher.cache": str(tmp_path / "cache")}),
                           cached=True)
  for (l_on, g_on), (l_c, g_c) in zip(online, cached):
    assert l_c != l_on
    assert abs(l_c - l_on) <= 1e-3 * abs(l_on)
    assert _max_rel(g_c, g_on) <= 5e-2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A bfloat16 cache of the tiny cot2align run in chunks of 3 batches."""
  out = tmp_path_factory.mktemp("tcache")
  summary = _build(_config("cot2align"), out, chunk_batches=3)
  return out, summary


def _open_for(config):
  kd_cfg = C.kd_config(config)
  method = C.method_of(kd_cfg)
  problem = setup.build_problem(config, True, kd_cfg)
  return run_cache.open_for_run(config, method, kd_cfg, problem.teacher_tok, problem.teacher,
                                problem.train_records)


@pytest.mark.parametrize("overrides, message", [
    ({"train.seed": 5}, "another teacher: its parameters differ"),
    ({"data.max_examples": 16}, "other training records"),
    ({"data.max_len": 60}, "data.max_len is 65 in the cache, 60 in the run"),
    ({"teacher.dtype": "bfloat16"}, "teacher.dtype is 'float32' in the cache"),
    ({"kd.ot.layers": ("embed", "mid", "final")}, "has hidden states of 2 x 48, the run needs 3"),
])
def test_mismatching_cache_is_refused(built, overrides, message):
  out, _ = built
  config = _config("cot2align", **overrides, **{"teacher.cache": str(out)})
  with pytest.raises(cache_lib.CacheError, match=message) as e:
    _open_for(config)
  assert "\n" not in str(e.value)


def test_cache_without_the_paired_view_is_refused(tmp_path):
  _build(_config("dskd_cma"), tmp_path / "c")
  with pytest.raises(cache_lib.CacheError, match="no 'pair' view"):
    _open_for(_config("cot2align", **{"teacher.cache": str(tmp_path / "c")}))


def test_missing_and_incomplete_cache(built, tmp_path):
  with pytest.raises(cache_lib.CacheError, match="no teacher cache at"):
    cache_lib.TeacherCache.open(tmp_path / "nothing")
  out, _ = built
  partial = tmp_path / "partial"
  partial.mkdir()
  for f in out.iterdir():
    if "done" not in f.name:
      (partial / f.name).write_bytes(f.read_bytes())
  with pytest.raises(cache_lib.CacheError, match="incomplete"):
    cache_lib.TeacherCache.open(partial)


def test_interrupted_build_resumes(built, tmp_path):
  """A build stopped after its first chunk (its later files absent, a half-written .tmp left)
  completes the missing chunks only, to the same entries."""
  out, summary = built
  assert summary["chunks"] >= 3 and summary["chunks_skipped"] == 0
  resumed = tmp_path / "resumed"
  resumed.mkdir()
  for name in ("manifest.json", "host000-00000.keys.npy", "host000-00000.array_record"):
    (resumed / name).write_bytes((out / name).read_bytes())
  (resumed / "host000-00001.array_record.tmp").write_bytes(b"half")
  again = _build(_config("cot2align"), resumed, chunk_batches=3)
  assert again["chunks_skipped"] == 1 and again["chunks"] == summary["chunks"]
  assert again["records"] == summary["records"]
  a, b = cache_lib.TeacherCache.open(out), cache_lib.TeacherCache.open(resumed)
  assert a.index == b.index
  for key, i in a.index.items():
    assert a.source[i] == b.source[b.index[key]]
  # resuming with other chunking is refused
  with pytest.raises(cache_lib.CacheError, match="chunk_batches=3"):
    _build(_config("cot2align"), resumed, chunk_batches=4)


def test_tokens_that_differ_from_the_cache_are_refused(built):
  """The per-row check: a row whose teacher tokens are not the cached ones (here: another
  record under a cached key) raises instead of training on the wrong states."""
  out, _ = built
  cache = cache_lib.TeacherCache.open(out)
  cache.check(cache.fingerprint, cache.layout)
  entry = cache.entry(0, False)
  row = {"example_id": 0, "has_pair": False,
         "main/teacher/input_ids": entry["main/ids"][::-1].copy(),
         "pair/teacher/input_ids": np.zeros((0,), np.int32)}
  with pytest.raises(cache_lib.CacheError, match="differ from the cached ones"):
    cache(row)


def _env(tmp):
  e = dict(os.environ)
  e.update(HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", COT2ALIGN_NO_PROGRESS="1",
           TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO) + os.pathsep +
           e.get("PYTHONPATH", ""),
           XLA_FLAGS=" ".join(f for f in e.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count")))
  return e


def _losses(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if r.get("split", "train") == "train" and "loss" in r]


def test_cli_cache_then_train(tmp_path):
  """cache_teacher's CLI, then training from it: the loss curve of the online run to bfloat16
  rounding; a method without a teacher is one line and exit 2."""
  env = _env(tmp_path)
  out = tmp_path / "cache"
  run = lambda *a: subprocess.run([sys.executable, "-m", *a], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=300)
  p = run("cot2align_jax.cache_teacher", "--config=configs/tiny.py:cot2align", f"--out={out}")
  assert p.returncode == 0, p.stderr[-2000:]
  assert json.loads(p.stdout.strip().splitlines()[-1])["records"] > 0
  losses = {}
  for name, extra in (("online", []), ("cached", [f"--config.teacher.cache={out}"])):
    w = tmp_path / name
    p = run("cot2align_jax.train", "--config=configs/tiny.py:cot2align", f"--workdir={w}",
            "--config.train.eval_every=-1", "--config.train.export=False", *extra)
    assert p.returncode == 0, p.stderr[-2000:]
    losses[name] = _losses(w)
  assert len(losses["cached"]) == len(losses["online"]) == 8
  np.testing.assert_allclose(losses["cached"], losses["online"], rtol=1e-4)
  p = run("cot2align_jax.cache_teacher", "--config=configs/tiny.py:sft", f"--out={tmp_path / 'x'}")
  assert p.returncode == 2
  assert p.stderr.strip().splitlines()[-1] == (
      "error: sft runs no teacher: there is nothing to cache")
