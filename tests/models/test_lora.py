"""LoRA on the student: rank 0 changes nothing, B = 0 reproduces the base model, the export merges
the factors, a train step moves only the factors, and the paper's LoRA configs convert."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from cot2align_jax.losses.methods import KDConfig
from cot2align_jax.models import config_from_hf, create_model, from_pretrained, params_of
from cot2align_jax.models import save_pretrained
from cot2align_jax.models.layers import LoRAParam
from cot2align_jax.models.toy import tiny_student_config
from cot2align_jax.training import config as C
from cot2align_jax.training import state as state_lib
from tests.models.torch_ref import TINY, padded_batch
from tests.support import tiny

ALL = ("q", "k", "v", "o", "gate", "up", "down")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _lora(cfg, rank=4, alpha=8.0, targets=ALL):
  return cfg.replace(lora_rank=rank, lora_alpha=alpha, lora_targets=targets)


def _randomize_b(model, seed=0):
  """Nonzero LoRA B factors (A is random already), so the LoRA term is exercised."""
  state = nnx.state(model, LoRAParam)
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
  new = jax.tree.map(lambda x: x, state)
  for path, var in nnx.to_flat_state(new):
    if path[-1].endswith("_lora_b"):
      var[...] = 0.5 * jax.random.normal(next(keys), var[...].shape, var[...].dtype)
  nnx.update(model, new)
  return model


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_untied"])
def test_rank0_and_zero_b_match_base(name):
  cfg = config_from_hf(TINY[name])
  base = create_model(cfg, seed=3)
  ids, mask = padded_batch(cfg.vocab_size)
  ref = np.asarray(base(ids, mask).logits)
  # rank 0: identical parameters and logits
  same = create_model(cfg.replace(lora_alpha=16.0, lora_targets=ALL), seed=3)
  assert params_of(same).keys() == params_of(base).keys()
  np.testing.assert_array_equal(np.asarray(same(ids, mask).logits), ref)
  # LoRA with B = 0: same base weights (factors are drawn last) and the same logits
  lora = create_model(_lora(cfg), seed=3)
  p_base, p_lora = params_of(base), params_of(lora)
  extra = set(p_lora) - set(p_base)
  assert extra and all("_lora_" in k for k in extra)
  for k, v in p_base.items():
    np.testing.assert_array_equal(p_lora[k], v, err_msg=k)
  np.testing.assert_allclose(np.asarray(lora(ids, mask).logits), ref, atol=1e-6, rtol=0)
  if not cfg.gated_mlp:
    assert not any("gate_lora" in k for k in extra)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_untied"])
def test_merged_export_equals_lora_forward(name, tmp_path):
  cfg = _lora(config_from_hf(TINY[name]))
  model = _randomize_b(create_model(cfg, seed=5))
  ids, mask = padded_batch(cfg.vocab_size)
  out = np.asarray(model(ids, mask).logits)
  base_out = np.asarray(create_model(cfg.replace(lora_rank=0), seed=5)(ids, mask).logits)
  assert np.abs(out - base_out).max() > 1e-3  # the LoRA term matters
  save_pretrained(model, tmp_path / "export")
  reloaded = from_pretrained(tmp_path / "export")
  assert reloaded.config.lora_rank == 0
  assert not any("_lora_" in k for k in params_of(reloaded))
  np.testing.assert_allclose(np.asarray(reloaded(ids, mask).logits), out, atol=1e-4, rtol=1e-4)
  # loading a plain checkpoint with LoRA on: base weights from the files, fresh factors (B = 0)
  again = from_pretrained(tmp_path / "export", seed=1, lora_rank=2, lora_targets=("q", "down"))
  np.testing.assert_allclose(np.asarray(again(ids, mask).logits), out, atol=1e-4, rtol=1e-4)


def test_train_step_moves_only_lora_params():
  prob = tiny.tiny_problem()
  student = create_model(_lora(prob.student_cfg, rank=8, alpha=16.0), seed=0)
  kd = KDConfig(method="sft")
  opt_cfg = state_lib.OptimConfig(lr=1e-2, schedule="constant", total_steps=100)
  su = tiny.make_setup(prob, kd, opt_cfg, student=student)
  step = su.train_step(compiler_options={"xla_backend_optimization_level": 0,
                                         "xla_llvm_disable_expensive_passes": True})
  before = jax.tree.map(np.asarray, su.state.params)
  batches = prob.batches(batch_size=8, n=4)
  state, losses = su.state, []
  for i in range(20):
    state, m = step(state, su.teacher_params, batches[i % len(batches)])
    losses.append(float(m["loss"][0] / m["loss"][1]))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.96 * losses[0], losses  # frozen random base: slow
  n_lora = n_base = 0
  for (path, old), (_, new) in zip(nnx.to_flat_state(nnx.State(before)),
                                   nnx.to_flat_state(state.params)):
    if isinstance(new, LoRAParam):
      n_lora += 1
      if path[-1].endswith("_lora_b"):
        assert np.abs(np.asarray(new[...])).max() > 0, path
    else:
      n_base += 1
      np.testing.assert_array_equal(np.asarray(new[...]), np.asarray(old[...]), err_msg=str(path))
  assert n_lora and n_base
  # no AdamW moments for frozen weights
  n_moments = sum(x.size for x in jax.tree.leaves(state.opt_state))
  n_lora_size = sum(x.size for x in jax.tree.leaves(nnx.state(student, LoRAParam)))
  n_proj = sum(x.size for x in jax.tree.leaves(state.proj))
  assert n_moments <= 2 * (n_lora_size + n_proj) + 16


def test_labels_and_decay():
  model = create_model(_lora(tiny_student_config(40, d=16, layers=1), targets=("q", "up")), 0)
  _, params = state_lib.split_params(model)
  labels = state_lib._labels({"student": params, "proj": nnx.State({})})
  flat = dict(nnx.to_flat_state(labels["student"]))
  assert flat[("layers", 0, "attn", "q_lora_a")].get_value() == "student"
  assert flat[("layers", 0, "attn", "q")].get_value() == state_lib.FROZEN
  assert flat[("embed",)].get_value() == state_lib.FROZEN
  mask = dict(nnx.to_flat_state(state_lib.decay_mask(params)))
  assert mask[("layers", 0, "mlp", "up_lora_b")].get_value()


@pytest.mark.parametrize("name,targets", [
    ("mistral_to_tinyllama", ALL), ("llama2_to_tinyllama", ALL),
    ("qwen25_to_gpt2_1_5b", ("q", "k", "v", "o", "up", "down"))])
def test_paper_lora_config_converts(name, targets):
  cfg = C.load_config(CONFIGS / "paper" / f"{name}.py")
  assert cfg.student.lora.enabled
  C.validate(cfg)
  over = C.lora_overrides(C.model_spec(cfg, "student"))
  assert over == {"lora_rank": 256, "lora_alpha": 8.0, "lora_targets": targets}
  assert C.lora_overrides(C.model_spec(cfg, "teacher")) == {}


def test_bad_lora_configs():
  cfg = C.load_config(CONFIGS / "paper" / "mistral_to_tinyllama.py")
  cfg.student.lora.target_modules = ("q_proj", "nope")
  with pytest.raises(C.ConfigError, match="student.lora.target_modules: unknown module 'nope'"):
    C.validate(cfg)
  cfg = C.load_config(CONFIGS / "paper" / "mistral_to_tinyllama.py")
  cfg.teacher.lora.enabled = True
  with pytest.raises(C.ConfigError, match="student only"):
    C.validate(cfg)
