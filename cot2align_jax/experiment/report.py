"""The experiment's report: results.json, results.md and plots/ from the units' result.json.

    payload = aggregate(spec, units, results)     # pure: the rows of the report
    write_report(payload, workdir)                # results.{json,md}, plots/*.png

One row per (budget, run, column) with the score of every seed, mean ± std, the 95% t-interval
and, for runs other than the baseline, the paired difference to the baseline over the seeds
both have (t-interval) and the paired bootstrap over seeds × test items (stats.py). Units not
done yet are listed under "missing"; nothing is computed from them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cot2align_jax.experiment import stats
from cot2align_jax.experiment.plan import Unit
from cot2align_jax.experiment.spec import ExperimentSpec

BUDGET_TEXT = {
    "epochs": "the same number of epochs over each run's own training records (the paper's "
              "protocol: a run with more records, e.g. CoT2Align's plain + CoT records, takes "
              "more steps)",
    "compute": "the same number of training sequences for every run (equal steps × batch)",
    "config": "each config's own train.steps / train.epochs",
}


def aggregate(spec: ExperimentSpec, units: Sequence[Unit],
              results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The report's payload (JSON-ready) of the results of `units` (others are ignored)."""
  wanted = {u.key for u in units}
  by_key = {r["unit"]: r for r in results if r["unit"] in wanted}
  runs = list(dict.fromkeys(u.run for u in units))
  budgets = list(dict.fromkeys(u.budget for u in units))
  seeds = list(dict.fromkeys(u.seed for u in units))
  columns = list(dict.fromkeys(c for r in by_key.values() for c in r["scores"]))
  rows = []
  for budget in budgets:
    for run in runs:
      for column in columns:
        rows.append(_row(spec, by_key, budget, run, column, seeds))
  return {
      "spec": spec.name, "source": spec.source, "description": spec.description,
      "baseline": spec.baseline, "budgets": budgets,
      "budget_text": {b: BUDGET_TEXT[b] for b in budgets}, "runs": runs, "seeds": seeds,
      "columns": columns, "confidence": stats.CONFIDENCE,
      "bootstrap": {"draws": stats.BOOTSTRAP_DRAWS, "seed": stats.BOOTSTRAP_SEED},
      "rows": rows, "done": len(by_key), "units": len(units),
      "same_as": {k: r["same_as"] for k, r in by_key.items() if r.get("same_as")},
      "seconds": _seconds(by_key, units),
      "missing": [u.key for u in units if u.key not in by_key],
      "claims": [c for b in budgets for c in _claims(spec, by_key, b, runs, seeds, columns)],
      "select_on": spec.select_on, "claim_on": spec.claim_on,
  }


def _seconds(by_key: Mapping[str, Any], units: Sequence[Unit]) -> dict[str, dict[str, Any]]:
  """{"run/budget": {"train": mean s, "eval": mean s, "units": n}} of the units that trained
  (a reused unit's time is its twin's and is not counted again)."""
  acc: dict[str, list[tuple[float, float]]] = {}
  for u in units:
    r = by_key.get(u.key)
    if r is None or r.get("same_as"):
      continue
    acc.setdefault(f"{u.run}/{u.budget}", []).append((float(r.get("train_seconds") or 0.0),
                                                     float(r.get("eval_seconds") or 0.0)))
  return {k: {"train": round(sum(t for t, _ in v) / len(v), 1),
              "eval": round(sum(e for _, e in v) / len(v), 1), "units": len(v)}
          for k, v in acc.items()}


def _row(spec, by_key, budget, run, column, seeds) -> dict[str, Any]:
  label = spec.runs[run].label or run if run in spec.runs else run
  mine = {s: by_key.get(f"{run}/{budget}/seed{s}") for s in seeds}
  mine = {s: r for s, r in mine.items() if r is not None and column in r["scores"]}
  scores = [mine[s]["scores"][column]["score"] for s in mine]
  row: dict[str, Any] = {
      "budget": budget, "run": run, "label": label, "column": column, "seeds": list(mine),
      "scores": scores, "summary": stats.summarize(scores).to_json(),
      "steps": [mine[s]["steps"] for s in mine],
      "sequences": [mine[s]["sequences"] for s in mine],
      "metric": next((r["scores"][column]["metric"] for r in mine.values()), None),
      "vs_baseline": None}
  if run != spec.baseline:
    row["vs_baseline"] = _compare(by_key, budget, seeds, (run, column), (spec.baseline, column))
  return row


