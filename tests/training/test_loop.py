"""The training loop and CLI end to end on the tiny problem (configs/tiny.py), in subprocesses.

* sft and cot2align through `python -m cot2align_jax.train`: metrics.jsonl, TensorBoard events,
  a checkpoint and an export that `from_pretrained` loads.
* exact resume: run A trains 2N steps; run B trains in a subprocess that is SIGKILLed after its
  step-N checkpoint is on disk (and after two more steps whose log lines must be discarded),
  then resumes through the CLI to 2N. Final params and every per-step metric are bitwise equal
  (CPU, same device count, same compiled programs: there is no source of non-determinism).
* SIGTERM mid-run: exit status 0, a checkpoint at the step reached, and a resumed run from it.

The subprocesses share a persistent JAX compilation cache (one tmp dir per test session), so
the identical sft programs are compiled once; they run on one CPU device (no fake devices).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
N = 4  # checkpoint interval; run A trains 2N steps
TIMEOUT = 300


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  e = dict(os.environ)
  flags = [f for f in e.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  e.update(XLA_FLAGS=" ".join(flags), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
           COT2ALIGN_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false",
           COT2ALIGN_CACHE=str(tmp_path_factory.mktemp("cache")),
           JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
           PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""))
  return e


# The sft runs of the resume and SIGTERM tests: identical programs (optim.total_steps pinned).
SFT = ["--config.optim.total_steps=8", f"--config.checkpoint.save_every={N}"]


def cli_args(workdir, config="configs/tiny.py:sft", *overrides):
  return [sys.executable, "-m", "cot2align_jax.train", f"--config={config}",
          f"--workdir={workdir}", *overrides]


def run_cli(env, workdir, config="configs/tiny.py:sft", *overrides):
  proc = subprocess.run(cli_args(workdir, config, *overrides), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def read_metrics(workdir, split="train"):
  rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows
          if r["split"] == split]


def export_params(workdir):
  from cot2align_jax.models import from_pretrained, params_of
  return params_of(from_pretrained(Path(workdir) / "export"))


def check_outputs(workdir, steps):
  w = Path(workdir)
  train_rows = read_metrics(w)
  assert [r["step"] for r in train_rows] == list(range(1, steps + 1))
  assert all(np.isfinite(r["loss"]) for r in train_rows)
  assert list((w / "tb").glob("events.out.tfevents.*"))
  assert (w / "checkpoints" / str(steps)).is_dir()
  params = export_params(w)
  assert params and all(np.all(np.isfinite(v)) for v in params.values())
  return params


def finalized(ckpt_dir: Path, step: int) -> bool:
  """Orbax renames <step>.orbax-checkpoint-tmp* to <step> once every item is committed."""
  return (ckpt_dir / str(step) / "state").is_dir()


KILL_SCRIPT = """
import sys, time
from cot2align_jax.training import config as C, loop
cfg = C.load_config("configs/tiny.py", "sft", overrides={overrides!r})
def hook(step):
  if step == {pause}:
    print("PAUSED", flush=True)
    time.sleep(600)
