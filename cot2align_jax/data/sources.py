"""JSON Lines readers for the staged data sets (shared/data) and for rationale files.

Layouts (shared/data/README.md):

* "alpaca": the MiniLLM/DSKD rows {instruction, input, output, prompt, [topic|category]}; `input`
  may be missing (Vicuna) and then counts as ""; `output` is a str or a list of references
  (S-NI); the rendered `prompt` field is ignored (ours is rebuilt from the templates).
* "gsm8k": {question, answer}; question -> instruction, input "", the full step-by-step answer
  (ending in "#### N") -> the single output. `gsm8k_final_answer` extracts N.

Split names are the file names. In DSKD naming `valid` is the **test** split and `dev` the
validation split; `DatasetSpec.test_split` says which one is the test split.

Rationale files are JSON Lines {"id": ..., "rationale": ...} keyed by `Example.id`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

from cot2align_jax.data.records import DataError, Example
from cot2align_jax.core.paths import shared_dir

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Where a data set lives under the data directory and how its rows look."""

  folder: str
  splits: tuple[str, ...]
  layout: Literal["alpaca", "gsm8k"] = "alpaca"
  test_split: str = "valid"
  template: Literal["alpaca", "qa"] = "alpaca"     # prompts (data.records.TEMPLATES)
  metric: Literal["rougeL", "exact_match"] = "rougeL"   # evaluation metric of the test split
  shared: bool = True      # staged in ../shared/data (False: generated, e.g. by the demo)
  generated_by: str = ""   # for a generated set: what makes it (named in a file-not-found error)

  def path(self, data_dir: Path, split: str) -> Path:
    """The JSONL file of one split."""
    return data_dir / self.folder / f"{split}.jsonl"


DATASETS: dict[str, DatasetSpec] = {
    "dolly": DatasetSpec("dolly", ("train", "dev", "valid")),
    "self-inst": DatasetSpec("self-inst", ("valid",)),
    "vicuna": DatasetSpec("vicuna", ("valid",)),
    "sinst": DatasetSpec("sinst/11_", ("valid",)),
    "uinst": DatasetSpec("uinst/short_1050", ("valid",)),
    "alpaca": DatasetSpec("alpaca", ("dev", "test"), test_split="test"),
    "dialogsum": DatasetSpec("dialogsum", ("dev", "test"), test_split="test"),
    "sni_selfinstruct": DatasetSpec("sni_selfinstruct", ("dev", "test"), test_split="test"),
    "gsm8k": DatasetSpec("gsm8k", ("train", "test"), layout="gsm8k", test_split="test",
                         metric="exact_match"),
    # The synthetic multi-step arithmetic set of the demo (data/arith.py writes it; not in
    # ../shared): short "Q: ... A:" prompts, exact match of the final number.
    "arith": DatasetSpec("arith", ("train", "dev", "test"), test_split="test", template="qa",
                         metric="exact_match", shared=False,
                         generated_by="python -m cot2align_jax.demo writes it"),
    # The tiny size of that task (data.arith.tiny_examples, in memory, no files): the test
    # problem of student.tiny / teacher.tiny (configs/tiny.py), scored with ROUGE-L.
    "tiny": DatasetSpec("tiny", ("train", "dev", "test"), test_split="test", template="qa",
                        shared=False, generated_by="drawn in memory by data.arith.tiny_examples "
                        "for student.tiny / teacher.tiny runs; no files"),
}
# A user's own files (data/files.py): the splits are data.train_file / dev_file / test_file.
FILE_SPLITS = {"train": "train_file", "dev": "dev_file", "test": "test_file"}
for _name in ("file", "jsonl"):
  DATASETS[_name] = DatasetSpec("", tuple(FILE_SPLITS), test_split="test", shared=False,
                                generated_by="your own file, data." + "/".join(
                                    FILE_SPLITS.values()))
FILE_DATASETS = ("file", "jsonl")