def _scores(by_key, budget, run, column, seeds) -> dict[int, Mapping[str, Any]]:
  """{seed: the column's scores} of the run's done units that have the column."""
  out = {}
  for s in seeds:
    r = by_key.get(f"{run}/{budget}/seed{s}")
    if r is not None and column in r["scores"]:
      out[s] = r["scores"][column]
  return out


def _compare(by_key, budget, seeds, a: tuple[str, str], b: tuple[str, str]) -> dict | None:
  """(run, column) a − (run, column) b, paired over the seeds both have: the t-interval of
  the per-seed differences and, where both scored the same items, the paired bootstrap over
  seeds × items. None when no seed is shared."""
  mine, base = _scores(by_key, budget, *a, seeds), _scores(by_key, budget, *b, seeds)
  paired = [s for s in mine if s in base]
  if not paired:
    return None
  cmp: dict[str, Any] = {
      "seeds": paired, "bootstrap": None,
      "diff": stats.paired_difference([mine[s]["score"] for s in paired],
                                      [base[s]["score"] for s in paired]).to_json()}
  items_a = [mine[s]["items"] for s in paired]
  items_b = [base[s]["items"] for s in paired]
  same_items = all(mine[s].get("ids") == base[s].get("ids") for s in paired)
  if same_items and len({len(x) for x in items_a + items_b}) == 1:
    cmp["bootstrap"] = stats.paired_bootstrap(np.asarray(items_a), np.asarray(items_b)).to_json()
  return cmp


def _mean(by_key, budget, run, column, seeds) -> float | None:
  values = [v["score"] for v in _scores(by_key, budget, run, column, seeds).values()]
  return float(np.mean(values)) if values else None


def _best(by_key, budget, pairs, seeds) -> tuple[tuple[str, str], float] | None:
  """The (run, column) of `pairs` with the highest mean over seeds (first on ties)."""
  scored = [(p, _mean(by_key, budget, *p, seeds)) for p in pairs]
  scored = [(p, m) for p, m in scored if m is not None]
  return max(scored, key=lambda pm: pm[1]) if scored else None


def _claims(spec, by_key, budget, runs, seeds, columns) -> list[dict[str, Any]]:
  """Each candidate against the best baseline, everything chosen on spec.select_on (dev) and
  reported on spec.claim_on (test), for one budget. Protocols: "prompt <p>" (every run on
  prompt p; the best baseline is the best on dev at p) and "dev-chosen prompt" (every run at
  its own best prompt on dev; the best baseline is the best such run)."""
  if not spec.candidates:
    return []
  prompts = [c.rsplit(":", 1)[1] for c in columns if c.rsplit(":", 1)[0] == spec.select_on]
  prompts = [p for p in prompts if f"{spec.claim_on}:{p}" in columns]
  dev = lambda p: f"{spec.select_on}:{p}"      # noqa: E731
  baselines = [r for r in runs if r not in spec.candidates]
  protocols = {f"prompt {p}": {r: [p] for r in runs} for p in prompts}
  if len(prompts) > 1:
    protocols["dev-chosen prompt"] = {r: prompts for r in runs}
  out = []
  for name, allowed in protocols.items():
    choice = {r: _best(by_key, budget, [(r, dev(p)) for p in allowed[r]], seeds) for r in runs}
    best = _best(by_key, budget, [choice[r][0] for r in baselines if choice[r]], seeds)
    if best is None:
      continue
    (base_run, base_dev), base_dev_mean = best
    base_test = (base_run, f"{spec.claim_on}:{base_dev.rsplit(':', 1)[1]}")
    rows = []
    for cand in [c for c in spec.candidates if c in runs]:   # --only may leave some out
      if choice[cand] is None:
        continue
      (_, cand_dev), cand_dev_mean = choice[cand]
      cand_test = (cand, f"{spec.claim_on}:{cand_dev.rsplit(':', 1)[1]}")
      rows.append({"run": cand, "column": cand_test[1], "dev_mean": cand_dev_mean,
                   "test_mean": _mean(by_key, budget, *cand_test, seeds),
                   "vs_best_baseline": _compare(by_key, budget, seeds, cand_test, base_test)})
    out.append({"budget": budget, "protocol": name,
                "baseline": {"run": base_run, "column": base_test[1], "dev_mean": base_dev_mean,
                             "test_mean": _mean(by_key, budget, *base_test, seeds)},
                "candidates": rows})
  return out


