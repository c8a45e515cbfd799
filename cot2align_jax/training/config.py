"""Experiment configs (configs/*.py, ml_collections ConfigDicts) → typed dataclasses.

    cfg = load_config("configs/tiny.py", "cot2align,base=uld", overrides={"train.steps": 4})
    validate(cfg)                          # unknown key or bad value → ConfigError (one line)
    kd = kd_config(cfg)                    # losses.methods.KDConfig (+ OTConfig, method params)
    method = method_of(kd)                 # losses.methods.Method (what the method needs)
    train, data, mesh = train_config(cfg), data_config(cfg), mesh_config(cfg)
    student = model_spec(cfg, "student")   # ModelSpec (+ LoRAConfig)
    opt = optim_config(cfg, total_steps=1000)   # training.state.OptimConfig
    pipe = pipeline_config(cfg, batch_size=8)   # data.pipeline.PipelineConfig
    ck = checkpoint_config(cfg)            # training.checkpoint.CheckpointConfig

The keys of every section and their defaults are the fields of the section dataclasses
(`section_defaults()`); `defaults()` turns them into the ConfigDict that configs/base.py starts
from, and validation walks a config against it. Config files parse their `arg` with
`parse_arg` and load sibling files with `load_sibling`. See docs/config.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import types
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_collections

from cot2align_jax.data.pipeline import PipelineConfig
from cot2align_jax.losses import divergences as dv
from cot2align_jax.losses.methods import METHODS, KDConfig, Method, method_from_config
from cot2align_jax.losses.ot import OTConfig
from cot2align_jax.training.checkpoint import CheckpointConfig
from cot2align_jax.training.state import OptimConfig


class ConfigError(ValueError):
  """A config problem reported in one line (the CLI prints it and exits with status 2)."""


# --------------------------------------------------------------------------------------------
# The section dataclasses (those not defined by the modules they feed)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """LoRA of the student (the teacher is frozen): rank, alpha (scale alpha / rank) and the HF
  (PEFT) module names it adapts (LORA_MODULES). dropout is accepted and not applied. Base
  weights stay frozen; A·B is merged into them on export. The paper's values (docs/method.md
  §5)."""
  enabled: bool = False
  rank: int = 256
  alpha: float = 8.0
  dropout: float = 0.1
  # HF module names of the Llama family; GPT-2: c_attn, c_proj, c_fc.
  target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A student / teacher section: where the weights come from and how to hold them.

  path: HF checkpoint dir, Hub name (online only) or gguf:<name>; tiny: a tiny-model spec
  ("d=32,layers=2") instead of a path (tests, demo); dtype / param_dtype: compute / storage
  dtype; init: "pretrained" | "random"; remat: rematerialise the blocks; valid_vocab_size:
  logits past it are -inf (0 = all rows, -1 = the tokenizer's length when the embedding has
  padding rows, as Qwen's); sharding: "rules" (logical-axis rules over the mesh, FSDP/tensor)
  or "replicated" (a full copy on every device: small teachers, no gathers in the step);
  cache (teacher only): a teacher cache directory (python -m cot2align_jax.cache_teacher) that
  the train step reads instead of running the teacher forward ("" = off).
  """
  path: str = ""
  tiny: str = ""
  dtype: str = "float32"
  param_dtype: str = "float32"
  init: str = "pretrained"
  remat: bool = False
  valid_vocab_size: int = 0
  lora: LoRAConfig = LoRAConfig()
  sharding: str = "rules"
  cache: str = ""

  def __post_init__(self):
    if self.init not in ("pretrained", "random"):
      raise ConfigError(f"init must be 'pretrained' or 'random', got {self.init!r}")
    if self.sharding not in ("rules", "replicated"):
      raise ConfigError(f"sharding must be 'rules' or 'replicated', got {self.sharding!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to train on. The data section also holds the PipelineConfig fields (PIPELINE_KEYS).

  dataset / split: a data.sources registry name and its split; source: the data directory
  ("" = shared/data); max_examples: the first N examples (0 = all); rationales: JSONL
  {"id", "rationale"} of the teacher's CoT ("" = no CoT records); cot_rule: which examples get
  a CoT record; dev_split / dev_max_examples: the dev evaluation ("" = none; 0 = all);
  alignment: "auto" (what the method needs) or comma-separated PipelineConfig.alignment names
  ("" = none). Own data (dataset = "file" or "jsonl", docs/data.md): train_file / dev_file /
  test_file are the splits train / dev / test (JSONL, JSON, Parquet, CSV or a saved `datasets`
  directory), fields the field mapping (data/files.py), on_error "skip" (count and skip bad
  rows, prompts over data.max_prompt tokens included) or "raise"; template: the prompt
  template ("" = the data set's: alpaca, qa).
  """
  dataset: str = "dolly"
  split: str = "train"
  source: str = ""
  max_examples: int = 0
  rationales: str = ""
  cot_rule: str = "nonempty_input"
  dev_split: str = "dev"
  dev_max_examples: int = 0
  alignment: str = "auto"
  train_file: str = ""
  dev_file: str = ""
  test_file: str = ""
  fields: str = "auto"
  on_error: str = "skip"
  template: str = ""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Devices along the data × fsdp × tensor mesh axes (data -1 = all devices left)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop. steps: optimizer steps (0 = `epochs` passes over the data); seed: models,
  projectors and the step's randomness; log_every: steps per metrics line; eval_every: steps
  per dev evaluation (0 = once per epoch, -1 = never); eval_batches: dev batches per
  evaluation (0 = the whole dev split); dev_metric: "" (dev loss only) or "rouge_l"
  (generation ROUGE-L); export: save_pretrained of the student to workdir/export at the end,
  in export_dtype ("" = the parameters' dtype)."""
  steps: int = 0
  epochs: int = 20
  seed: int = 10
  log_every: int = 10
  eval_every: int = 0
  eval_batches: int = 0
  dev_metric: str = ""
  export: bool = True
  export_dtype: str = ""


# PipelineConfig fields the loop sets (epochs from train.*, this host's shard): not config keys.
_SET_BY_LOOP = ("num_epochs", "shard_index", "shard_count")
_DATA_FIELDS = tuple(f.name for f in dataclasses.fields(DataConfig))
# The keys of the data section that go to PipelineConfig (data.alignment is resolved first).
PIPELINE_KEYS = tuple(f.name for f in dataclasses.fields(PipelineConfig)
                      if f.name not in _SET_BY_LOOP and f.name not in _DATA_FIELDS)
# KDConfig fields that are sections of their own in the config (see `defaults`).
_KD_DERIVED = ("divergence_params", "method_params")


def section_defaults() -> dict[str, Any]:
  """The dataclass instance whose fields are the keys (and defaults) of each top-level section."""
  return {
      "student": ModelSpec(),
      "teacher": ModelSpec(),
      "data": DataConfig(),
      "kd": KDConfig(),
      "optim": OptimConfig(),
      "mesh": MeshConfig(),
      "checkpoint": CheckpointConfig(save_every=500),  # save_every has no dataclass default
      "train": TrainConfig(),
  }


def divergence_defaults() -> dict[str, Any]:
  """Every keyword parameter of the divergences (losses.divergences) with its default."""
  out: dict[str, Any] = {}
  for fn in dv.DIVERGENCES.values():
    for p in inspect.signature(fn).parameters.values():
      if p.kind == inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty:
        out.setdefault(p.name, p.default)
  return out


def method_param_defaults() -> dict[str, Any]:
  """{method name: its params dataclass instance} of the registered methods that have one."""
  return {name: m.params() for name, m in sorted(METHODS.items()) if m.params is not None}


def to_config_dict(instance: Any, *, skip: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """A dataclass instance as a ConfigDict (dataclass-valued fields become sub-ConfigDicts)."""
  skip = set(skip)
  out = {}
  for f in dataclasses.fields(instance):
    if f.name in skip:
      continue
    value = getattr(instance, f.name)
    out[f.name] = to_config_dict(value) if dataclasses.is_dataclass(value) else value
  return ml_collections.ConfigDict(out)


def defaults() -> ml_collections.ConfigDict:
  """The experiment ConfigDict of the dataclass defaults (configs/base.py starts from it).

  Besides each section dataclass's fields: data holds PIPELINE_KEYS, kd.divergence_params every
  divergence parameter, and kd.<method> the params of each method that has them.
  """
  c = ml_collections.ConfigDict()
  for name, instance in section_defaults().items():
    c[name] = to_config_dict(instance, skip=_KD_DERIVED if name == "kd" else ())
  pipeline = PipelineConfig()
  with c.data.unlocked():
    for key in PIPELINE_KEYS:
      c.data[key] = getattr(pipeline, key)
  with c.kd.unlocked():
    c.kd.divergence_params = ml_collections.ConfigDict(divergence_defaults())
    for name, params in method_param_defaults().items():
      c.kd[name] = to_config_dict(params)
  return c


# --------------------------------------------------------------------------------------------
# The config-file arg: "a,b,key=value"
# --------------------------------------------------------------------------------------------


def _convert_arg(key: str, text: str, default: Any, where: str) -> Any:
  """`text` as the type of `default` (bool: true/false/1/0; None default: the string)."""
  try:
    if isinstance(default, bool):
      low = text.strip().lower()
      if low in ("true", "1"):
        return True
      if low in ("false", "0"):
        return False
      raise ValueError("expected true/false/1/0")
    if default is None or isinstance(default, str):
      return text
    return type(default)(text)
  except ValueError as e:
    raise ConfigError(f"{where}: bad value {text!r} for {key!r} "
                      f"({type(default).__name__}: {e})") from None


def parse_arg(arg: str | None, spec: Mapping[str, Any], *,
              where: str = "config arg") -> types.SimpleNamespace:
  """The items of a config file's `arg` over the defaults in `spec`.

  `arg` is a comma-separated list; an item is `key=value` or a bare value that fills the next
  positional key (the keys of `spec`, in order). Values take the type of their default.
  "cot2align,base=uld" with spec {"method": "sft", "base": ""} → (method="cot2align",
  base="uld"). An unknown key, a key given twice, too many positionals or a bad value raise
  ConfigError (one line, prefixed with `where`).
  """
  keys = list(spec)
  values = dict(spec)
  given: set[str] = set()
  positional = 0
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, text = item.partition("=")
    if sep:
      key = key.strip()
      if key not in spec:
        raise ConfigError(f"{where}: unknown key {key!r} in {arg!r}; keys: {', '.join(keys)}")
    else:
      while positional < len(keys) and keys[positional] in given:
        positional += 1
      if positional >= len(keys):
        raise ConfigError(f"{where}: too many values in {arg!r}; keys: {', '.join(keys)}")
      key, text = keys[positional], item
    if key in given:
      raise ConfigError(f"{where}: {key!r} given twice in {arg!r}")
    given.add(key)
    values[key] = _convert_arg(key, text.strip(), spec[key], where)
  return types.SimpleNamespace(**values)


# --------------------------------------------------------------------------------------------
# Loading config files and setting keys
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


def _is_node(value: Any) -> bool:
  return isinstance(value, (ml_collections.ConfigDict, dict))


def _valid_keys(node) -> str:
  return ", ".join(sorted(node.keys()))


def check_key(cfg: ml_collections.ConfigDict, dotted: str) -> None:
  """ConfigError (one line, listing the valid keys at that level) unless `dotted` exists."""
  node, parts = cfg, dotted.split(".")
  for i, part in enumerate(parts):
    if not _is_node(node) or part not in node:
      where = ".".join(parts[:i]) or "<top>"
      valid = _valid_keys(node) if _is_node(node) else "(none: it is a value)"
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
  if isinstance(node, ml_collections.ConfigDict):
    with node.unlocked():
      node[last] = value
  else:
    node[last] = value


# --------------------------------------------------------------------------------------------
# Validation: walking a config against the defaults tree
# --------------------------------------------------------------------------------------------


def check_keys(node, reference, where: str = "") -> None:
  """ConfigError (one line) for the first key of `node` that `reference` (a defaults() tree)
  lacks, naming it and listing the valid keys at its level."""
  level = where or "<top>"
  for key in sorted(node.keys()):
    if key not in reference:
      raise ConfigError(f"unknown config key {level}.{key}; valid keys in {level}: "
                        f"{_valid_keys(reference)}")
    path = f"{where}.{key}" if where else key
    if _is_node(reference[key]):
      if not _is_node(node[key]):
        raise ConfigError(f"config key {path} must be a section with keys: "
                          f"{_valid_keys(reference[key])}")
      check_keys(node[key], reference[key], path)


def check_layout(cfg: ml_collections.ConfigDict) -> None:
  """Every section of defaults() is there and every key of cfg is one of defaults()."""
  reference = defaults()
  check_keys(cfg, reference)
  for name in reference:
    if name not in cfg:
      raise ConfigError(f"config has no section {name!r}; sections: {_valid_keys(reference)}")


def _plain(value: Any) -> Any:
  """ConfigDict / FieldReference / list → plain Python (lists become tuples)."""
  if isinstance(value, ml_collections.FieldReference):
    value = value.get()
  if _is_node(value):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def _overlay(base: dict, given: Mapping[str, Any]) -> dict:
  out = dict(base)
  for k, v in given.items():
    out[k] = _overlay(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
  return out


def section(cfg: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
  """cfg[name] as a plain dict over the section's defaults (keys checked; ConfigError if the
  section is missing or has an unknown key)."""
  reference = defaults()
  if name not in cfg:
    raise ConfigError(f"config has no section {name!r}; sections: {_valid_keys(cfg)}")
  if name in reference:
    check_keys(cfg[name], reference[name], name)
    return _overlay(_plain(reference[name]), _plain(cfg[name]))
  return _plain(cfg[name])


def to_dataclass(cls, values: Mapping[str, Any], section_name: str, *,
                 exclude: Iterable[str] = (), **fixed):
  """cls(**values, **fixed); `values` keys must be fields of cls not in `exclude` (those the
  caller sets through `fixed`). A field's bad value → ConfigError naming the section."""
  allowed = {f.name for f in dataclasses.fields(cls)} - set(exclude)
  unknown = sorted(set(values) - allowed)
  if unknown:
    raise ConfigError(f"unknown config key {section_name}.{unknown[0]}; valid keys in "
                      f"{section_name}: {', '.join(sorted(allowed))}")
  try:
    return cls(**{**values, **fixed})
  except (TypeError, ValueError) as e:
    if isinstance(e, ConfigError):
      raise ConfigError(f"{section_name}.{e}") from None
    raise ConfigError(f"bad {section_name} config: {e}") from None


# --------------------------------------------------------------------------------------------
# Typed sections
# --------------------------------------------------------------------------------------------


def kd_config(cfg: ml_collections.ConfigDict) -> KDConfig:
  """losses.methods.KDConfig of cfg.kd: kd.ot → OTConfig, kd.<method> → method_params, and of
  kd.divergence_params (all parameters) those the chosen divergence takes."""
  values = section(cfg, "kd")
  ot = to_dataclass(OTConfig, values.pop("ot"), "kd.ot")
  params = values.pop("divergence_params")
  method_params = tuple(
      (name, to_dataclass(type(default), values.pop(name), f"kd.{name}"))
      for name, default in method_param_defaults().items())
  try:
    fn = dv.get_divergence(values["divergence"])
  except ValueError as e:
    raise ConfigError(f"kd.divergence: {e}") from None
  div_params = tuple(sorted(
      (p.name, type(p.default)(params[p.name]))
      for p in inspect.signature(fn).parameters.values()
      if p.kind == inspect.Parameter.KEYWORD_ONLY and p.name in params))
  kd = to_dataclass(KDConfig, values, "kd", exclude=_KD_DERIVED + ("ot",), ot=ot,
                    divergence_params=div_params, method_params=method_params)
  method_of(kd)
  return kd


def method_of(kd: KDConfig) -> Method:
  """The registered method of a KD config (its alignment, vocab map, forwards...)."""
  try:
    return method_from_config(kd)
  except ValueError as e:
    raise ConfigError(f"kd.method: {e}") from None


def optim_config(cfg: ml_collections.ConfigDict, *, derived_steps: int = 0,
                 **fixed) -> OptimConfig:
  """training.state.OptimConfig of cfg.optim; optim.total_steps 0 means `derived_steps` (the
  loop's schedule); `fixed` (e.g. total_steps) override both."""
  values = section(cfg, "optim")
  values["total_steps"] = values["total_steps"] or derived_steps
  return to_dataclass(OptimConfig, {**values, **fixed}, "optim")


def data_config(cfg: ml_collections.ConfigDict) -> DataConfig:
  """The DataConfig fields of cfg.data (its PIPELINE_KEYS go to `pipeline_config`)."""
  values = section(cfg, "data")
  return to_dataclass(DataConfig, {k: values[k] for k in _DATA_FIELDS}, "data")


def alignment(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The per-batch alignment arrays to compute: data.alignment, "auto" = what the method
  needs (Method.alignment)."""
  given = data_config(cfg).alignment
  if given == "auto":
    return tuple(method_of(kd_config(cfg)).alignment)
  return tuple(a.strip() for a in given.split(",") if a.strip())


def pipeline_config(cfg: ml_collections.ConfigDict, **fixed) -> PipelineConfig:
  """data.pipeline.PipelineConfig of the PIPELINE_KEYS of cfg.data (batch_size is the global
  batch), alignment resolved by `alignment(cfg)`; `fixed` (per-host batch_size, num_epochs,
  shard_*) override them."""
  values = section(cfg, "data")
  pipe = {k: values[k] for k in PIPELINE_KEYS}
  pipe["buckets"] = tuple(int(b) for b in pipe["buckets"])
  if "alignment" not in fixed:
    pipe["alignment"] = alignment(cfg)
  return to_dataclass(PipelineConfig, {**pipe, **fixed}, "data")


def mesh_config(cfg: ml_collections.ConfigDict) -> MeshConfig:
  """MeshConfig of cfg.mesh."""
  return to_dataclass(MeshConfig, section(cfg, "mesh"), "mesh")


def train_config(cfg: ml_collections.ConfigDict) -> TrainConfig:
  """TrainConfig of cfg.train."""
  return to_dataclass(TrainConfig, section(cfg, "train"), "train")


def checkpoint_config(cfg: ml_collections.ConfigDict, **fixed) -> CheckpointConfig:
  """training.checkpoint.CheckpointConfig of cfg.checkpoint ("" best_metric → None)."""
  values = section(cfg, "checkpoint")
  values["best_metric"] = values["best_metric"] or None
  return to_dataclass(CheckpointConfig, {**values, **fixed}, "checkpoint")


# HF (PEFT) target module names -> our projection names (models/layers.py). GPT-2's `c_proj`
# names both the attention output and the MLP output projection (PEFT matches both).
LORA_MODULES = {
    "q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",),
    "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",),
    "c_attn": ("q", "k", "v"), "c_proj": ("o", "down"), "c_fc": ("up",),
    **{n: (n,) for n in ("q", "k", "v", "o", "gate", "up", "down")},
}


def lora_overrides(spec: ModelSpec) -> dict[str, Any]:
  """ModelConfig fields (lora_rank, lora_alpha, lora_targets) of `spec.lora`; {} when off."""
  lora = spec.lora
  if not lora.enabled:
    return {}
  unknown = [m for m in lora.target_modules if m not in LORA_MODULES]
  if unknown:
    raise ConfigError(f"lora.target_modules: unknown module {unknown[0]!r}; known: "
                      f"{', '.join(LORA_MODULES)}")
  targets = {t for m in lora.target_modules for t in LORA_MODULES[m]}
  if lora.rank < 1 or not targets:
    raise ConfigError(f"lora.enabled=True needs rank >= 1 (got {lora.rank}) and at least one "
                      "target module")
  return {"lora_rank": int(lora.rank), "lora_alpha": float(lora.alpha),
          "lora_targets": tuple(t for t in ("q", "k", "v", "o", "gate", "up", "down")
                                if t in targets)}


def model_spec(cfg: ml_collections.ConfigDict, side: str) -> ModelSpec:
  """The student/teacher section as a ModelSpec (LoRA is checked here; student only)."""
  values = section(cfg, side)
  lora = to_dataclass(LoRAConfig, values.pop("lora"), f"{side}.lora")
  spec = to_dataclass(ModelSpec, values, side, exclude=("lora",), lora=lora)
  if lora.enabled and side != "student":
    raise ConfigError(f"{side}.lora.enabled=True: the {side} is frozen; LoRA applies to the "
                      "student only")
  if spec.cache and side != "teacher":
    raise ConfigError(f"{side}.cache: only the teacher's forward can be cached")
  try:
    lora_overrides(spec)
  except ConfigError as e:
    raise ConfigError(f"{side}.{e}") from None
  return spec


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Every check that needs no model or data: the layout (unknown keys), then every section's
  dataclass (field values, the method, LoRA)."""
  check_layout(cfg)
  model_spec(cfg, "student")
  model_spec(cfg, "teacher")
  kd_config(cfg)
  data_config(cfg)
  pipeline_config(cfg)
  optim_config(cfg, derived_steps=1)  # optim.total_steps 0: derived by the loop
  checkpoint_config(cfg)
  mesh_config(cfg)
  train_config(cfg)
