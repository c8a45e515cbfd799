"""Experiment configs: every file loads and converts; keys and defaults come from the section
dataclasses; the paper settings match docs/method.md §5; the CLI reports config mistakes in one
line with exit status 2."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from cot2align_jax.losses.methods import METHODS, KDConfig
from cot2align_jax.losses.ot import OTConfig
from cot2align_jax.training import config as C
from cot2align_jax.training.state import OptimConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ALL_FILES = sorted(p for p in CONFIGS.rglob("*.py") if not p.name.startswith("_"))
METHOD_NAMES = sorted({*METHODS, "cot2align"})


def _convert(cfg):
  """Every typed view of a config (LoRA switched off)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.student.lora.enabled = False
  C.validate(cfg)
  kd = C.kd_config(cfg)
  C.optim_config(cfg, total_steps=10)
  C.checkpoint_config(cfg)
  C.pipeline_config(cfg)
  C.train_config(cfg)
  C.data_config(cfg)
  C.mesh_config(cfg)
  return kd


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_file_loads(path):
  cfg = C.load_config(path)
  assert set(cfg.keys()) == set(C.section_defaults())
  _convert(cfg)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_methods_on_tiny(method):
  for cfg in (C.load_config(CONFIGS / "base.py", method),
              C.load_config(CONFIGS / "tiny.py", method)):
    kd = _convert(cfg)
    assert kd.method == method
  assert cfg.student.tiny and cfg.teacher.tiny


