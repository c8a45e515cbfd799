"""Experiment configs (ml_collections ConfigDicts, configs/*.py) → typed dataclasses.

    cfg = load_config("configs/tiny.py", "sft", overrides={"train.steps": 4})
    kd = kd_config(cfg)              # losses.methods.KDConfig (with its ot.OTConfig)
    opt = optim_config(cfg, total_steps=1000)   # training.state.OptimConfig
    pipe = pipeline_config(cfg, batch_size=8, num_epochs=None)  # data.pipeline.PipelineConfig
    ck = checkpoint_config(cfg)      # training.checkpoint.CheckpointConfig

Every section of the ConfigDict is checked against the dataclass it feeds (and against the
layout of configs/base.py): an unknown key raises `ConfigError` with one line naming the key and
listing the valid ones. Config files may load sibling files with `load_sibling(__file__, name)`
(no package import needed, so `--config=path/to/file.py` works from any directory).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_collections

# The top-level sections of every experiment config (configs/base.py) and the keys each one
# has besides the dataclass fields it feeds.
SECTIONS = ("student", "teacher", "data", "kd", "optim", "mesh", "checkpoint", "train")
MODEL_KEYS = ("path", "tiny", "dtype", "param_dtype", "init", "remat", "valid_vocab_size", "lora",
              "sharding")
LORA_KEYS = ("enabled", "rank", "alpha", "dropout", "target_modules")
DATA_KEYS = ("dataset", "split", "source", "max_examples", "rationales", "cot_rule",
             "dev_split", "dev_max_examples")
PIPELINE_DERIVED = ("num_epochs", "shard_index", "shard_count")  # set by the loop, not the config
MESH_KEYS = ("data", "fsdp", "tensor")
TRAIN_KEYS = ("steps", "epochs", "seed", "log_every", "eval_every", "eval_batches", "dev_metric",
              "export", "export_dtype")


class ConfigError(ValueError):
  """A config problem reported in one line (the CLI prints it and exits with status 2)."""


# --------------------------------------------------------------------------------------------
# Loading config files
# --------------------------------------------------------------------------------------------


def _load_module(path: Path):
  spec = importlib.util.spec_from_file_location(f"_cot2align_config_{path.stem}_{abs(hash(path))}",
                                                path)
  if spec is None or spec.loader is None:
    raise ConfigError(f"config file {path} cannot be loaded")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sibling(this_file: str, relative: str):
  """The module of config file `relative` (e.g. "../base.py") next to `this_file`."""
  path = (Path(this_file).resolve().parent / relative).resolve()
  if not path.is_file():
    raise ConfigError(f"config file not found: {path}")
  return _load_module(path)


def split_config_arg(spec: str) -> tuple[str, str | None]:
  """"path.py:arg" → ("path.py", "arg"); "path.py" → ("path.py", None) (split at the first
  colon, as ml_collections.config_flags does)."""
  path, sep, arg = spec.partition(":")
  return path, (arg if sep else None)


def load_config(path: str | os.PathLike, arg: str | None = None,
                overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, then dotted-key overrides (each key must exist)."""
  p = Path(path)
  if not p.is_file():
    raise ConfigError(f"config file not found: {path}")
  module = _load_module(p.resolve())
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config()")
  n_params = len(inspect.signature(module.get_config).parameters)
  cfg = module.get_config(arg) if n_params else module.get_config()
  for key, value in (overrides or {}).items():
    set_key(cfg, key, value)
  return cfg


def _valid_keys(node: ml_collections.ConfigDict) -> str:
  return ", ".join(sorted(node.keys()))


def check_key(cfg: ml_collections.ConfigDict, dotted: str) -> None:
  """ConfigError (one line, listing the valid keys at that level) unless `dotted` exists."""
  node, parts = cfg, dotted.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      where = ".".join(parts[:i]) or "<top>"
      valid = _valid_keys(node) if isinstance(node, (ml_collections.ConfigDict, dict)) else (
          "(none: it is a value)")
      raise ConfigError(f"unknown config key {dotted!r}: no {part!r} in {where}; "
                        f"valid keys: {valid}")
    node = node[part]


