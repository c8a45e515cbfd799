"""ROUGE-L F as the MiniLLM / DSKD / CoT2Align evaluation computes it (docs/method.md §5).

    rouge_l("the cat sat", ["a cat sat down", "the cat"])   # -> 100 * max_r F(rougeL)
    corpus_rouge_l(predictions, references)                 # -> mean over examples

The score of one prediction is `rouge_score.rouge_scorer.RougeScorer(["rougeL"],
use_stemmer=True).score(target=reference, prediction=prediction)["rougeL"].fmeasure`, maximised
over the references and multiplied by 100. Tokenization is therefore exactly rouge_score's
default (lower-case, non-alphanumerics to spaces, Porter stemming of tokens longer than 3
characters); nothing is pre-processed here. An empty prediction or reference scores 0 (as
rouge_score does). The corpus score is the mean of the per-example scores (the references'
`compute_metrics`: `100 * sum(max_r rougeL) / n`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from rouge_score import rouge_scorer


@functools.lru_cache(maxsize=1)
def scorer() -> rouge_scorer.RougeScorer:
  """The shared scorer: rougeL with the Porter stemmer on."""
  return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _refs(references: str | Sequence[str]) -> list[str]:
  refs = [references] if isinstance(references, str) else list(references)
  if not refs:
    raise ValueError("need at least one reference")
  if not all(isinstance(r, str) for r in refs):
    raise ValueError("references must be strings")
  return refs


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
  """100 × max over references of the ROUGE-L F-measure of `prediction` (in [0, 100])."""
  if not isinstance(prediction, str):
    raise ValueError(f"prediction must be a str, got {type(prediction).__name__}")
  s = scorer()
  return 100.0 * max(s.score(ref, prediction)["rougeL"].fmeasure for ref in _refs(references))


def rouge_l_scores(predictions: Sequence[str],
                   references: Sequence[str | Sequence[str]]) -> list[float]:
  """Per-example `rouge_l` (×100) for aligned lists."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} reference sets")
  return [rouge_l(p, r) for p, r in zip(predictions, references)]


def corpus_rouge_l(predictions: Sequence[str],
                   references: Sequence[str | Sequence[str]]) -> float:
  """Mean per-example ROUGE-L F ×100 (0.0 for an empty corpus)."""
  scores = rouge_l_scores(predictions, references)
  return sum(scores) / len(scores) if scores else 0.0
