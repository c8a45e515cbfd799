"""The registry of decoder families and the small helpers their weight maps share.

A family module (`gpt2.py`, `llama.py`, `gemma3.py`) provides:
  MODEL_TYPES                      HF `model_type` values it reads
  config_from_hf(hf: dict) -> ModelConfig
  config_to_hf(cfg) -> dict        a config.json transformers loads
  params_from_hf(cfg, src, expected) -> {our/param/path: (array in our layout, hf_name)}
  params_to_hf(cfg, params) -> {hf_name: array in HF layout}
where `src` is a `TensorSource`, `expected` the set of parameter paths of a model of that config
(the loader checks every returned shape), and paths are "/"-joined keys of the model's pure
state dict, e.g. "layers/0/attn/q".
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable, Mapping

import numpy as np

from cot2align_jax.models.config import ModelError

_FAMILY_MODULES = ("gpt2", "llama", "gemma3")


class TensorSource:
  """Read access to a checkpoint's tensors by HF name, with errors that name the tensor.

  `fetch(name) -> np.ndarray` loads one tensor; `names` lists what the checkpoint holds.
  """

  def __init__(self, names, fetch: Callable[[str], np.ndarray], where: str):
    self.names = set(names)
    self._fetch = fetch
    self.where = where

  def __contains__(self, name: str) -> bool:
    return name in self.names

  def get(self, name: str) -> np.ndarray:
    if name not in self.names:
      raise ModelError(f"{self.where}: tensor {name!r} is missing from the checkpoint")
    return np.asarray(self._fetch(name))

  def first(self, *names: str) -> tuple[str, np.ndarray]:
    """The first of several alternative names present (e.g. with and without a prefix)."""
    for name in names:
      if name in self.names:
        return name, self.get(name)
    raise ModelError(f"{self.where}: tensor {names[0]!r} is missing from the checkpoint")

  @classmethod
  def from_dict(cls, tensors: Mapping[str, np.ndarray], where: str = "checkpoint"):
    return cls(tensors.keys(), lambda n: tensors[n], where)


def family_modules() -> dict[str, ModuleType]:
  return {name: importlib.import_module(f"cot2align_jax.models.{name}") for name in _FAMILY_MODULES}


def supported_model_types() -> list[str]:
  return sorted(t for m in family_modules().values() for t in m.MODEL_TYPES)


def family_for_model_type(model_type: str | None) -> ModuleType:
  """The family module that reads an HF `model_type`; a one-line error lists the others."""
  for module in family_modules().values():
    if model_type in module.MODEL_TYPES:
      return module
  raise ModelError(f"unsupported model_type {model_type!r}; supported: "
                   f"{', '.join(supported_model_types())}")


def family(cfg_family: str) -> ModuleType:
  mods = family_modules()
  if cfg_family not in mods:
    raise ModelError(f"unknown family {cfg_family!r}; known: {', '.join(mods)}")
  return mods[cfg_family]


# Layout helpers. HF nn.Linear stores (out, in); we store (in, out) split into heads.

def linear_in(w: np.ndarray, *out_shape: int) -> np.ndarray:
  """HF Linear weight [out, in] -> ours [in, *out_shape]."""
  return w.T.reshape(w.shape[1], *out_shape)


def linear_out(w: np.ndarray) -> np.ndarray:
  """Ours [in, *out_shape] -> HF Linear weight [out, in]."""
  return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)


def heads_in(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
  """HF o_proj weight [embed, heads*head_dim] -> ours [heads, head_dim, embed]."""
  return w.T.reshape(heads, head_dim, w.shape[0])


def heads_out(w: np.ndarray) -> np.ndarray:
  """Ours [heads, head_dim, embed] -> HF o_proj weight [embed, heads*head_dim]."""
  return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)


def common_hf_fields(cfg) -> dict:
  """config.json keys every family writes the same way."""
  out = {
      "vocab_size": cfg.vocab_size,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": (list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
                       else cfg.eos_token_id),
      "pad_token_id": cfg.pad_token_id,
      "dtype": cfg.param_dtype,
  }
  return out


def token_ids(hf: dict) -> dict:
  eos = hf.get("eos_token_id")
  if isinstance(eos, list):
    eos = tuple(eos)
  return dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=eos,
              pad_token_id=hf.get("pad_token_id"))
