"""Teacher rationales for the CoT records (docs/method.md §2), resumable; imports of external ones.

    report = generate_rationales(teacher, tok, examples, "work/rationales.jsonl", seed=10)
    report = import_rationale_file("gpt4_rationales.jsonl", examples, "work/rationales.jsonl")

The output is JSON Lines {"id": example id, "rationale": text} (`data.sources.read_rationales`),
**appended** to, one flush + fsync per batch. Sampling: the CoT prompt, `RATIONALE_SETTINGS`
(T=1, top-p 1, top-k off, no-repeat-ngram 6, 512 / 256 tokens) or any `SamplingSettings`; the
rationale is the generated text cut at EOS and stripped. Examples: those `cot_rule` selects
(data/records.py; "nonempty_input" by default, "all" for GSM8K).

Resuming: batch k = selected[k*B:(k+1)*B] is sampled with `batch_seed(seed, k)`. A rerun skips
batches whose ids are all in the file, regenerates a partly written batch with the same seed and
appends only its missing ids, and cuts a torn last line (with a warning). So a resumed run writes
each id exactly once, with the same texts when batch size, seed, settings and order are kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

import jax
import numpy as np
from jax.experimental import multihost_utils

from cot2align_jax.data.records import CotRule, DataError, Example, cot_prompt, cot_selector
from cot2align_jax.data.sources import import_rationales, read_rationales
from cot2align_jax.evaluation.protocol import SamplingSettings, TextGenerator, batch_seed

log = logging.getLogger(__name__)

RATIONALE_SETTINGS = SamplingSettings(temperature=1.0, top_p=1.0, top_k=0,
                                      no_repeat_ngram_size=6, max_length=512,
                                      max_prompt_length=256)


@dataclasses.dataclass
class RationaleReport:
  path: Path
  selected: int            # examples the rule selected (after max_examples)
  already_done: int        # of those, ids present in the file before this run
  generated: int           # ids written by this run
  batches_run: int
  batches_skipped: int
  tokens: int              # generated tokens (real rows)
  seconds: float           # generation time (device + decode), compiles included

  @property
  def tokens_per_s(self) -> float:
    return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _repair_tail(path: Path) -> None:
  """Cut a torn (unterminated) last line off the file."""
  if not path.exists() or path.stat().st_size == 0:
    return
  with path.open("rb+") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b"\n":
      return
    f.seek(0)
    data = f.read()
    keep = data.rfind(b"\n") + 1
    log.warning("%s: cutting off a torn last line (%d bytes) left by an interrupted run", path,
                len(data) - keep)
    f.truncate(keep)


def done_rationales(path: str | Path) -> dict[str, str]:
  """The rationales already in `path` ({} when it does not exist), after repairing its tail."""
  path = Path(path)
  if not path.exists():
    return {}
  _repair_tail(path)
  return read_rationales(path)


def _append(path: Path, rows: Iterable[tuple[str, str]]) -> int:
  n = 0
  with path.open("a", encoding="utf-8") as f:
    for rid, text in rows:
      f.write(json.dumps({"id": rid, "rationale": text}, ensure_ascii=False) + "\n")
      n += 1
    f.flush()
    os.fsync(f.fileno())
  return n


def _done_ids(selected: Sequence[Example], done: dict[str, str]) -> set[str]:
  """Ids of `selected` that already have a rationale, as process 0 read them from the file:
  every process of a multi-process job must skip the same batches (they run the generation
  together), whether or not it sees the file, and whenever it read it."""
  if jax.process_count() == 1 or not selected:
    return {ex.id for ex in selected if ex.id in done}
  flags = np.asarray([ex.id in done for ex in selected], np.int32)
  flags = np.asarray(multihost_utils.broadcast_one_to_all(flags))
  return {ex.id for ex, flag in zip(selected, flags) if flag}


def generate_rationales(model, tokenizer, examples: Sequence[Example], out_path: str | Path, *,
                        settings: SamplingSettings | None = None, seed: int = 10,
                        batch_size: int = 8, cot_rule: CotRule = "nonempty_input",
                        max_examples: int | None = None, mesh: jax.sharding.Mesh | None = None,
                        data_axis: str = "data", max_batches: int | None = None,
                        log_every: int = 1,
                        prompt_fn: Callable[[Example], str] | None = None) -> RationaleReport:
  """Samples one rationale per selected example on the CoT prompt, appending to `out_path`.

  max_examples: keep the first N examples (before the rule). max_batches: stop after running
  that many batches (for tests and quick looks; a later call resumes). Only process 0 writes.
  prompt_fn(example): the CoT prompt (default data.records.cot_prompt, the Alpaca template).
  """
  out_path = Path(out_path)
  ids = [ex.id for ex in examples]
  if len(set(ids)) != len(ids):
    raise DataError("examples have duplicate ids; rationales are keyed by id")
  pick = cot_selector(cot_rule)
  examples = list(examples)[:max_examples] if max_examples else list(examples)
  selected = [ex for ex in examples if pick(ex)]
  writer = jax.process_index() == 0
  if writer:
    out_path.parent.mkdir(parents=True, exist_ok=True)
  done = done_rationales(out_path) if writer else {}  # repairs a torn tail: the writer only
  known = {ex.id for ex in examples}
  stray = [rid for rid in done if rid not in known]
  if stray and not max_examples:
    log.warning("%s: %d ids in the file match no given example (first: %s)", out_path,
                len(stray), stray[:3])
  done_ids = _done_ids(selected, done)
  already = sum(ex.id in done_ids for ex in selected)
  settings = settings or RATIONALE_SETTINGS
  generator = TextGenerator(model, tokenizer, settings, batch_size=batch_size, mesh=mesh,
                            data_axis=data_axis)
  report = RationaleReport(out_path, len(selected), already, 0, 0, 0, 0, 0.0)
  n_batches = (len(selected) + batch_size - 1) // batch_size
  log.info("rationales: %d selected, %d already in %s, %d batches of %d", len(selected),
           already, out_path, n_batches, batch_size)
  start = time.perf_counter()
  for k in range(n_batches):
    batch = selected[k * batch_size:(k + 1) * batch_size]
    missing = [ex for ex in batch if ex.id not in done_ids]
    if not missing:
      report.batches_skipped += 1
      continue
    if max_batches is not None and report.batches_run >= max_batches:
      break
    encoded = [generator.encode((prompt_fn or cot_prompt)(ex)) for ex in batch]
    out = generator.generate_ids(encoded, batch_seed(seed, k))
    rows = [(ex.id, text) for ex, text in zip(batch, out.texts) if ex.id not in done_ids]
    if writer:
      _append(out_path, rows)
    done_ids.update(rid for rid, _ in rows)
    report.generated += len(rows)
    report.batches_run += 1
    report.tokens += out.n_tokens
    report.seconds += out.seconds
    if log_every and report.batches_run % log_every == 0:
      have = already + report.generated
      elapsed = time.perf_counter() - start
      rate = report.generated / elapsed if elapsed > 0 else 0.0
      eta = (len(selected) - have) / rate if rate > 0 else float("nan")
      log.info("rationales: %d/%d (%.1f%%) | batch %d/%d | %.0f tok/s | eta %.0f s", have,
               len(selected), 100.0 * have / max(len(selected), 1), k + 1, n_batches,
               report.tokens_per_s, eta)
  return report


@dataclasses.dataclass
class ImportReport:
  path: Path
  in_file: int             # rationales in the source file (matching ids)
  added: int               # appended to out_path
  already_present: int     # same id and same text already in out_path
  unknown_ids: list[str]   # ids matching no example (only with on_unknown="drop")


def import_rationale_file(source: str | Path, examples: Sequence[Example],
                          out_path: str | Path, *,
                          on_unknown: Literal["raise", "drop"] = "raise") -> ImportReport:
  """Appends the rationales of an external file (any LLM; JSONL {"id", "rationale"}) to
  `out_path`, keyed by example id.

  Ids that match no example raise DataError with their count (on_unknown="raise", default),
  or are dropped and counted (on_unknown="drop"). An id already in out_path with the same text
  is skipped; with a different text it raises DataError (remove one of them first).
  """
  imported = import_rationales(source, examples, on_unknown=on_unknown)
  out_path = Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  done = done_rationales(out_path)
  clash = [rid for rid, text in imported.items() if rid in done and done[rid] != text]
  if clash:
    raise DataError(f"{source}: {len(clash)} ids already have a different rationale in "
                    f"{out_path} (first: {clash[:3]})")
  new = [(rid, text) for rid, text in imported.items() if rid not in done]
  added = _append(out_path, new) if new else 0
  return ImportReport(out_path, len(imported), added, len(imported) - added,
                      list(imported.unknown_ids))