# --------------------------------------------------------------------------------------------
# Markdown, JSON, plots
# --------------------------------------------------------------------------------------------


def _f(v, digits: int = 1) -> str:
  return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _ci(low, high) -> str:
  return "–" if low is None or high is None else f"[{_f(low)}, {_f(high)}]"


def markdown(payload: Mapping[str, Any]) -> str:
  """results.md: per budget a table of every run × column."""
  pct = int(round(100 * payload["confidence"]))
  lines = [f"# Experiment `{payload['spec']}`", ""]
  if payload["description"]:
    lines += [payload["description"], ""]
  lines += [f"Spec: `{payload['source']}`. Seeds: {', '.join(map(str, payload['seeds']))}. "
            f"Baseline: `{payload['baseline']}`. {payload['done']}/{payload['units']} units done.",
            "", f"Scores ×100 per seed; mean ± std (sample std); {pct}% t-interval over seeds; "
            f"Δ = run − baseline paired over seeds ({pct}% t-interval) and a paired bootstrap over "
            f"seeds × test items ({payload['bootstrap']['draws']} draws, seed "
            f"{payload['bootstrap']['seed']}, percentile interval).", ""]
  for budget in payload["budgets"]:
    shared = sorted({k.split("/")[0] for k in payload.get("same_as", {})
                     if k.split("/")[1] == budget})
    reuse = (f" Runs with the same step count as under `epochs` reuse that training: "
             f"{', '.join(shared)}." if shared else "")
    lines += [f"## Budget `{budget}`", "", f"{payload['budget_text'][budget]}.{reuse}", "",
              f"| run | column | steps | per seed | mean ± std | {pct}% CI | Δ vs baseline | "
              f"Δ {pct}% CI (t) | Δ {pct}% CI (bootstrap) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in payload["rows"]:
      if row["budget"] != budget:
        continue
      s = row["summary"]
      per = ", ".join(_f(v) for v in row["scores"]) or "–"
      steps = "/".join(str(v) for v in sorted(set(row["steps"]))) or "–"
      cmp = row["vs_baseline"]
      if row["run"] == payload["baseline"]:
        delta = ("(baseline)", "", "")
      elif cmp is None:
        delta = ("–", "–", "–")
      else:
        d, b = cmp["diff"], cmp["bootstrap"]
        delta = (f"{_f(d['mean'])}", _ci(d["ci_low"], d["ci_high"]),
                 _ci(b["ci_low"], b["ci_high"]) if b else "–")
      lines.append(f"| {row['label']} | {row['column']} | {steps} | {per} | "
                   f"{_f(s['mean'])} ± {_f(s['std'])} | {_ci(s['ci_low'], s['ci_high'])} | "
                   f"{delta[0]} | {delta[1]} | {delta[2]} |")
    lines.append("")
  if payload.get("claims"):
    lines += [f"## Against the best baseline (chosen on `{payload['select_on']}`)", "",
              f"Everything chosen on `{payload['select_on']}` (the best baseline: the other run "
              f"with the highest mean there; under \"dev-chosen prompt\" also each run's "
              f"prompt); Δ = candidate − best baseline on `{payload['claim_on']}`, paired over "
              f"seeds ({pct}% t-interval) and over seeds × items (bootstrap).", "",
              "| budget | protocol | best baseline (dev → test) | candidate (dev → test) | Δ | "
              f"Δ {pct}% CI (t) | Δ {pct}% CI (bootstrap) |", "|---|---|---|---|---|---|---|"]
    for claim in payload["claims"]:
      b = claim["baseline"]
      base = (f"{b['run']} `{b['column'].rsplit(':', 1)[1]}` "
              f"({_f(b['dev_mean'])} → {_f(b['test_mean'])})")
      for c in claim["candidates"]:
        cmp = c["vs_best_baseline"]
        d = cmp["diff"] if cmp else None
        boot = cmp["bootstrap"] if cmp else None
        lines.append(
            f"| {claim['budget']} | {claim['protocol']} | {base} | {c['run']} "
            f"`{c['column'].rsplit(':', 1)[1]}` ({_f(c['dev_mean'])} → {_f(c['test_mean'])}) | "
            f"{_f(d['mean']) if d else '–'} | {_ci(d['ci_low'], d['ci_high']) if d else '–'} | "
            f"{_ci(boot['ci_low'], boot['ci_high']) if boot else '–'} |")
    lines.append("")
  if payload.get("seconds"):
    lines += ["## Wall time per unit", "",
              "Mean seconds of the units that trained (several units may have run at once).", "",
              "| run | budget | train s | eval s | units |", "|---|---|---|---|---|"]
    for key, t in payload["seconds"].items():
      run, budget = key.rsplit("/", 1)
      lines.append(f"| {run} | {budget} | {t['train']:.0f} | {t['eval']:.0f} | {t['units']} |")
    lines.append("")
  if payload["missing"]:
    lines += [f"Not done yet ({len(payload['missing'])}): " +
              ", ".join(f"`{k}`" for k in payload["missing"]), ""]
  return "\n".join(lines)


def plot(payload: Mapping[str, Any], out_dir: Path) -> list[Path]:
  """plots/scores_<budget>.png (mean and CI per run and column, dots = seeds) and
  plots/diff_<budget>.png (Δ vs baseline with the t and bootstrap intervals)."""
  import matplotlib  # pylint: disable=g-import-not-at-top  # optional heavy dependency
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  columns = payload["columns"]
  for budget in payload["budgets"]:
    rows = [r for r in payload["rows"] if r["budget"] == budget]
    if not rows or not columns:
      continue
    for kind in ("scores", "diff"):
      fig, axes = plt.subplots(1, len(columns), figsize=(max(4.0, 0.9 * len(payload["runs"]) + 2)
                                                        * len(columns), 3.8), squeeze=False)
      for ax, column in zip(axes[0], columns):
        sel = [r for r in rows if r["column"] == column and
               (kind == "scores" or r["run"] != payload["baseline"])]
        x = np.arange(len(sel))
        for i, r in enumerate(sel):
          if kind == "scores":
            s = r["summary"]
            if s["mean"] is None:
              continue
            err = None if s["ci_low"] is None else [[s["mean"] - s["ci_low"]],
                                                     [s["ci_high"] - s["mean"]]]
            ax.bar(i, s["mean"], yerr=err, capsize=4, color="#4c72b0", alpha=0.8)
            ax.plot([i] * len(r["scores"]), r["scores"], "k.", ms=4)
          elif r["vs_baseline"] is not None:
            d, b = r["vs_baseline"]["diff"], r["vs_baseline"]["bootstrap"]
            if d["ci_low"] is not None:
              ax.errorbar(i - 0.1, d["mean"], yerr=[[d["mean"] - d["ci_low"]],
                                                    [d["ci_high"] - d["mean"]]],
                          fmt="o", color="#4c72b0", capsize=4, label="t" if i == 0 else None)
            else:
              ax.plot(i - 0.1, d["mean"], "o", color="#4c72b0")
            if b is not None:
              ax.errorbar(i + 0.1, b["mean"], yerr=[[b["mean"] - b["ci_low"]],
                                                    [b["ci_high"] - b["mean"]]],
                          fmt="s", color="#dd8452", capsize=4,
                          label="bootstrap" if i == 0 else None)
        if kind == "diff":
          ax.axhline(0.0, color="grey", lw=0.8)
          if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.set_xticks(x)
        ax.set_xlim(-0.6, max(len(sel), 1) - 0.4)
        ax.set_xticklabels([r["label"] for r in sel], rotation=30, ha="right", fontsize=8)
        ax.set_title(column, fontsize=9)
        ax.set_ylabel("score ×100" if kind == "scores" else f"Δ vs {payload['baseline']}")
      fig.suptitle(f"{payload['spec']} — budget {budget}", fontsize=10)
      fig.tight_layout()
      path = out_dir / f"{kind}_{budget}.png"
      fig.savefig(path, dpi=110)
      plt.close(fig)
      paths.append(path)
  return paths


def write_report(payload: Mapping[str, Any], workdir: Path, *, plots: bool = True) -> list[Path]:
  """results.json, results.md and (with `plots`) plots/ in workdir; the paths written."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  jpath, mpath = workdir / "results.json", workdir / "results.md"
  jpath.write_text(json.dumps(payload, indent=1) + "\n")
  mpath.write_text(markdown(payload))
  out = [jpath, mpath]
  if plots:
    out += plot(payload, workdir / "plots")
  return out