class JsonlRead(NamedTuple):
  """Rows of a JSONL file as (line number, object), and how many bad lines were skipped."""

  rows: list[tuple[int, dict[str, Any]]]
  skipped: int


def data_dir(source: str | Path | None = None) -> Path:
  """The data directory: `source` if given, else shared/data; DataError if it is missing."""
  if source is not None:
    path = Path(source)
  else:
    shared = shared_dir()
    if shared is None:
      raise DataError("no data directory given and ../shared was not found; pass the data "
                      "directory or set COT2ALIGN_SHARED")
    path = shared / "data"
  if not path.is_dir():
    raise DataError(f"data directory {path} does not exist")
  return path


def _parse_line(path: Path, line_no: int, raw: bytes) -> dict[str, Any]:
  """One JSON object from one line; DataError naming the file and line otherwise."""
  try:
    obj = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as err:
    raise DataError(f"{path}:{line_no}: malformed JSON line ({err})") from err
  if not isinstance(obj, dict):
    raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
  return obj


def read_jsonl(path: str | Path, *, on_error: OnError = "raise",
               max_rows: int | None = None) -> JsonlRead:
  """Parse a JSON Lines file. Blank lines are ignored; line numbers are 1-based.

  Reading stops once `max_rows` rows (None: no limit) have been parsed.

  on_error="raise": a malformed line raises DataError naming the file and line number.
  on_error="skip": malformed lines are skipped and counted in `.skipped` (the caller reports).
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  path = Path(path)
  rows, skipped = [], 0
  with path.open("rb") as f:
    for line_no, raw in enumerate(f, start=1):
      if max_rows is not None and len(rows) >= max_rows:
        break
      if not raw.strip():
        continue
      try:
        rows.append((line_no, _parse_line(path, line_no, raw)))
      except DataError:
        if on_error == "raise":
          raise
        skipped += 1
  return JsonlRead(rows, skipped)


def _text(row: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
  """A string field of a row (DataError when missing and no default, or not a str)."""
  value = row.get(key, default)
  if value is None:
    raise DataError(f"{where}: missing field {key!r}")
  if not isinstance(value, str):
    raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
  return value


def _outputs(value: Any, where: str) -> tuple[str, ...]:
  """The references of a row: a str, or a non-empty list of str (S-NI)."""
  refs = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else None
  if not refs or not all(isinstance(r, str) for r in refs):
    raise DataError(f"{where}: 'output' must be a string or a non-empty list of strings")
  return refs


def row_to_example(row: Mapping[str, Any], *, dataset: str, split: str, index: int,
                   layout: str = "alpaca", where: str = "") -> Example:
  """Convert one parsed row; `index` (0-based row index) names it unless it has an "id"."""
  where = where or f"{dataset}/{split} row {index}"
  row_id = row.get("id")
  example_id = str(row_id) if row_id is not None else f"{dataset}/{split}/{index}"
  if layout == "gsm8k":
    return Example(id=example_id, instruction=_text(row, "question", where), input="",
                   outputs=(_text(row, "answer", where),), dataset=dataset, split=split)
  if layout != "alpaca":
    raise ValueError(f"unknown layout {layout!r}")
  if "output" not in row:
    raise DataError(f"{where}: missing field 'output'")
  return Example(id=example_id, instruction=_text(row, "instruction", where),
                 input=_text(row, "input", where, default=""),
                 outputs=_outputs(row["output"], where), dataset=dataset, split=split)


def dataset_spec(name: str) -> DatasetSpec:
  """The registry entry of a data set (KeyError listing the known names)."""
  if name not in DATASETS:
    raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
  return DATASETS[name]


def read_examples(name: str, split: str, *, source: str | Path | None = None,
                  max_examples: int | None = None, on_error: OnError = "raise") -> list[Example]:
  """The examples of one split of a registered data set, in file order.

  Ids are "{name}/{split}/{line number - 1}". With on_error="skip", malformed lines are
  skipped and a warning gives their count. `max_examples` keeps the first rows only.
  """
  spec = dataset_spec(name)
  if split not in spec.splits:
    raise KeyError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(spec.splits)}")
  path = spec.path(data_dir(source), split)
  if not path.is_file():
    hint = f" (a generated set: {spec.generated_by})" if spec.generated_by else ""
    raise DataError(f"{path}: file not found for {name}/{split}{hint}")
  read = read_jsonl(path, on_error=on_error, max_rows=max_examples)
  if read.skipped:
    log.warning("%s: skipped %d malformed lines", path, read.skipped)
  return [row_to_example(row, dataset=name, split=split, index=line_no - 1,
                         layout=spec.layout, where=f"{path}:{line_no}")
          for line_no, row in read.rows]


def iter_all_splits(names: Iterable[str] | None = None, *,
                    source: str | Path | None = None) -> Iterator[tuple[str, str, list[Example]]]:
  """(name, split, examples) for every split of the given (default: all staged) data sets."""
  for name in names or [n for n, spec in DATASETS.items() if spec.shared]:
    for split in dataset_spec(name).splits:
      yield name, split, read_examples(name, split, source=source)


def gsm8k_final_answer(text: str) -> str | None:
  """The final answer after the last "####" (stripped, thousands commas removed), or None."""
  if "####" not in text:
    return None
  return text.rsplit("####", 1)[1].strip().replace(",", "")


def gsm8k_rationale(text: str) -> str:
  """The worked solution before the last "####" (the whole text when there is none)."""
  return text.rsplit("####", 1)[0].strip()


# ---------------------------------------------------------------------------------------------
# Rationales


class ImportedRationales(dict):
  """id -> rationale; `.unknown_ids` lists the file's ids that matched no example (drop mode)."""

  unknown_ids: list[str]


