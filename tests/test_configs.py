"""Experiment configs: every file loads and converts; the paper settings match METHOD.md §5; the
CLI reports config mistakes in one line with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from cot2align_jax.training import config as C

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ALL_FILES = sorted(p for p in CONFIGS.rglob("*.py") if not p.name.startswith("_"))
METHODS = sorted(p.stem for p in (CONFIGS / "methods").glob("*.py"))


def _convert(cfg):
  """Every typed view of a config (LoRA switched off)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.student.lora.enabled = False
  C.validate(cfg)
  kd = C.kd_config(cfg)
  C.optim_config(cfg, total_steps=10)
  C.checkpoint_config(cfg)
  C.pipeline_config(cfg, alignment=C.alignment_for(kd))
  return kd


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_file_loads(path):
  cfg = C.load_config(path)
  assert tuple(cfg.keys()) == tuple(sorted(C.SECTIONS)) or set(cfg.keys()) == set(C.SECTIONS)
  _convert(cfg)


@pytest.mark.parametrize("method", METHODS)
def test_methods_on_tiny(method):
  for cfg in (C.load_config(CONFIGS / "methods" / f"{method}.py", "tiny"),
              C.load_config(CONFIGS / "tiny.py", method)):
    kd = _convert(cfg)
    assert kd.method == method and cfg.student.tiny and cfg.teacher.tiny


def test_tiny_base_override():
  kd = _convert(C.load_config(CONFIGS / "tiny.py", "cot2align:uld"))
  assert (kd.method, kd.base) == ("cot2align", "uld")
  assert C.alignment_for(C.kd_config(C.load_config(CONFIGS / "tiny.py", "mined"))) == ("mined",)
  assert C.needs_vocab_map(C.kd_config(C.load_config(CONFIGS / "tiny.py", "cot2align:mined")))


