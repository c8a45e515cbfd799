"""GSM8K exact match of the final number (our addition to the evaluation, docs/method.md §5).

Extraction rules of `extract_answer(text)`, applied in order:

1. Numbers are found with one pattern: an optional minus sign (only when not glued to a
   preceding letter/digit, so "5-3" gives 5 and 3), then either digits with thousands commas
   ("1,234,567"), plain digits with an optional decimal part ("3.50"), or a bare decimal
   (".5"). A "$" or other currency sign before it and units, "%" or a full stop after it are
   simply not part of the match ("$18", "72 apples", "25%", "1,234." -> 18, 72, 25, 1234).
2. If the text contains "####" (the GSM8K gold format), the answer is the **first** number after
   the last "####".
3. Else, if it contains an answer marker — "the answer is", "answer:", "answer is" (any case;
   this covers the CoT joiner "Therefore, the answer is: ") — the answer is the **first** number
   after the **last** marker that is followed by a number.
4. Else the answer is the **last** number in the text.
5. No number anywhere: None (never counts as correct).

The number is returned canonical: commas dropped, parsed as a Decimal and normalised, so "3.50",
"3.5" and "3.500" are all "3.5", "18.00" is "18", "-0" is "0". `exact_match` compares the
canonical strings of the prediction and of the gold answer (`gold_answer` applies the same
rules to a GSM8K solution, which always ends in "#### N").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)|"
                    r"(?<=\w)(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)")
MARKERS = re.compile(r"the answer is|answer\s*:|answer is", re.IGNORECASE)
GOLD_MARKER = "####"


def canonical_number(token: str) -> str | None:
  """"1,234.50" -> "1234.5"; "-0.0" -> "0"; None when it is not a number."""
  try:
    value = Decimal(token.replace(",", "").strip())
  except InvalidOperation:
    return None
  if not value.is_finite():
    return None
  if value == 0:
    return "0"
  value = value.normalize()
  text = format(value, "f")
  return text


def _numbers(text: str) -> list[str]:
  return [m.group(0) for m in NUMBER.finditer(text)]


def extract_answer(text: str) -> str | None:
  """The final numeric answer of a model output or gold solution (rules in the module doc)."""
  if GOLD_MARKER in text:
    after = _numbers(text.rsplit(GOLD_MARKER, 1)[1])
    return canonical_number(after[0]) if after else None
  for marker in reversed(list(MARKERS.finditer(text))):
    after = _numbers(text[marker.end():])
    if after:
      return canonical_number(after[0])
  found = _numbers(text)
  return canonical_number(found[-1]) if found else None


def gold_answer(solution: str) -> str | None:
  """The canonical final number of a GSM8K solution ("... #### 72" -> "72")."""
  return extract_answer(solution)


def exact_match(prediction: str, gold: str) -> bool:
  """Whether the prediction's final number equals the gold solution's (canonical strings)."""
  want = gold_answer(gold)
  got = extract_answer(prediction)
  return want is not None and got == want


def accuracy(predictions: Sequence[str], golds: Sequence[str]) -> float:
  """100 × the fraction of exact matches (0.0 for an empty list)."""
  if len(predictions) != len(golds):
    raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold answers")
  if not predictions:
    return 0.0
  return 100.0 * sum(exact_match(p, g) for p, g in zip(predictions, golds)) / len(predictions)