def set_key(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """cfg.a.b = value for dotted "a.b" (the key must exist)."""
  check_key(cfg, dotted)
  *parents, last = dotted.split(".")
  node = cfg
  for part in parents:
    node = node[part]
  with node.unlocked() if hasattr(node, "unlocked") else _null():
    node[last] = value


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


# --------------------------------------------------------------------------------------------
# Section → dataclass
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
  """ConfigDict / FieldReference / list → plain Python (lists become tuples)."""
  if isinstance(value, ml_collections.FieldReference):
    value = value.get()
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def _check_keys(section: str, given: Iterable[str], allowed: Iterable[str]) -> None:
  allowed = set(allowed)
  unknown = sorted(set(given) - allowed)
  if unknown:
    raise ConfigError(f"unknown config key {section}.{unknown[0]}; valid keys in {section}: "
                      f"{', '.join(sorted(allowed))}")


def section(cfg: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
  """cfg[name] as a plain dict (ConfigError if the section is missing)."""
  if name not in cfg:
    raise ConfigError(f"config has no section {name!r}; sections: {_valid_keys(cfg)}")
  return _plain(cfg[name])


def to_dataclass(cls, values: Mapping[str, Any], section_name: str, *, extra: Iterable[str] = (),
                 exclude: Iterable[str] = (), **fixed):
  """cls(**values) after rejecting keys that are neither fields of cls nor in `extra`.

  Keys in `extra` are accepted and dropped; `exclude` fields may not be given (they are set by
  the caller through `fixed`). Values for tuple-typed fields are turned into tuples.
  """
  fields = {f.name for f in dataclasses.fields(cls)}
  exclude = set(exclude)
  _check_keys(section_name, values, (fields - exclude) | set(extra))
  kwargs = {k: v for k, v in values.items() if k in fields and k not in exclude}
  kwargs.update(fixed)
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"bad {section_name} config: {e}") from None


def check_layout(cfg: ml_collections.ConfigDict) -> None:
  """The sections of configs/base.py and, in the model/data/mesh/train sections, their keys."""
  _check_keys("<top>", cfg.keys(), SECTIONS)
  for name in SECTIONS:
    if name not in cfg:
      raise ConfigError(f"config has no section {name!r}; sections: {', '.join(SECTIONS)}")
  for side in ("student", "teacher"):
    _check_keys(side, cfg[side].keys(), MODEL_KEYS)
    if "lora" in cfg[side]:
      _check_keys(f"{side}.lora", cfg[side].lora.keys(), LORA_KEYS)
  _check_keys("mesh", cfg.mesh.keys(), MESH_KEYS)
  _check_keys("train", cfg.train.keys(), TRAIN_KEYS)


def kd_config(cfg: ml_collections.ConfigDict):
  """losses.methods.KDConfig of cfg.kd (cfg.kd.ot → losses.ot.OTConfig).

  `kd.divergence_params` holds every divergence parameter (lam, mu, beta, ...); only those the
  chosen divergence takes are passed on (others are ignored, so switching the divergence on the
  command line needs no other change).
  """
  from cot2align_jax.losses import divergences as dv  # pylint: disable=g-import-not-at-top
  from cot2align_jax.losses.methods import KDConfig  # pylint: disable=g-import-not-at-top
  from cot2align_jax.losses.ot import OTConfig  # pylint: disable=g-import-not-at-top
  values = section(cfg, "kd")
  ot = to_dataclass(OTConfig, values.pop("ot", {}), "kd.ot")
  params = values.pop("divergence_params", {}) or {}
  name = values.get("divergence", "fkl")
  try:
    fn = dv.get_divergence(name)
  except ValueError as e:
    raise ConfigError(f"kd.divergence: {e}") from None
  accepted = {p.name for p in inspect.signature(fn).parameters.values()
              if p.kind == inspect.Parameter.KEYWORD_ONLY}
  div_params = tuple(sorted((k, float(v)) for k, v in params.items() if k in accepted))
  kd = to_dataclass(KDConfig, values, "kd", exclude=("ot", "divergence_params"), ot=ot,
                    divergence_params=div_params)
  from cot2align_jax.losses.methods import method_from_config  # pylint: disable=g-import-not-at-top
  try:
    method_from_config(kd)
  except ValueError as e:
    raise ConfigError(f"kd.method: {e}") from None
  return kd


def optim_config(cfg: ml_collections.ConfigDict, **fixed):
  """training.state.OptimConfig of cfg.optim; `fixed` (e.g. total_steps) override it."""
  from cot2align_jax.training.state import OptimConfig  # pylint: disable=g-import-not-at-top
  values = section(cfg, "optim")
  values.update(fixed)
  return to_dataclass(OptimConfig, values, "optim")


def pipeline_config(cfg: ml_collections.ConfigDict, **fixed):
  """data.pipeline.PipelineConfig of the pipeline keys of cfg.data.

  `data.alignment` is a comma-separated string ("" = none, "auto" = what the method needs);
  pass the resolved tuple in `fixed["alignment"]`. num_epochs / shard_* are set by the caller.
  """
  from cot2align_jax.data.pipeline import PipelineConfig  # pylint: disable=g-import-not-at-top
  values = section(cfg, "data")
  values.update({k: v for k, v in fixed.items() if k not in PIPELINE_DERIVED})
  if isinstance(values.get("alignment"), str):
    values["alignment"] = tuple(a.strip() for a in values["alignment"].split(",") if a.strip())
  if "buckets" in values:
    values["buckets"] = tuple(int(b) for b in values["buckets"])
  derived = {k: v for k, v in fixed.items() if k in PIPELINE_DERIVED}
  return to_dataclass(PipelineConfig, values, "data", extra=DATA_KEYS, exclude=PIPELINE_DERIVED,
                      **derived)


def checkpoint_config(cfg: ml_collections.ConfigDict, **fixed):
  """training.checkpoint.CheckpointConfig of cfg.checkpoint ("" best_metric → None)."""
  from cot2align_jax.training.checkpoint import CheckpointConfig  # pylint: disable=g-import-not-at-top
  values = section(cfg, "checkpoint")
  if not values.get("best_metric"):
    values["best_metric"] = None
  values.update(fixed)
  return to_dataclass(CheckpointConfig, values, "checkpoint")


def alignment_for(kd) -> tuple[str, ...]:
  """The per-batch alignment arrays a KD config's method reads ("auto")."""
  names = {kd.method, kd.base if kd.method == "cot2align" else ""}
  out = []
  if "dskd_eta" in names:
    out.append("eta")
  if "mined" in names:
    out.append("mined")
  return tuple(out)


def needs_vocab_map(kd) -> bool:
  """Whether the method needs the MinED teacher→student vocabulary map."""
  return kd.method == "mined" or (kd.method == "cot2align" and kd.base == "mined")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A student/teacher section: where the weights come from and how to hold them."""
  path: str = ""
  tiny: str = ""
  dtype: str = "float32"
  param_dtype: str = "float32"
  init: str = "pretrained"
  remat: bool = False
  valid_vocab_size: int = 0
  lora: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  sharding: str = "rules"

  def __post_init__(self):
    if self.init not in ("pretrained", "random"):
      raise ConfigError(f"init must be 'pretrained' or 'random', got {self.init!r}")
    if self.sharding not in ("rules", "replicated"):
      raise ConfigError(f"sharding must be 'rules' or 'replicated', got {self.sharding!r}")


# HF (PEFT) target module names -> our projection names (models/layers.py). GPT-2's `c_proj`
# names both the attention output and the MLP output projection (PEFT matches both).
LORA_MODULES = {
    "q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",),
    "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",),
    "c_attn": ("q", "k", "v"), "c_proj": ("o", "down"), "c_fc": ("up",),
    **{n: (n,) for n in ("q", "k", "v", "o", "gate", "up", "down")},
}


def lora_overrides(spec: ModelSpec) -> dict[str, Any]:
  """ModelConfig fields (lora_rank, lora_alpha, lora_targets) of `spec.lora`; {} when off.
  LoRA dropout is not implemented (the value is accepted and ignored)."""
  lora = dict(spec.lora or {})
  if not lora.get("enabled"):
    return {}
  unknown = [m for m in lora.get("target_modules", ()) if m not in LORA_MODULES]
  if unknown:
    raise ConfigError(f"lora.target_modules: unknown module {unknown[0]!r}; known: "
                      f"{', '.join(LORA_MODULES)}")
  targets = {t for m in lora.get("target_modules", ()) for t in LORA_MODULES[m]}
  rank = int(lora.get("rank", 0))
  if rank < 1 or not targets:
    raise ConfigError(f"lora.enabled=True needs rank >= 1 (got {rank}) and at least one "
                      "target module")
  return {"lora_rank": rank, "lora_alpha": float(lora.get("alpha", 8)),
          "lora_targets": tuple(t for t in ("q", "k", "v", "o", "gate", "up", "down")
                                if t in targets)}


def model_spec(cfg: ml_collections.ConfigDict, side: str) -> ModelSpec:
  """The student/teacher section as a ModelSpec (LoRA is checked here; student only)."""
  values = section(cfg, side)
  spec = to_dataclass(ModelSpec, values, side)
  if spec.lora and spec.lora.get("enabled") and side != "student":
    raise ConfigError(f"{side}.lora.enabled=True: the {side} is frozen; LoRA applies to the "
                      "student only")
  try:
    lora_overrides(spec)
  except ConfigError as e:
    raise ConfigError(f"{side}.{e}") from None
  return spec


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Every check that needs no model or data: layout, unknown keys, KD / pipeline / checkpoint
  / optimiser fields (the last two only when their modules exist)."""
  check_layout(cfg)
  model_spec(cfg, "student")
  model_spec(cfg, "teacher")
  kd = kd_config(cfg)
  pipeline_config(cfg, alignment=alignment_for(kd))
  optim_config(cfg, total_steps=max(int(cfg.optim.total_steps), 1))  # 0 = derived later
  checkpoint_config(cfg)
