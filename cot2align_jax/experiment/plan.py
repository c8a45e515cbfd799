"""The plan of an experiment: one Unit per (run, budget, seed), its overrides and step count.

    units = make_plan(spec, workdir)          # seed-major: every run at seed 0 first, ...
    print(format_plan(units, spec, workdir))  # records, steps, status, estimated time

A unit's config is the run's config file with, in order, spec.overrides, the run's overrides,
the seed keys (spec.seed_keys = seed) and the budget's train.steps / train.epochs. The step
count is the training loop's schedule: epochs × (records // batch) with data.drop_remainder
(ceil otherwise), or train.steps. A compute-budget unit whose step count equals the run's
epochs-budget step count trains exactly the same (same schedule, same batches: the shuffled
records repeat the same way), so it names that unit in `same_as` and the runner reuses its
result instead of training it twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_collections

from cot2align_jax.experiment.spec import ExperimentSpec, SpecError, resolve_path, substitute
from cot2align_jax.training import config as C
from cot2align_jax.training import loop, setup

RESULT_FILE = "result.json"
FAILED_FILE = "failed.json"
UNIT_FILE = "unit.json"
TRAIN_DIR = "train"


@dataclasses.dataclass(frozen=True)
class Unit:
  """One train + evaluate of a run under a budget at a seed."""

  run: str
  budget: str
  seed: int
  config_path: str
  config_arg: str | None
  overrides: Mapping[str, Any]     # all of them, in the order applied
  method: str                      # kd.method (kd.method[base] for cot2align)
  records: int | None              # training records (None: not countable yet)
  batch_size: int
  steps: int | None                # planned optimizer steps
  note: str = ""                   # why records/steps are unknown
  same_as: str = ""                # key of a unit whose training is this one's (see make_plan)

  @property
  def key(self) -> str:
    return f"{self.run}/{self.budget}/seed{self.seed}"

  def dir(self, workdir: Path) -> Path:
    return unit_dir(self.key, workdir)

  @property
  def config_text(self) -> str:
    return self.config_path + (f":{self.config_arg}" if self.config_arg is not None else "")

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["overrides"] = {k: _jsonable(v) for k, v in self.overrides.items()}
    out["key"] = self.key
    return out


def _jsonable(v: Any) -> Any:
  return list(v) if isinstance(v, tuple) else v


def steps_per_epoch(records: int, batch_size: int, drop_remainder: bool) -> int:
  """Optimizer steps of one epoch over `records` (the loop's schedule, one process)."""
  n = records // batch_size if drop_remainder else math.ceil(records / batch_size)
  return max(int(n), 1)


def count_records(config: ml_collections.ConfigDict) -> int:
  """Training records of a config (plain + CoT records; the tiny problem's too), without
  loading any checkpoint."""
  if config.student.tiny:
    return len(setup.build_problem(config, needs_teacher=False).train_records)
  return len(setup.read_records(config)[0])


def method_name(config: ml_collections.ConfigDict) -> str:
  m = str(config.kd.method)
  return f"{m}[{config.kd.base}]" if m == "cot2align" else m


def _split(config: str, workdir: Path) -> tuple[str, str | None]:
  path, arg = C.split_config_arg(substitute(config, workdir))
  return str(resolve_path(path)), arg


def run_overrides(spec: ExperimentSpec, run: str, workdir: Path) -> dict[str, Any]:
  out = {k: substitute(v, workdir) for k, v in spec.overrides.items()}
  out.update({k: substitute(v, workdir) for k, v in spec.runs[run].overrides.items()})
  return out


def load_run_config(spec: ExperimentSpec, run: str, workdir: Path,
                    extra: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The run's ConfigDict, validated (SpecError naming the run on a missing file, an unknown
  key or any other config error)."""
  path, arg = _split(spec.runs[run].config, workdir)
  if not Path(path).is_file():
    raise SpecError(f"run {run!r}: config file not found: {spec.runs[run].config}")
  overrides = run_overrides(spec, run, workdir)
  overrides.update(extra or {})
  try:
    cfg = C.load_config(path, arg, overrides)
    C.validate(cfg)
    return cfg
  except C.ConfigError as e:
    raise SpecError(f"run {run!r}: {e}") from None
  except Exception as e:  # pylint: disable=broad-except
    raise SpecError(f"run {run!r}: config {spec.runs[run].config}: {type(e).__name__}: "
                    f"{' '.join(str(e).split())}") from None


def select(spec: ExperimentSpec, only: Sequence[str] = (), seeds: Sequence[int] = (),
           budgets: Sequence[str] = ()) -> tuple[list[str], list[int], list[str]]:
  """(runs, seeds, budgets) after the --only / --seeds / --budgets filters (checked)."""
  unknown = [r for r in only if r not in spec.runs]
  if unknown:
    raise SpecError(f"--only: unknown run {unknown[0]!r}; runs: {', '.join(spec.runs)}")
  bad = [b for b in budgets if b not in spec.budgets]
  if bad:
    raise SpecError(f"--budgets: {bad[0]!r} is not a budget of the spec ({', '.join(spec.budgets)})")
  runs = [r for r in spec.runs if not only or r in only]
  return runs, list(seeds or spec.seeds), [b for b in spec.budgets if not budgets or b in budgets]


def make_plan(spec: ExperimentSpec, workdir: str | Path, *, only: Sequence[str] = (),
              seeds: Sequence[int] = (), budgets: Sequence[str] = (),
              count: bool = True) -> list[Unit]:
  """The units in run order (seed, then budget, then run). Every run's config is loaded (a bad
  run fails here); with `count`, records are counted (a failure leaves records/steps None)."""
  workdir = Path(workdir).resolve()
  runs, seeds, budgets = select(spec, only, seeds, budgets)
  configs = {r: load_run_config(spec, r, workdir) for r in spec.runs}   # all: checks the spec
  for name, cfg in configs.items():
    for key in spec.seed_keys:
      try:
        C.check_key(cfg, key)
      except C.ConfigError as e:
        raise SpecError(f"spec.seed_keys: run {name!r}: {e}") from None
  records: dict[str, int | None] = {}
  notes: dict[str, str] = {}
  needed = set(runs) | ({spec.baseline} if "compute" in budgets and not spec.sequences else set())
  for name in needed:
    records[name], notes[name] = None, "records not counted"
    if count:
      try:
        records[name], notes[name] = count_records(configs[name]), ""
      except Exception as e:  # pylint: disable=broad-except
        notes[name] = f"records unknown ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
  base_cfg = configs[spec.baseline]
  sequences = int(spec.sequences)
  if not sequences and spec.epochs and records.get(spec.baseline) is not None:
    sequences = spec.epochs * steps_per_epoch(records[spec.baseline],
                                              int(base_cfg.data.batch_size),
                                              bool(base_cfg.data.drop_remainder)) * int(
                                                  base_cfg.data.batch_size)
  units = []
  for seed in seeds:
    for budget in budgets:
      for name in runs:
        cfg = configs[name]
        batch = int(cfg.data.batch_size)
        n, note = records.get(name), notes.get(name, "")
        per_epoch = (steps_per_epoch(n, batch, bool(cfg.data.drop_remainder))
                     if n is not None else None)
        extra: dict[str, Any] = {k: seed for k in spec.seed_keys}
        same_as = ""
        if budget == "epochs":
          extra.update({"train.epochs": int(spec.epochs), "train.steps": 0})
          steps = spec.epochs * per_epoch if per_epoch is not None else None
        elif budget == "compute":
          steps = math.ceil(sequences / batch) if sequences else None
          if steps is None:
            note = notes.get(spec.baseline) or "baseline records unknown"
          extra.update({"train.steps": steps if steps is not None else 0, "train.epochs": 0})
          if (steps is not None and per_epoch is not None and spec.epochs
              and steps == spec.epochs * per_epoch and "epochs" in spec.budgets):
            same_as = f"{name}/epochs/seed{seed}"
        else:
          if int(cfg.train.steps) > 0:
            steps = int(cfg.train.steps)
          else:
            steps = int(cfg.train.epochs) * per_epoch if per_epoch is not None else None
        path, arg = _split(spec.runs[name].config, workdir)
        overrides = run_overrides(spec, name, workdir)
        overrides.update(extra)
        units.append(Unit(run=name, budget=budget, seed=int(seed), config_path=path,
                          config_arg=arg, overrides=overrides, method=method_name(cfg),
                          records=n, batch_size=batch, steps=steps, note=note,
                          same_as=same_as))
  return units


# --------------------------------------------------------------------------------------------
# Status and cost
# --------------------------------------------------------------------------------------------


def latest_checkpoint_step(train_dir: Path) -> int | None:
  """The largest step directory of train_dir/checkpoints (None: no checkpoint)."""
  ckpt = Path(train_dir) / loop.CKPT_DIR
  steps = [int(p.name) for p in ckpt.iterdir() if p.is_dir() and p.name.isdigit()] if (
      ckpt.is_dir()) else []
  return max(steps) if steps else None


def read_result(unit_dir: Path) -> dict[str, Any] | None:
  path = Path(unit_dir) / RESULT_FILE
  return json.loads(path.read_text()) if path.is_file() else None


def unit_dir(key: str, workdir: Path) -> Path:
  """The directory of the unit with this key (run/budget/seed<k>)."""
  run, budget, seed = key.rsplit("/", 2)
  return Path(workdir) / "runs" / run / budget / seed


def status(unit: Unit, workdir: Path) -> str:
  d = unit.dir(workdir)
  if (d / RESULT_FILE).is_file():
    return "done"
  if unit.same_as:
    return f"same as {unit.same_as}"
  if (d / FAILED_FILE).is_file():
    return "failed"
  step = latest_checkpoint_step(d / TRAIN_DIR)
  return f"partial@{step}" if step is not None else "pending"


def measured_costs(units: Sequence[Unit], workdir: Path) -> tuple[dict[str, float], float | None]:
  """({run: seconds per step}, seconds per evaluation) over the finished units."""
  per_step: dict[str, list[float]] = {}
  evals = []
  for u in units:
    r = read_result(u.dir(workdir))
    if r is None:
      continue
    if r.get("steps") and r.get("train_seconds"):
      per_step.setdefault(u.run, []).append(r["train_seconds"] / r["steps"])
    if r.get("eval_seconds"):
      evals.append(r["eval_seconds"])
  return ({k: sum(v) / len(v) for k, v in per_step.items()},
          sum(evals) / len(evals) if evals else None)


def estimate(units: Sequence[Unit], spec: ExperimentSpec, workdir: Path) -> list[float | None]:
  """Estimated seconds of each unit still to do (0 for done units): steps × s/step (measured
  on finished units of the run, else spec.cost[run] or spec.cost[method], else
  spec.default_cost) + one evaluation."""
  measured, eval_s = measured_costs(units, workdir)
  out = []
  for u in units:
    st = status(u, workdir)
    if st == "done" or st.startswith("same as"):
      out.append(0.0)
      continue
    if u.steps is None:
      out.append(None)
      continue
    rate = measured.get(u.run, spec.cost.get(u.run, spec.cost.get(u.method.split("[")[0],
                                                                   spec.default_cost)))
    left = u.steps
    if st.startswith("partial@"):
      left = max(u.steps - int(st.split("@")[1]), 0)
    out.append(left * rate + (eval_s if eval_s is not None else spec.eval_cost))
  return out


def _fmt_seconds(s: float) -> str:
  if s < 120:
    return f"{s:.0f} s"
  if s < 7200:
    return f"{s / 60:.1f} min"
  return f"{s / 3600:.1f} h"


def format_plan(units: Sequence[Unit], spec: ExperimentSpec, workdir: Path) -> str:
  """The plan as a text table and a total (what --dry_run prints)."""
  costs = estimate(units, spec, workdir)
  head = ("unit", "method", "records", "batch", "steps", "sequences", "status", "est.")
  rows = []
  for u, c in zip(units, costs):
    rows.append((u.key, u.method, "?" if u.records is None else str(u.records),
                 str(u.batch_size), "?" if u.steps is None else str(u.steps),
                 "?" if u.steps is None else str(u.steps * u.batch_size), status(u, workdir),
                 "?" if c is None else _fmt_seconds(c)))
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(head)]
  lines = [f"experiment {spec.name}: {len(units)} units ({len({u.run for u in units})} runs x "
           f"{len({u.budget for u in units})} budgets x {len({u.seed for u in units})} seeds), "
           f"workdir {workdir}"]
  lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
  lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  known = [c for c in costs if c is not None]
  todo = [u for u, c in zip(units, costs) if c != 0.0]
  steps = sum(u.steps for u in todo if u.steps is not None)
  total = f"total to do: {len(todo)} units, {steps} steps, about {_fmt_seconds(sum(known))}"
  if len(known) < len(costs):
    total += f" (+ {len(costs) - len(known)} units of unknown size)"
  lines.append(total)
  for note in sorted({u.note for u in units if u.note}):
    lines.append(f"note: {note}")
  return "\n".join(lines)