# setting: (teacher, student, base, kd_rate, divergence, lr, epochs, lora)
PAPER = {
    "qwen15_to_gpt2": ("Qwen/Qwen1.5-1.8B", "gpt2", "dskd_cma", 0.5, "srkl", 5e-4, 20, False),
    "gpt2xl_to_gpt2": ("gpt2-xl", "gpt2", "kd", 0.7, "fkl", 5e-4, 20, False),
    "mistral_to_tinyllama": ("mistralai/Mistral-7B-v0.1",
                             "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "dskd_cma",
                             0.9, "fkl", 1e-3, 10, True),
    "llama2_to_tinyllama": ("meta-llama/Llama-2-7b-hf",
                            "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "kd", 0.6,
                            "fkl", 1e-3, 10, True),
    "qwen25_to_gpt2_1_5b": ("Qwen/Qwen2.5-7B-Instruct", "gpt2-xl", "dskd_cma", 0.9, "fkl", 1e-3,
                            10, True),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_settings(name):
  teacher, student, base, rate, div, lr, epochs, lora = PAPER[name]
  cfg = C.load_config(CONFIGS / "paper" / f"{name}.py")
  assert (cfg.teacher.path, cfg.student.path) == (teacher, student)
  kd = _convert(cfg)
  assert (kd.method, kd.base, kd.kd_rate, kd.divergence, kd.temperature) == (
      "cot2align", base, rate, div, 2.0)
  if div == "srkl":
    assert kd.divergence_params == (("lam", 0.1),)
  assert (kd.ot.epsilon, kd.ot.num_iters, kd.ot.cost, kd.ot.ot_term_scale) == (
      10.0, 100, "attention", 0.25)
  opt = C.optim_config(cfg, total_steps=100)
  assert (opt.lr, opt.proj_lr, opt.weight_decay, opt.schedule, opt.warmup_steps, opt.end_lr,
          opt.clip_norm) == (lr, 1e-3, 0.01, "cosine", 0, 1e-7, 1.0)
  assert (cfg.data.batch_size, cfg.data.max_len, cfg.data.max_prompt) == (32, 512, 256)
  assert (cfg.train.epochs, cfg.train.seed, cfg.train.eval_every) == (epochs, 10, 0)
  assert (cfg.checkpoint.best_metric, cfg.checkpoint.best_mode) == ("dev/rouge_l", "max")
  assert cfg.student.lora.enabled == lora
  if lora:
    assert (cfg.student.lora.rank, cfg.student.lora.alpha) == (256, 8)
    C.validate(cfg)  # LoRA enabled converts (tests/models/test_lora.py checks the mapping)


@pytest.mark.parametrize("name,arg,rate", [("mistral_to_tinyllama", "mined", 0.5),
                                           ("mistral_to_tinyllama", "uld", 0.5),
                                           ("qwen25_to_gpt2_1_5b", "uld", 0.6),
                                           ("qwen25_to_gpt2_1_5b", "mined", 0.6)])
def test_paper_alternative_bases(name, arg, rate):
  kd = _convert(C.load_config(CONFIGS / "paper" / f"{name}.py", arg))
  assert (kd.base, kd.kd_rate) == (arg, rate)


def test_unknown_keys_rejected_in_one_line():
  cfg = C.load_config(CONFIGS / "tiny.py", "sft")
  with pytest.raises(C.ConfigError, match=r"unknown config key 'optim.lrr'.*valid keys:.*lr"):
    C.set_key(cfg, "optim.lrr", 1.0)
  with cfg.kd.ot.unlocked():
    cfg.kd.ot.bogus = 1
  with pytest.raises(C.ConfigError) as e:
    C.kd_config(cfg)
  assert "kd.ot.bogus" in str(e.value) and "epsilon" in str(e.value)
  assert "\n" not in str(e.value)
  cfg = C.load_config(CONFIGS / "tiny.py", "sft")
  with cfg.unlocked():
    cfg.extra = ml_collections.ConfigDict({"a": 1})
  with pytest.raises(C.ConfigError, match="unknown config key <top>.extra"):
    C.validate(cfg)


def test_load_config_overrides():
  cfg = C.load_config(CONFIGS / "tiny.py", "kd", overrides={"train.steps": 3,
                                                            "kd.ot.terms": ("same",)})
  assert cfg.train.steps == 3 and C.kd_config(cfg).ot.terms == ("same",)


def _cli(*args, timeout=120):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "cot2align_jax.train", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--config=configs/tiny.py:sft", "--config.train.stepz=3"],
     "error: unknown config key 'train.stepz': no 'stepz' in train; valid keys: dev_metric, "),
    (["--config=configs/tiny.py", "--config.nosection.x=1"],
     "error: unknown config key 'nosection.x'"),
    (["--config=configs/does_not_exist.py"], "error: config file not found: "),
    (["--config=configs/tiny.py", "--config.train.steps=abc"], "error: flag --config.train.steps"),
])
def test_cli_config_errors_are_one_line(args, message, tmp_path):
  proc = _cli(*args, f"--workdir={tmp_path}")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith(message), proc.stderr
  assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_cli_missing_model_path_is_one_line(tmp_path):
  proc = _cli("--config=configs/methods/sft.py", "--config.student.path=/nonexistent/model",
              f"--workdir={tmp_path}")
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1] == ("error: student.path: checkpoint not found: /nonexistent/model does not "
                       "exist"), proc.stderr
  assert "Traceback" not in proc.stderr


def test_teacher_sharding_choice():
  cfg = C.load_config(CONFIGS / "tiny.py", "cot2align")
  assert C.model_spec(cfg, "teacher").sharding == "rules"
  cfg.teacher.sharding = "replicated"
  assert C.model_spec(cfg, "teacher").sharding == "replicated"
  cfg.teacher.sharding = "mirrored"
  with pytest.raises(C.ConfigError, match="sharding must be 'rules' or 'replicated'"):
    C.model_spec(cfg, "teacher")
