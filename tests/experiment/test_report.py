"""experiment/report.py: rows of the report from synthetic unit results."""

import json

import numpy as np
import pytest

from cot2align_jax.experiment import report, stats
from cot2align_jax.experiment.plan import Unit
from cot2align_jax.experiment.spec import from_value

COL = "arith/test:plain"


def _spec():
  return from_value(dict(name="syn", runs={"base": "c.py", "new": "c.py"}, baseline="base",
                         seeds=[0, 1, 2], budgets=["epochs"], epochs=1))


def _unit(run, seed):
  return Unit(run=run, budget="epochs", seed=seed, config_path="c.py", config_arg=None,
              overrides={}, method="sft", records=10, batch_size=2, steps=5)


def _result(run, seed, items):
  return {"unit": f"{run}/epochs/seed{seed}", "run": run, "budget": "epochs", "seed": seed,
          "steps": 5, "sequences": 10,
          "scores": {COL: {"metric": "exact_match", "n": len(items), "items": list(items),
                           "ids": [f"i{k}" for k in range(len(items))],
                           "score": float(np.mean(items))}}}


def test_aggregate_rows_use_the_statistics():
  rng = np.random.default_rng(0)
  items = {(r, s): (rng.random(20) < (0.5 if r == "new" else 0.3)) * 100.0
           for r in ("base", "new") for s in (0, 1, 2)}
  units = [_unit(r, s) for s in (0, 1, 2) for r in ("base", "new")]
  # new/seed2 is not done: it is missing, and the paired comparison uses seeds 0 and 1 only
  results = [_result(r, s, items[r, s]) for (r, s) in items if (r, s) != ("new", 2)]
  payload = report.aggregate(_spec(), units, results)
  assert payload["missing"] == ["new/epochs/seed2"]
  rows = {(r["run"], r["column"]): r for r in payload["rows"]}
  base, new = rows["base", COL], rows["new", COL]
  base_scores = [items["base", s].mean() for s in (0, 1, 2)]
  assert base["scores"] == pytest.approx(base_scores)
  assert base["summary"] == pytest.approx(stats.summarize(base_scores).to_json())
  assert base["vs_baseline"] is None
  a = [items["new", s].mean() for s in (0, 1)]
  b = [items["base", s].mean() for s in (0, 1)]
  cmp = new["vs_baseline"]
  assert cmp["seeds"] == [0, 1]
  assert cmp["diff"] == pytest.approx(stats.paired_difference(a, b).to_json())
  boot = stats.paired_bootstrap(np.stack([items["new", s] for s in (0, 1)]),
                                np.stack([items["base", s] for s in (0, 1)]))
  assert cmp["bootstrap"] == pytest.approx(boot.to_json())
  # the report survives a JSON round trip unchanged (what --aggregate_only reads back)
  again = report.aggregate(_spec(), units, json.loads(json.dumps(results)))
  assert json.dumps(again) == json.dumps(payload)
  md = report.markdown(payload)
  assert f"{np.mean(base_scores):.1f}" in md and "new/epochs/seed2" in md


def test_bootstrap_skipped_when_items_differ():
  units = [_unit(r, s) for s in (0, 1) for r in ("base", "new")]
  results = [_result("base", 0, [0, 100]), _result("base", 1, [100, 0]),
             _result("new", 0, [100, 100]), _result("new", 1, [100, 0, 0])]
  row = [r for r in report.aggregate(_spec(), units, results)["rows"] if r["run"] == "new"][0]
  assert row["vs_baseline"]["diff"]["n"] == 2
  assert row["vs_baseline"]["bootstrap"] is None


def _result_cols(run, seed, cols):
  return {"unit": f"{run}/epochs/seed{seed}", "run": run, "budget": "epochs", "seed": seed,
          "steps": 5, "sequences": 10,
          "scores": {c: {"metric": "exact_match", "n": len(v), "items": list(v),
                         "ids": [f"i{k}" for k in range(len(v))], "score": float(np.mean(v))}
                     for c, v in cols.items()}}


def test_claims_choose_baseline_and_prompt_on_dev_and_report_on_test():
  """The best baseline and each run's prompt are chosen on dev; Δ on test equals an
  independent paired t-interval (scipy) over the seeds."""
  scipy_stats = pytest.importorskip("scipy.stats")
  spec = from_value(dict(
      name="syn", runs={"a": "c.py", "b": "c.py", "new": "c.py"}, baseline="a", seeds=[0, 1, 2],
      budgets=["epochs"], epochs=1, candidates=["new"], select_on="t/dev", claim_on="t/test",
      evaluation=dict(datasets=["t/dev", "t/test"], prompts=["plain", "cot"])))
  rng = np.random.default_rng(1)
  # dev means: a plain 30, b plain 50 (the best baseline), new plain 40 / cot 70 (its prompt)
  p_dev = {("a", "plain"): .3, ("a", "cot"): .1, ("b", "plain"): .5, ("b", "cot"): .2,
           ("new", "plain"): .4, ("new", "cot"): .7}
  results, test = [], {}
  for run in ("a", "b", "new"):
    for seed in (0, 1, 2):
      cols = {}
      for prompt in ("plain", "cot"):
        cols[f"t/dev:{prompt}"] = np.where(np.arange(40) < 40 * p_dev[run, prompt], 100.0, 0.0)
        test[run, prompt, seed] = (rng.random(30) < p_dev[run, prompt]) * 100.0
        cols[f"t/test:{prompt}"] = test[run, prompt, seed]
      results.append(_result_cols(run, seed, cols))
  units = [_unit(r, s) for s in (0, 1, 2) for r in ("a", "b", "new")]
  claims = {c["protocol"]: c for c in report.aggregate(spec, units, results)["claims"]}
  assert set(claims) == {"prompt plain", "prompt cot", "dev-chosen prompt"}
  chosen = claims["dev-chosen prompt"]
  assert chosen["baseline"]["run"] == "b" and chosen["baseline"]["column"] == "t/test:plain"
  row = chosen["candidates"][0]
  assert row["column"] == "t/test:cot" and row["dev_mean"] == pytest.approx(70.0)
  d = [test["new", "cot", s].mean() - test["b", "plain", s].mean() for s in (0, 1, 2)]
  sem = scipy_stats.sem(d)
  low, high = scipy_stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=sem)
  got = row["vs_best_baseline"]["diff"]
  assert (got["mean"], got["ci_low"], got["ci_high"]) == pytest.approx((np.mean(d), low, high))
  plain = claims["prompt plain"]
  assert plain["baseline"]["run"] == "b" and plain["candidates"][0]["column"] == "t/test:plain"
  assert claims["prompt cot"]["baseline"]["column"] == "t/test:cot"
  md = report.markdown(report.aggregate(spec, units, results))
  assert "Against the best baseline" in md and "dev-chosen prompt" in md
  # --only without the candidate: the best baseline is still chosen, with nothing to compare
  only = [u for u in units if u.run != "new"]
  claims = report.aggregate(spec, only, results)["claims"]
  assert claims and all(c["baseline"]["run"] == "b" and not c["candidates"] for c in claims)


@pytest.mark.parametrize("extra,match", [
    (dict(candidates=["nope"]), "not a run"),
    (dict(candidates=["base", "new"]), "no baseline is left"),
    (dict(candidates=["new"], select_on="t/dev"), "claim_on"),
])
def test_bad_claim_settings_raise(extra, match):
  with pytest.raises(Exception, match=match):
    from_value(dict(name="syn", runs={"base": "c.py", "new": "c.py"}, baseline="base",
                    seeds=[0], budgets=["epochs"], epochs=1, **extra))
