"""Export round trips through `transformers`, safetensors I/O, and the loader's error messages."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import cot2align_jax.models.hf as hf
from cot2align_jax.models import (ModelError, config_from_hf, create_model, from_pretrained,
                                  params_of, save_pretrained)
from cot2align_jax.data import toy_tokenizers
from cot2align_jax.models.safetensors_io import SafetensorsFile, save_file
from cot2align_jax.models.toy import toy_config
from tests.models.torch_ref import TINY, padded_batch, torch_forward, torch_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROUND_TRIP = ["gpt2", "llama_gqa_untied", "smollm2_like_tied_llama3_rope", "mistral_sliding",
              "qwen2_bias_padded_vocab", "gemma3"]


def _perturbed(cfg, seed):
  """Our random model with norms and biases moved off their init so they are exercised."""
  model = create_model(cfg, seed)
  params = params_of(model)
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  flat = {k: v + rng.normal(0, 0.1, v.shape).astype(v.dtype) for k, v in params.items()}
  pure = nnx.to_pure_dict(state)

  def fill(node, prefix=""):
    return {k: fill(v, f"{prefix}{k}/") if isinstance(v, dict) else jnp.asarray(flat[prefix + str(k)])
            for k, v in node.items()}
  nnx.replace_by_pure_dict(state, fill(pure))
  nnx.update(model, state)
  return model


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_export_loads_in_transformers_with_same_logits(name, tmp_path):
  ours = _perturbed(config_from_hf(TINY[name]), seed=7)
  save_pretrained(ours, tmp_path / "export")
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "export", attn_implementation="eager").float().eval()
  ids, mask = padded_batch(ours.config.vocab_size)
  ref_logits, ref_states = torch_forward(theirs, ids, mask)
  out = ours(ids, mask)
  diff = np.abs(np.asarray(out.logits) - ref_logits) * mask[..., None]
  assert diff.max() <= 1e-4
  # and back again: identical parameters
  again = params_of(from_pretrained(tmp_path / "export"))
  for k, v in params_of(ours).items():
    np.testing.assert_array_equal(again[k], v, err_msg=k)


def test_export_bfloat16_and_sharded(tmp_path):
  ours = _perturbed(config_from_hf(TINY["llama_gqa_untied"]), seed=3)
  out = save_pretrained(ours, tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=4096)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["dtype"] == "bfloat16"
  theirs = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  back = from_pretrained(out, dtype="float32")
  for k, v in params_of(ours).items():
    np.testing.assert_array_equal(params_of(back)[k], v.astype(ml_dtypes.bfloat16)
                                  .astype(np.float32), err_msg=k)
  ids, mask = padded_batch(ours.config.vocab_size)
  ref_logits, _ = torch_forward(theirs, ids, mask)
  assert np.max(np.abs(np.asarray(back(ids, mask).logits) - ref_logits) * mask[..., None]) < 1e-4


def test_export_is_atomic_on_failure(tmp_path, monkeypatch):
  ours = create_model(config_from_hf(TINY["gpt2"]), seed=0)
  target = save_pretrained(ours, tmp_path / "m")
  before = {p.name: p.read_bytes() for p in target.iterdir()}

  def boom(*a, **k):
    raise OSError("disk full")
  monkeypatch.setattr(hf, "save_file", boom)
  with pytest.raises(OSError):
    save_pretrained(create_model(config_from_hf(TINY["gpt2"]), seed=1), target)
  assert {p.name: p.read_bytes() for p in target.iterdir()} == before
  assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left


def test_safetensors_round_trip_all_dtypes(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
      "f32": rng.normal(size=(3, 4)).astype(np.float32),
      "bf16": rng.normal(size=(5,)).astype(ml_dtypes.bfloat16),
      "f16": rng.normal(size=(2, 2, 2)).astype(np.float16),
      "i64": np.arange(7, dtype=np.int64),
      "scalar": np.array(3.5, np.float32),
  }
  save_file(tensors, tmp_path / "t.safetensors")
  f = SafetensorsFile(tmp_path / "t.safetensors")
  assert set(f.keys()) == set(tensors)
  for k, v in tensors.items():
    assert f.get(k).dtype == v.dtype and f.get(k).shape == v.shape
    np.testing.assert_array_equal(f.get(k), v)
  # the reference reader agrees on the plain dtypes
  ref = safetensors.numpy.load_file(tmp_path / "t.safetensors")
  np.testing.assert_array_equal(ref["f32"], tensors["f32"])


def test_reads_bfloat16_checkpoints_from_transformers(tmp_path):
  ref = torch_model("smollm2_like_tied_llama3_rope").to(torch.bfloat16)
  ref.save_pretrained(tmp_path)
  ours = from_pretrained(tmp_path)  # float32 compute from bf16 storage
  # reload rather than ref.float(): the bf16 module also rounded its RoPE inv_freq buffer
  ref32 = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
  ids, mask = padded_batch(ours.config.vocab_size)
  ref_logits, _ = torch_forward(ref32, ids, mask)
  assert np.max(np.abs(np.asarray(ours(ids, mask).logits) - ref_logits) * mask[..., None]) < 1e-4


# ---------------------------------------------------------------------------- bad input

def _save_tiny(tmp_path, name="llama_gqa_untied"):
  ref = torch_model(name)
  ref.save_pretrained(tmp_path)
  return tmp_path


def test_unknown_model_type_lists_supported_families(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
  with pytest.raises(ModelError) as e:
    from_pretrained(tmp_path)
  msg = str(e.value)
  assert "\n" not in msg and "'bert'" in msg
  for t in ("gpt2", "llama", "mistral", "qwen2", "gemma3_text"):
    assert t in msg


def test_missing_tensor_is_named(tmp_path):
  path = _save_tiny(tmp_path)
  f = SafetensorsFile(path / "model.safetensors")
  tensors = {k: np.array(f.get(k)) for k in f.keys()
             if k != "model.layers.1.mlp.up_proj.weight"}
  del f
  save_file(tensors, path / "model.safetensors")
  with pytest.raises(ModelError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
    from_pretrained(path)


def test_wrong_shape_is_named(tmp_path):
  path = _save_tiny(tmp_path)
  cfg = json.loads((path / "config.json").read_text())
  cfg["intermediate_size"] = 40
  (path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ModelError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' does "
                                       r"not fit the config"):
    from_pretrained(path)


def test_nonexistent_path_and_pickles(tmp_path):
  with pytest.raises(ModelError, match="checkpoint not found: .*nope does not exist"):
    from_pretrained(tmp_path / "nope")
  with pytest.raises(ModelError, match="HF_HUB_OFFLINE"):
    from_pretrained("some-org/some-model")
  (tmp_path / "config.json").write_text(json.dumps(TINY["gpt2"]))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(ModelError, match="safetensors only"):
    from_pretrained(tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
  with pytest.raises(ModelError, match="not a readable safetensors file"):
    from_pretrained(tmp_path)


def test_bad_overrides_and_dtypes(tmp_path):
  path = _save_tiny(tmp_path)
  with pytest.raises(ModelError, match="unknown ModelConfig field"):
    from_pretrained(path, not_a_field=1)
  with pytest.raises(ModelError, match="not a dtype"):
    from_pretrained(path, dtype="float33")


def test_mixed_precision_params_and_compute(tmp_path):
  """bf16 params and compute still give float32 logits close to the float32 model."""
  path = _save_tiny(tmp_path)
  full = from_pretrained(path)
  half = from_pretrained(path, dtype="bfloat16")
  assert half.embed[...].dtype == jnp.bfloat16
  ids, mask = padded_batch(full.config.vocab_size)
  a, b = np.asarray(full(ids, mask).logits), half(ids, mask).logits
  assert b.dtype == jnp.float32
  assert np.max(np.abs(a - np.asarray(b)) * mask[..., None]) < 0.25 * np.abs(a).max()


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_saved_tokenizer_keeps_its_own_pipeline_beside_any_model_type(model_type, tmp_path):
  """A tokenizer trained with `tokenizers` and saved beside a model's config.json loads with
  its own pre-tokenizer, whatever the model type: AutoTokenizer alone maps qwen2 to
  Qwen2Tokenizer, whose byte-level pre-tokenizer dropped every space of a Metaspace BPE."""
  texts = ["Q: Ann has 7 pens. She buys 5 more.\nA: 7 + 5 = 12.", "Then he gives away 12."] * 20
  tok = toy_tokenizers.train_metaspace_bpe(texts, 120, name="metaspace")
  cfg = toy_config(model_type, vocab_size=128, valid_vocab_size=len(tok),
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, hidden_size=16,
                   num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
  save_pretrained(create_model(cfg, 0), tmp_path / "m", tokenizer=tok)
  assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == model_type
  loaded = hf.load_tokenizer(tmp_path / "m")
  text = "Q: Ann has 7 pens. 7 + 5 = 12.\nA: 12"
  assert loaded(text)["input_ids"] == tok(text)["input_ids"]
  assert loaded.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
  assert (loaded.eos_token, loaded.pad_token) == (tok.eos_token, tok.pad_token)
