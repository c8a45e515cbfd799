"""Experiment specs: a plain Python file whose `get_spec(arg)` returns an `ExperimentSpec` (or a
dict of its fields), e.g. experiments/tiny.py, experiments/demo.py.

    spec = load_spec("experiments/demo.py:size=small")

A spec names runs (a config file[:arg] + dotted overrides), the seeds, the evaluation (data
sets, prompts, metric), the baseline the runs are compared with, the budget protocols and an
optional prepare step. In config strings and string override values, `{workdir}` becomes the
experiment directory, `{prepare}` its prepare/ folder and `{root}` the project root.

Budget protocols (docs/experiments.md):
  "epochs"   train.epochs = spec.epochs over each run's own training records (a run with more
             records, e.g. CoT2Align's plain + CoT records, takes more steps); the paper's.
  "compute"  train.steps = ceil(spec.sequences / batch) for every run: the same number of
             training sequences (records drawn); spec.sequences 0 = what the baseline sees
             under "epochs" (its steps × batch).
  "config"   the config's own train.steps / train.epochs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from pathlib import Path
from typing import Any, Callable, Mapping

from cot2align_jax.core.paths import PROJECT_ROOT

BUDGETS = ("epochs", "compute", "config")
PROMPTS = ("plain", "cot")


class SpecError(ValueError):
  """A bad spec or flag, reported in one line (the CLI exits with status 2)."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One method/variant: `config` = "path.py[:arg]", `overrides` = {"section.key": value}."""

  config: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  label: str = ""        # shown in the report (default: the run name)


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """How every trained student is scored.

  datasets: "name/split" items ("" split = the set's test split; empty tuple = the config's
  data.dataset test split). prompts: "plain" (the paper's protocol) and/or "cot"; every
  (dataset, prompt) is a column of the report. metric "" = the set's registered metric.
  """

  datasets: tuple[str, ...] = ()
  prompts: tuple[str, ...] = ("plain",)
  metric: str = ""
  max_examples: int = 0                     # 0 = the whole split
  greedy: bool = True
  temperature: float = 1.0                  # sampling only (greedy=False)
  top_p: float = 1.0
  no_repeat_ngram_size: int = 0
  sampling_seeds: tuple[int, ...] = (0,)    # generation seeds (greedy: one is enough)
  new_tokens: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: {"plain": 8, "cot": 48})
  max_prompt_length: int = 0                # 0 = the config's data.max_prompt
  batch_size: int = 64
  prompt_bucket: int = 16


@dataclasses.dataclass(frozen=True)
class Prepare:
  """Done once before the runs, in {workdir}/prepare: a command (argv list; "{python}" is this
  interpreter) and/or a function fn(prepare_dir: Path)."""

  command: tuple[str, ...] = ()
  fn: Callable[[Path], None] | None = None


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
  """A whole experiment; see the module doc."""

  name: str
  runs: Mapping[str, Run]
  seeds: tuple[int, ...]
  baseline: str
  evaluation: Evaluation = dataclasses.field(default_factory=Evaluation)
  budgets: tuple[str, ...] = ("config",)
  epochs: int = 0
  sequences: int = 0
  seed_keys: tuple[str, ...] = ("train.seed", "data.seed")
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # every run, first
  prepare: Prepare | None = None
  cost: Mapping[str, float] = dataclasses.field(default_factory=dict)  # s/step by run or method
  default_cost: float = 0.5                 # s/step when nothing else is known
  eval_cost: float = 30.0                   # s per evaluation when nothing is measured
  description: str = ""
  source: str = ""                          # the spec file (set by load_spec)
  # The claim (report.py "Against the best baseline"): each candidate against the best of the
  # other runs, the baseline and the prompts chosen on `select_on` ("dataset/split", dev),
  # the differences reported on `claim_on` (test). Empty `candidates`: no such section.
  candidates: tuple[str, ...] = ()
  select_on: str = ""
  claim_on: str = ""


def _build(cls, values: Any, where: str):
  if isinstance(values, cls):
    return values
  if not isinstance(values, Mapping):
    raise SpecError(f"{where}: expected a {cls.__name__} or a dict, got {type(values).__name__}")
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise SpecError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(fields))}")
  try:
    return cls(**values)
  except TypeError as e:
    raise SpecError(f"{where}: {e}") from None


def _tuple(value: Any, where: str) -> tuple:
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  try:
    return tuple(value)
  except TypeError:
    raise SpecError(f"{where}: expected a list, got {value!r}") from None