def test_tiny_base_override():
  for arg in ("cot2align,base=uld", "cot2align,uld", "base=uld,cot2align"):
    kd = _convert(C.load_config(CONFIGS / "tiny.py", arg))
    assert (kd.method, kd.base) == ("cot2align", "uld")
  assert C.load_config(CONFIGS / "tiny.py").kd.method == "sft"
  assert C.load_config(CONFIGS / "base.py").kd.method == "cot2align"
  assert C.pipeline_config(C.load_config(CONFIGS / "tiny.py", "mined")).alignment == ("mined",)
  assert C.pipeline_config(C.load_config(CONFIGS / "tiny.py", "sft")).alignment == ()
  kd = C.kd_config(C.load_config(CONFIGS / "tiny.py", "cot2align,base=mined"))
  assert C.method_of(kd).needs_vocab_map
  assert not C.method_of(C.kd_config(C.load_config(CONFIGS / "tiny.py", "cot2align"))
                         ).needs_vocab_map
  for old in ("cot2align:uld", "cot2align[uld]"):   # the old dialects are gone
    with pytest.raises(C.ConfigError, match="kd.method"):
      C.kd_config(C.load_config(CONFIGS / "tiny.py", old))
  with pytest.raises(C.ConfigError, match=r"configs/tiny.py: unknown key 'bas'"):
    C.load_config(CONFIGS / "tiny.py", "cot2align,bas=uld")


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
  proc = _cli("--config=configs/base.py:sft", "--config.student.path=/nonexistent/model",
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


def test_parse_arg_grammar():
  spec = {"method": "sft", "base": "", "size": 4, "scale": 0.5, "quick": False}
  a = C.parse_arg(None, spec)
  assert vars(a) == spec
  a = C.parse_arg("cot2align,base=uld", spec)
  assert (a.method, a.base, a.size) == ("cot2align", "uld", 4)
  a = C.parse_arg("kd,mined,8,scale=2,quick=true", spec)
  assert (a.method, a.base, a.size, a.scale, a.quick) == ("kd", "mined", 8, 2.0, True)
  assert isinstance(a.size, int) and isinstance(a.scale, float)
  a = C.parse_arg("base=uld,dskd", spec)   # a bare value fills the next key not given
  assert (a.method, a.base) == ("dskd", "uld")
  assert C.parse_arg("quick=0", spec).quick is False
  assert C.parse_arg("quick=1", spec).quick is True
  for bad, message in [("x=1", r"unknown key 'x'.*keys: method, base, size"),
                       ("a,b,1,0.1,true,extra", "too many values"),
                       ("size=big", "bad value 'big' for 'size'"),
                       ("quick=yes", "bad value 'yes' for 'quick'"),
                       ("kd,method=uld", "'method' given twice")]:
    with pytest.raises(C.ConfigError, match=message) as e:
      C.parse_arg(bad, spec, where="configs/tiny.py")
    assert str(e.value).startswith("configs/tiny.py: ") and "\n" not in str(e.value)


def test_keys_and_defaults_are_the_dataclass_fields():
  cfg = C.load_config(CONFIGS / "base.py")
  names = lambda cls: {f.name for f in dataclasses.fields(cls)}
  assert set(cfg.optim) == names(OptimConfig)
  assert set(cfg.train) == names(C.TrainConfig) and set(cfg.mesh) == names(C.MeshConfig)
  assert set(cfg.kd.ot) == names(OTConfig)
  assert set(cfg.student.lora) == names(C.LoRAConfig)
  assert set(cfg.data) == names(C.DataConfig) | set(C.PIPELINE_KEYS)
  assert "batch_size" in C.PIPELINE_KEYS and "num_epochs" not in C.PIPELINE_KEYS
  with_params = {n for n, m in METHODS.items() if m.params is not None}
  assert "multilevel_ot" in with_params
  assert set(cfg.kd) == (names(KDConfig) - {"method_params"}) | with_params
  # The values come from the dataclasses (base.py writes only what differs, e.g. the teacher).
  kd = C.kd_config(cfg)
  assert kd.ot == OTConfig() and kd.ot.epsilon == OTConfig().epsilon
  assert (kd.method, kd.base, kd.kd_rate) == (KDConfig().method, KDConfig().base,
                                              KDConfig().kd_rate)
  assert C.optim_config(cfg, total_steps=5) == dataclasses.replace(OptimConfig(), total_steps=5)
  assert C.train_config(cfg) == C.TrainConfig() and C.mesh_config(cfg) == C.MeshConfig()
  assert C.data_config(cfg) == C.DataConfig()
  assert C.model_spec(cfg, "student") == C.ModelSpec()
  assert C.model_spec(cfg, "teacher") == C.ModelSpec(dtype="bfloat16", param_dtype="bfloat16")
  assert dict(kd.method_params) == {n: METHODS[n].params() for n in with_params}


def test_method_params_and_typed_sections_reach_the_dataclasses():
  cfg = C.load_config(CONFIGS / "tiny.py", "multilevel_ot",
                      overrides={"kd.multilevel_ot.top_k": 3, "train.steps": 5,
                                 "mesh.fsdp": 2, "data.dev_max_examples": 4})
  assert dict(C.kd_config(cfg).method_params)["multilevel_ot"].top_k == 3
  assert C.train_config(cfg).steps == 5 and C.mesh_config(cfg).fsdp == 2
  assert C.data_config(cfg).dev_max_examples == 4
  with cfg.kd.multilevel_ot.unlocked():
    cfg.kd.multilevel_ot.bogus = 1
  with pytest.raises(C.ConfigError, match=r"unknown config key kd.multilevel_ot.bogus; valid "
                                          r"keys in kd.multilevel_ot: .*top_k"):
    C.validate(cfg)


def test_divergence_params_follow_the_divergence():
  cfg = C.load_config(CONFIGS / "tiny.py", "kd", overrides={"kd.divergence": "gjsd",
                                                            "kd.divergence_params.beta": 0.3})
  assert C.kd_config(cfg).divergence_params == (("beta", 0.3), ("normalize", False))
  cfg.kd.divergence = "fkl"
  assert C.kd_config(cfg).divergence_params == ()
  cfg.kd.divergence = "nope"
  with pytest.raises(C.ConfigError, match="kd.divergence: unknown divergence 'nope'"):
    C.kd_config(cfg)
  with pytest.raises(C.ConfigError, match="unknown config key 'kd.divergence_params.zeta'"):
    C.set_key(cfg, "kd.divergence_params.zeta", 1.0)


def test_config_file_args_use_one_grammar():
  assert C.load_config(CONFIGS / "real" / "gemma3_to_smollm2.py", "run=full").train.epochs == 20
  with pytest.raises(C.ConfigError, match="gemma3_to_smollm2.py: unknown arg 'fast'"):
    C.load_config(CONFIGS / "real" / "gemma3_to_smollm2.py", "fast")
  kd = C.kd_config(C.load_config(CONFIGS / "paper" / "qwen15_to_gpt2.py", "base=uld"))
  assert kd.base == "uld"
  with pytest.raises(C.ConfigError, match="base KD 'dskd' is not one of this setting's"):
    C.load_config(CONFIGS / "paper" / "qwen15_to_gpt2.py", "dskd")
  with pytest.raises(C.ConfigError, match="too many values"):
    C.load_config(CONFIGS / "base.py", "cot2align,uld,extra")