loop.train(cfg, {workdir!r}, after_step=hook)
"""


def test_sft_cli_and_exact_resume_after_sigkill(env, tmp_path):
  # Run A: 2N steps uninterrupted (also the sft end-to-end run of the CLI).
  a = tmp_path / "a"
  summary = run_cli(env, a, "configs/tiny.py:sft", *SFT, f"--config.train.steps={2 * N}")
  assert summary["step"] == 2 * N and not summary["resumed"]
  params_a = check_outputs(a, 2 * N)
  assert [r["step"] for r in read_metrics(a, "dev")] == [N, 2 * N]

  # Run B, part 1: killed with SIGKILL at step N + 2, once the step-N checkpoint is on disk.
  b = tmp_path / "b"
  overrides = {"optim.total_steps": 8, "checkpoint.save_every": N, "train.steps": 2 * N}
  script = KILL_SCRIPT.format(overrides=overrides, pause=N + 2, workdir=str(b))
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert line.strip() == "PAUSED", proc.stderr.read()[-3000:]
    deadline = time.time() + 60
    while not finalized(b / "checkpoints", N) and time.time() < deadline:
      time.sleep(0.1)
    assert finalized(b / "checkpoints", N)
    assert [r["step"] for r in read_metrics(b)] == list(range(1, N + 3))
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
  assert proc.returncode == -signal.SIGKILL

  # Run B, part 2: the CLI resumes from step N and trains to 2N.
  summary = run_cli(env, b, "configs/tiny.py:sft", *SFT, f"--config.train.steps={2 * N}")
  assert summary["resumed"] and summary["start_step"] == N and summary["step"] == 2 * N
  params_b = check_outputs(b, 2 * N)

  assert read_metrics(a) == read_metrics(b)  # every per-step metric, bitwise (JSON repr)
  assert read_metrics(a, "dev") == read_metrics(b, "dev")
  assert params_a.keys() == params_b.keys()
  for k in params_a:
    np.testing.assert_array_equal(params_a[k], params_b[k], err_msg=k)


def test_sigterm_saves_and_exits_zero_then_resumes(env, tmp_path):
  w = tmp_path / "t"
  args = cli_args(w, "configs/tiny.py:sft", *SFT, "--config.train.steps=100000",
                  "--config.train.eval_every=-1", "--config.checkpoint.best_metric=")
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = w / "metrics.jsonl"
  deadline = time.time() + TIMEOUT
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  stopped = summary["step"]
  assert summary["preempted"] and 2 <= stopped < 100000
  assert finalized(w / "checkpoints", stopped)
  assert summary["export"] is None

  resumed = run_cli(env, w, "configs/tiny.py:sft", *SFT, f"--config.train.steps={stopped + 2}",
                    "--config.train.eval_every=-1", "--config.checkpoint.best_metric=")
  assert resumed["resumed"] and resumed["start_step"] == stopped
  assert resumed["step"] == stopped + 2 and not resumed["preempted"]
  steps = [r["step"] for r in read_metrics(w)]
  assert steps == list(range(1, stopped + 3))
  assert (w / "export" / "config.json").exists()


def test_cot2align_cli_end_to_end(env, tmp_path):
  w = tmp_path / "c"
  summary = run_cli(env, w, "configs/tiny.py:cot2align", "--config.train.steps=2",
                    "--config.checkpoint.save_every=2", "--config.train.eval_every=-1",
                    "--config.checkpoint.best_metric=")
  assert summary["step"] == 2
  check_outputs(w, 2)
  row = read_metrics(w)[-1]
  assert {"ce", "kd", "ot/total", "loss", "grad_norm", "lr"} <= set(row)
  assert row["ot/total"] > 0


def test_plain_kd_across_vocabularies_is_a_config_error(tmp_path):
  from cot2align_jax.training import config as C
  from cot2align_jax.training import loop
  cfg = C.load_config(REPO / "configs" / "tiny.py", "kd")
  with pytest.raises(C.ConfigError, match="kd .plain KD. needs the same vocabulary"):
    loop.train(cfg, tmp_path / "kd")


def test_records_from_shared_data(shared):
  """CoT2Align without rationales stops with one line; cot_rule=none trains on plain records."""
  from cot2align_jax.training import config as C
  from cot2align_jax.training import setup
  cfg = C.load_config(REPO / "configs" / "base.py", "cot2align",
                      overrides={"data.source": str(shared / "data"), "data.max_examples": 4})
  with pytest.raises(C.ConfigError, match="needs CoT rationales"):
    setup.read_records(cfg)
  C.set_key(cfg, "data.cot_rule", "none")
  C.set_key(cfg, "data.dev_max_examples", 2)
  train_records, dev_records, dev_examples = setup.read_records(cfg)
  assert len(train_records) == 4 and len(dev_records) == len(dev_examples) == 2
  assert not any(r.has_pair for r in train_records)


def test_dev_metric_uses_the_config_lengths_and_the_sets_prompts(tmp_path, monkeypatch):
  """train.dev_metric=rouge_l samples with data.max_prompt / data.max_len and, for a "qa" set
  (the demo's arith), its short prompts, scored with the set's metric (exact match)."""
  from cot2align_jax.demo import stages as demo_lib
  from cot2align_jax.evaluation import protocol as ev
  from cot2align_jax.training import loop
  d = demo_lib.make_demo(str(tmp_path / "demo"), "ci", "sft", 0, str(REPO / "configs" / "demo.py"))
  demo_lib.stage_data(d)
  cfg = d.config("sft")
  cfg.train.steps, cfg.train.eval_every, cfg.train.dev_metric = 2, 2, "rouge_l"
  cfg.data.dev_max_examples = 4
  cfg.teacher.path = ""  # sft needs no teacher (the demo has not trained one here)
  seen = []
  real = ev.evaluate_set

  def spy(generator, name, examples, seeds=ev.DEFAULT_SEEDS, **kw):
    seen.append((generator.settings, kw.get("prompt_fn")(examples[0]), ev.metric_for(examples)))
    return real(generator, name, examples, seeds, **kw)

  monkeypatch.setattr(ev, "evaluate_set", spy)
  summary = loop.train(cfg, tmp_path / "run")
  (settings, prompt, metric), = seen
  assert (settings.max_length, settings.max_prompt_length) == (65, 48)
  assert prompt.startswith("Q: ") and prompt.endswith("\nA:") and metric == "exact_match"
  assert 0.0 <= summary["dev_metrics"]["dev/rouge_l"] <= 100.0