def from_value(value: Any, source: str = "") -> ExperimentSpec:
  """An ExperimentSpec from get_spec's return value (dataclass or dict), checked."""
  spec = _build(ExperimentSpec, value, "spec")
  runs = {}
  if not isinstance(spec.runs, Mapping) or not spec.runs:
    raise SpecError("spec.runs: expected a non-empty dict {name: run}")
  for name, run in spec.runs.items():
    if not isinstance(name, str) or not name or "/" in name or "," in name:
      raise SpecError(f"spec.runs: bad run name {name!r} (no '/' or ',')")
    if isinstance(run, str):
      run = Run(run)
    runs[name] = _build(Run, run, f"spec.runs[{name!r}]")
    if not isinstance(runs[name].config, str) or not runs[name].config:
      raise SpecError(f"spec.runs[{name!r}].config: expected 'path.py[:arg]'")
  evaluation = _build(Evaluation, spec.evaluation, "spec.evaluation")
  evaluation = dataclasses.replace(
      evaluation, datasets=_tuple(evaluation.datasets, "spec.evaluation.datasets"),
      prompts=_tuple(evaluation.prompts, "spec.evaluation.prompts"),
      sampling_seeds=tuple(int(s) for s in evaluation.sampling_seeds))
  bad = [p for p in evaluation.prompts if p not in PROMPTS]
  if bad or not evaluation.prompts:
    raise SpecError(f"spec.evaluation.prompts: unknown prompt {bad[0] if bad else ''!r}; "
                    f"known: {', '.join(PROMPTS)}")
  missing = [p for p in evaluation.prompts if p not in evaluation.new_tokens]
  if missing:
    raise SpecError(f"spec.evaluation.new_tokens has no entry for prompt {missing[0]!r}")
  prepare = spec.prepare
  if prepare is not None:
    prepare = _build(Prepare, prepare, "spec.prepare")
    prepare = dataclasses.replace(prepare, command=tuple(str(a) for a in prepare.command))
  spec = dataclasses.replace(
      spec, runs=runs, evaluation=evaluation, prepare=prepare, source=source or spec.source,
      seeds=tuple(int(s) for s in _tuple(spec.seeds, "spec.seeds")),
      budgets=_tuple(spec.budgets, "spec.budgets"),
      seed_keys=_tuple(spec.seed_keys, "spec.seed_keys"),
      candidates=_tuple(spec.candidates, "spec.candidates"))
  check(spec)
  return spec


def check(spec: ExperimentSpec) -> None:
  """Checks that need no config file: names, seeds, budgets."""
  if not spec.seeds:
    raise SpecError("spec.seeds is empty")
  if len(set(spec.seeds)) != len(spec.seeds):
    raise SpecError(f"spec.seeds has duplicates: {list(spec.seeds)}")
  if spec.baseline not in spec.runs:
    raise SpecError(f"spec.baseline {spec.baseline!r} is not a run; runs: {', '.join(spec.runs)}")
  bad = [b for b in spec.budgets if b not in BUDGETS]
  if bad or not spec.budgets:
    raise SpecError(f"spec.budgets: unknown budget {bad[0] if bad else ''!r}; known: "
                    f"{', '.join(BUDGETS)}")
  unknown = [c for c in spec.candidates if c not in spec.runs]
  if unknown:
    raise SpecError(f"spec.candidates: {unknown[0]!r} is not a run; runs: {', '.join(spec.runs)}")
  if spec.candidates:
    if len(spec.candidates) == len(spec.runs):
      raise SpecError("spec.candidates names every run: no baseline is left to compare with")
    for key in ("select_on", "claim_on"):
      value = getattr(spec, key)
      if not value or (spec.evaluation.datasets and value not in spec.evaluation.datasets):
        raise SpecError(f"spec.{key} must be one of spec.evaluation.datasets "
                        f"({', '.join(spec.evaluation.datasets) or 'none'}), got {value!r}")
  if "epochs" in spec.budgets and spec.epochs < 1:
    raise SpecError("spec.budgets has 'epochs' but spec.epochs < 1")
  if "compute" in spec.budgets and spec.sequences < 1 and spec.epochs < 1:
    raise SpecError("spec.budgets has 'compute': set spec.sequences, or spec.epochs to take the "
                    "baseline's epoch budget")


def split_spec_arg(text: str) -> tuple[str, str | None]:
  """"experiments/demo.py:size=ci" → ("experiments/demo.py", "size=ci")."""
  path, sep, arg = text.partition(":")
  return path, (arg if sep else None)


def resolve_path(path: str) -> Path:
  """A file path as given (relative to the current directory), else under the project root."""
  p = Path(path).expanduser()
  if p.is_file() or p.is_absolute():
    return p.resolve()
  q = PROJECT_ROOT / p
  return q.resolve() if q.is_file() else p.resolve()


def load_spec(text: str) -> ExperimentSpec:
  """The spec of "file.py[:arg]" (SpecError, one line, for every problem)."""
  path, arg = split_spec_arg(text)
  file = resolve_path(path)
  if not file.is_file():
    raise SpecError(f"spec file not found: {path}")
  module_spec = importlib.util.spec_from_file_location(f"_cot2align_spec_{file.stem}", file)
  if module_spec is None or module_spec.loader is None:
    raise SpecError(f"spec file {path} cannot be loaded")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise SpecError(f"spec file {path}: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_spec"):
    raise SpecError(f"spec file {path} has no get_spec(arg)")
  try:
    takes_arg = bool(inspect.signature(module.get_spec).parameters)
    value = module.get_spec(arg) if takes_arg else module.get_spec()
  except SpecError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise SpecError(f"spec file {text}: {type(e).__name__}: {e}") from None
  return from_value(value, source=str(file) + (f":{arg}" if arg is not None else ""))


def substitute(value: Any, workdir: Path) -> Any:
  """"{workdir}", "{prepare}", "{root}" in a string (other values unchanged)."""
  if not isinstance(value, str):
    return value
  return (value.replace("{workdir}", str(workdir)).replace("{prepare}", str(workdir / "prepare"))
          .replace("{root}", str(PROJECT_ROOT)))
