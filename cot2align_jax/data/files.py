"""A user's own data file → Examples (docs/data.md): JSONL, JSON, Parquet, CSV or a saved
Hugging Face `datasets` directory, with a field mapping.

    read = read_file("my/train.jsonl", split="train", fields="auto", on_error="skip")
    read.examples, read.bad       # Examples in file order; BadRows (where, reason) skipped

Field mappings (`parse_fields`): "auto" (from the first row's keys), "alpaca"
(instruction / input / output), "prompt_response" (prompt / response, or prompt / completion),
"messages" (a list of {role, content} with system / user / assistant turns), or explicit
"instruction=question,output=answer" / "prompt=q,response=a" / "messages=conversation".

A chat row gives one Example per non-empty assistant turn: its response is that turn, its
prompt the conversation before it (so the loss falls on assistant turns only, each once). The
Alpaca template sees the last user turn as the instruction and the earlier turns as the
input; `Example.messages` keeps the turns for the chat template.

Bad rows (a malformed or non-UTF-8 line, a missing or non-string mapped field, an empty
response, a conversation without a user turn before an assistant turn) are collected as
BadRow; on_error="raise" raises a one-line DataError at the first one instead.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, NamedTuple, Sequence

import pyarrow.ipc
import pyarrow.parquet

from cot2align_jax.data.records import DataError, Example, transcript

OnError = Literal["raise", "skip"]
FORMATS = (".jsonl", ".json", ".parquet", ".csv")
KINDS = {"alpaca": ("instruction", "input", "output"),
         "prompt_response": ("prompt", "response"),
         "messages": ("messages",)}
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class FieldMap:
  """Which column holds what: kind (a KINDS key) and {role in KINDS[kind]: column name}."""

  kind: str
  columns: Mapping[str, str]


class BadRow(NamedTuple):
  where: str      # "file:line" (JSONL, CSV) or "file:row" (0-based, other formats)
  reason: str


class FileRead(NamedTuple):
  examples: list[Example]
  bad: list[BadRow]


def parse_fields(text: str) -> FieldMap | None:
  """A field mapping from its config text (None for "auto"); DataError on a bad one."""
  text = (text or "auto").strip()
  if text == "auto":
    return None
  if text in KINDS:
    cols = dict(zip(KINDS[text], KINDS[text]))
    return FieldMap(text, cols)
  pairs = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    role, sep, col = part.partition("=")
    if not sep or not role.strip() or not col.strip():
      raise DataError(f"data.fields: expected role=column pairs, got {part!r}")
    pairs[role.strip()] = col.strip()
  for kind, roles in KINDS.items():
    if set(pairs) <= set(roles) and set(pairs) & set(roles):
      cols = {r: pairs.get(r, r) for r in roles}
      return FieldMap(kind, cols)
  raise DataError(f"data.fields: {text!r} maps no known layout; use roles of one of "
                  + "; ".join(f"{k}: {', '.join(v)}" for k, v in KINDS.items()))


def detect_fields(row: Mapping[str, Any]) -> FieldMap | None:
  """The mapping a row's keys suggest: "messages" → chat, "prompt" → prompt / response (or
  completion), "instruction" → Alpaca; None when they suggest none."""
  if "messages" in row:
    return FieldMap("messages", {"messages": "messages"})
  if "prompt" in row:
    return FieldMap("prompt_response", {"prompt": "prompt", "response": "completion" if (
        "completion" in row and "response" not in row) else "response"})
  if "instruction" in row:
    return FieldMap("alpaca", dict(zip(KINDS["alpaca"], KINDS["alpaca"])))
  return None


# --------------------------------------------------------------------------------------------
# Rows of each format: (where, row dict) or (where, DataError) for a line that cannot be read
# --------------------------------------------------------------------------------------------


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
  with path.open("rb") as f:
    for line_no, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        yield where, json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError:
        yield where, DataError(f"{where}: not UTF-8")
      except json.JSONDecodeError as e:
        yield where, DataError(f"{where}: malformed JSON ({e.msg})")


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
  try:
    data = json.loads(path.read_bytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: not a UTF-8 JSON file ({type(e).__name__})") from None
  if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
    data = next(iter(data.values()))           # {"data": [...]}
  if not isinstance(data, list):
    raise DataError(f"{path}: a JSON file must hold a list of rows (or {{name: [rows]}})")
  for i, row in enumerate(data):
    yield f"{path}:row {i}", row


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
  try:
    text = path.read_bytes().decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 (byte {e.start})") from None
  reader = csv.DictReader(text.splitlines(keepends=True))
  for row in reader:
    yield f"{path}:{reader.line_num}", row


def _table_rows(table, where: str) -> Iterator[tuple[str, Any]]:
  for i, row in enumerate(table.to_pylist()):
    yield f"{where}:row {i}", row


def _saved_dataset_rows(path: Path) -> Iterator[tuple[str, Any]]:
  """A `datasets` save_to_disk directory (state.json + Arrow stream files)."""
  if (path / "dataset_dict.json").is_file():
    splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    raise DataError(f"{path}: a saved DatasetDict; name one split folder ("
                    + ", ".join(str(path / s) for s in splits) + ")")
  state = path / "state.json"
  if not state.is_file():
    raise DataError(f"{path}: a directory but not a saved `datasets` dataset (no state.json)")
  for item in json.loads(state.read_text()).get("_data_files", []):
    with pyarrow.ipc.open_stream(str(path / item["filename"])) as reader:
      yield from _table_rows(reader.read_all(), str(path / item["filename"]))


def iter_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
  """(where, row) of a data file of any supported format, in file order."""
  path = Path(path)
  if path.is_dir():
    yield from _saved_dataset_rows(path)
    return
  if not path.is_file():
    raise DataError(f"{path}: file not found")
  suffix = path.suffix.lower()
  if suffix == ".jsonl":
    yield from _jsonl_rows(path)
  elif suffix == ".json":
    yield from _json_rows(path)
  elif suffix == ".csv":
    yield from _csv_rows(path)
  elif suffix == ".parquet":
    yield from _table_rows(pyarrow.parquet.read_table(str(path)), str(path))
  else:
    raise DataError(f"{path}: unknown format {suffix or '(no suffix)'}; known: "
                    f"{', '.join(FORMATS)} or a saved `datasets` directory")


# --------------------------------------------------------------------------------------------
# Rows → Examples
# --------------------------------------------------------------------------------------------


def _field(row: Mapping[str, Any], column: str, where: str, *, optional: bool = False) -> str:
  value = row.get(column)
  if value is None and optional:
    return ""
  if value is None:
    raise DataError(f"{where}: missing field {column!r}")
  if not isinstance(value, str):
    raise DataError(f"{where}: field {column!r} must be a string, got {type(value).__name__}")
  return value


def _nonempty(text: str, where: str, what: str) -> str:
  if not text.strip():
    raise DataError(f"{where}: empty {what}")
  return text


def _turns(row: Mapping[str, Any], column: str, where: str) -> list[tuple[str, str]]:
  value = row.get(column)
  if not isinstance(value, list) or not value:
    raise DataError(f"{where}: field {column!r} must be a non-empty list of "
                    "{role, content} turns")
  out = []
  for k, turn in enumerate(value):
    if not isinstance(turn, Mapping) or turn.get("role") not in ROLES or not isinstance(
        turn.get("content"), str):
      raise DataError(f"{where}: turn {k} must be {{role: system|user|assistant, "
                      "content: str}}")
    out.append((turn["role"], turn["content"]))
  return out


def chat_examples(turns: Sequence[tuple[str, str]], *, base_id: str, where: str, name: str,
                  split: str) -> list[Example]:
  """One Example per non-empty assistant turn (its prompt: every turn before it)."""
  out = []
  answers = [i for i, (role, text) in enumerate(turns) if role == "assistant" and text.strip()]
  if not answers:
    raise DataError(f"{where}: empty response (no non-empty assistant turn)")
  for n, i in enumerate(answers):
    prompt = list(turns[:i])
    users = [j for j, (role, _) in enumerate(prompt) if role == "user"]
    if not users:
      raise DataError(f"{where}: assistant turn {i} has no user turn before it")
    last = users[-1]
    ex_id = base_id if len(answers) == 1 else f"{base_id}#{n}"
    out.append(Example(id=ex_id, instruction=prompt[last][1],
                       input=transcript(prompt[:last] + prompt[last + 1:]),
                       outputs=(turns[i][1],), dataset=name, split=split,
                       messages=tuple(prompt)))
  return out


def row_examples(row: Any, fmap: FieldMap, *, index: int, where: str, name: str,
                 split: str) -> list[Example]:
  """The Examples of one row (DataError naming `where` on a bad one)."""
  if isinstance(row, DataError):
    raise row
  if not isinstance(row, Mapping):
    raise DataError(f"{where}: expected an object, got {type(row).__name__}")
  row_id = row.get("id")
  base_id = str(row_id) if row_id not in (None, "") else f"{name}/{split}/{index}"
  c = fmap.columns
  if fmap.kind == "messages":
    return chat_examples(_turns(row, c["messages"], where), base_id=base_id, where=where,
                         name=name, split=split)
  if fmap.kind == "prompt_response":
    instruction, inp = _field(row, c["prompt"], where), ""
    output = _field(row, c["response"], where)
  else:
    instruction = _field(row, c["instruction"], where)
    inp = _field(row, c["input"], where, optional=True)
    output = _field(row, c["output"], where)
  return [Example(id=base_id, instruction=_nonempty(instruction, where, "prompt"), input=inp,
                  outputs=(_nonempty(output, where, "response"),), dataset=name, split=split)]


def read_file(path: str | Path, *, split: str, fields: str = "auto", on_error: OnError = "skip",
              max_examples: int | None = None, name: str = "file") -> FileRead:
  """The Examples of one data file (see the module docstring), the first `max_examples`."""
  if on_error not in ("raise", "skip"):
    raise DataError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
  fmap = parse_fields(fields)
  examples: list[Example] = []
  bad: list[BadRow] = []
  for index, (where, row) in enumerate(iter_rows(path)):
    if max_examples is not None and len(examples) >= max_examples:
      break
    if fmap is None and isinstance(row, Mapping):
      fmap = detect_fields(row)
      if fmap is None:
        raise DataError(f"{where}: cannot tell the layout from the keys {sorted(row)[:8]}; "
                        "set data.fields (e.g. instruction=question,output=answer)")
    try:
      examples += row_examples(row, fmap or FieldMap("alpaca", {}), index=index, where=where,
                               name=name, split=split)
    except DataError as e:
      if on_error == "raise":
        raise
      bad.append(BadRow(where, str(e).removeprefix(f"{where}: ")))
  if max_examples is not None:
    examples = examples[:max_examples]
  return FileRead(examples, bad)


def summarize_bad(bad: Sequence[BadRow], path: str | Path, shown: int = 3) -> str:
  """One line: how many rows were skipped, by reason, and where the first ones are."""
  reasons: dict[str, int] = {}
  for b in bad:
    key = b.reason.split(" (")[0].split(":")[0]
    reasons[key] = reasons.get(key, 0) + 1
  first = ", ".join(b.where.rsplit(":", 1)[-1].strip() for b in bad[:shown])
  return (f"{path}: skipped {len(bad)} bad rows (" + "; ".join(
      f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])) +
          f"); first at {first}")
