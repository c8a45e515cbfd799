"""Our ROUGE-L equals rouge_score called directly (stemmer on, max over references, ×100)."""

import json

import pytest
from rouge_score import rouge_scorer

from cot2align_jax.evaluation.rouge import corpus_rouge_l, rouge_l, rouge_l_scores

FIXED = [
    ("The cat sat on the mat.", ["A cat was sitting on the mat"]),
    ("running runners ran", ["the runner runs quickly", "ran running"]),       # stemming
    ("", ["anything at all"]),                                                 # empty prediction
    ("Paris is the capital of France.", ["Paris", "The capital of France is Paris."]),
    ("Ünïcode — tokens, punctuation!!! and 123 numbers", ["unicode tokens and 123 numbers"]),
    ("same same same", ["same"]),
    ("completely different words", ["nothing overlaps here"]),
]


def _direct(pred, refs):
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  return 100.0 * max(scorer.score(r, pred)["rougeL"].fmeasure for r in refs)


@pytest.mark.parametrize("pred,refs", FIXED)
def test_fixed_list_matches_rouge_score(pred, refs):
  assert rouge_l(pred, refs) == _direct(pred, refs)


def test_single_reference_string_and_order_of_arguments():
  # rouge_score's signature is score(target, prediction); precision/recall must not be swapped
  pred, ref = "a b c d e f", "a b"
  direct = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"]
  assert rouge_l(pred, ref) == pytest.approx(100 * direct.fmeasure)
  assert direct.recall == 1.0 and direct.precision < 1.0


def test_sni_multi_reference_rows(shared):
  """Real S-NI rows with 2+ references: predictions made from one reference (so the max is
  attained at a non-first reference for some rows) equal the direct computation."""
  rows = [json.loads(line) for line in
          (shared / "data" / "sinst" / "11_" / "valid.jsonl").open(encoding="utf-8")]
  multi = [r for r in rows if len(r["output"]) >= 3][:12]
  assert len(multi) == 12
  preds = [r["output"][-1][: max(1, len(r["output"][-1]) // 2)] + " extra words" for r in multi]
  refs = [r["output"] for r in multi]
  ours = rouge_l_scores(preds, refs)
  direct = [_direct(p, r) for p, r in zip(preds, refs)]
  assert ours == direct
  first_only = [_direct(p, r[:1]) for p, r in zip(preds, refs)]
  assert any(d > f for d, f in zip(direct, first_only))   # the max really uses later refs
  assert corpus_rouge_l(preds, refs) == pytest.approx(sum(direct) / len(direct))


def test_bad_inputs():
  with pytest.raises(ValueError):
    rouge_l("x", [])
  with pytest.raises(ValueError):
    rouge_l_scores(["a"], [["a"], ["b"]])
  assert corpus_rouge_l([], []) == 0.0