def read_rationales(path: str | Path, *, on_error: OnError = "raise") -> dict[str, str]:
  """Read {"id": str, "rationale": str} lines into a dict.

  A line without a string id/rationale, or an id repeated with a different rationale, raises
  DataError naming the file and line (malformed JSON follows `on_error` as in `read_jsonl`).
  """
  path = Path(path)
  out: dict[str, str] = {}
  for line_no, row in read_jsonl(path, on_error=on_error).rows:
    where = f"{path}:{line_no}"
    rid = row.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
      rid = str(rid)
    if not isinstance(rid, str):
      raise DataError(f"{where}: rationale line needs a string 'id'")
    text = _text(row, "rationale", where)
    if out.get(rid, text) != text:
      raise DataError(f"{where}: id {rid!r} repeats with a different rationale")
    out[rid] = text
  return out


def import_rationales(path: str | Path, examples: Iterable[Example], *,
                      on_unknown: Literal["raise", "drop"] = "raise") -> ImportedRationales:
  """Rationales from a file, checked against the examples' ids.

  Ids that match no example raise DataError giving their count (default), or with
  on_unknown="drop" are dropped, listed in `.unknown_ids` and counted in a warning.
  """
  rationales = read_rationales(path)
  known = {ex.id for ex in examples}
  unknown = [rid for rid in rationales if rid not in known]
  if unknown and on_unknown == "raise":
    raise DataError(f"{path}: {len(unknown)} of {len(rationales)} rationale ids match no "
                    f"example (first: {unknown[:3]})")
  if unknown:
    log.warning("%s: dropped %d rationales with unknown ids", path, len(unknown))
  out = ImportedRationales((rid, text) for rid, text in rationales.items() if rid in known)
  out.unknown_ids = unknown
  return out


def write_rationales(path: str | Path, rationales: Mapping[str, str]) -> None:
  """Write id -> rationale as JSON Lines (the format `read_rationales` reads)."""
  with Path(path).open("w", encoding="utf-8") as f:
    for rid, text in rationales.items():
      f.write(json.dumps({"id": rid, "rationale": text}, ensure_ascii=False) + "\n")
