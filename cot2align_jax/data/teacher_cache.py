"""The offline teacher cache: the teacher's hidden states per training record, on disk.

    cache = TeacherCache.open(DIR)                 # manifest + every host's shards
    cache.check(fingerprint, layout)               # CacheError (one line) when it does not fit
    pipe = Pipeline(records, s_tok, t_tok, cfg, teacher_cache=cache)   # rows gain the states

Layout of DIR (docs/memory.md, "Teacher cache"):

  manifest.json                        version, CacheLayout, Fingerprint, process count
  host{h:03d}-{c:05d}.array_record     chunk c of host h: one entry per record (np.savez bytes)
  host{h:03d}-{c:05d}.keys.npy         [n] int64 record keys of that chunk, in entry order
  host{h:03d}.done.json                host h finished (its record and chunk counts)

An entry holds, per cached view ("main", and "pair" when the method reads the teacher's paired
view), the teacher's input ids [n] (checked against the pipeline's on every read) and the hidden
states [n, d] at each cached state index (bfloat16 stored as uint16, or float32), for the n
real input positions of the view. A record's key is 2·example_id + has_pair: an example has at
most one plain and one CoT record (data/records.py). Logits are not stored: the final state and
the teacher's LM head give them exactly (docs/memory.md says why).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np
from array_record.python import array_record_data_source, array_record_module

from cot2align_jax.core import spec

VERSION = 1
PREFIX = "teacher_cache/"
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
MANIFEST = "manifest.json"
# relative tolerance of the parameter-statistics comparison (reductions in another order)
PARAM_RTOL = 1e-4


class CacheError(ValueError):
  """A cache that is missing, incomplete or built for another teacher, data or settings."""


def batch_key(view: str, index: int) -> str:
  """The batch key of a cached hidden state: [B, Lt, d] of hidden_states[index] of `view`."""
  return f"{PREFIX}{view}/h{index}"


def record_key(example_id: int, has_pair: bool) -> int:
  """The cache key of a record: 2·example_id + has_pair (unique within a training set)."""
  return 2 * int(example_id) + int(bool(has_pair))


@dataclasses.dataclass(frozen=True)
class CacheLayout:
  """What the cache holds: views ("main"[, "pair"]), the hidden-state indices `states` into a
  forward's hidden_states tuple of `num_states` entries, their width and storage dtype."""

  views: tuple[str, ...]
  states: tuple[int, ...]
  num_states: int
  hidden_size: int
  dtype: str = "bfloat16"

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise CacheError(f"teacher cache dtype must be one of {', '.join(DTYPES)}, got "
                       f"{self.dtype!r}")

  def fields(self) -> dict[str, tuple[int, Any]]:
    """{batch key: (hidden size, numpy dtype)} of every cached array of a batch."""
    return {batch_key(v, i): (self.hidden_size, DTYPES[self.dtype]) for v in self.views
            for i in self.states}

  def covers(self, other: "CacheLayout") -> str | None:
    """None if this cache holds what `other` needs, else the first missing thing (a phrase)."""
    if (self.num_states, self.hidden_size) != (other.num_states, other.hidden_size):
      return (f"hidden states of {self.num_states} x {self.hidden_size}, the run needs "
              f"{other.num_states} x {other.hidden_size}")
    missing_v = [v for v in other.views if v not in self.views]
    if missing_v:
      return f"no {missing_v[0]!r} view (the method reads the teacher's paired view)"
    missing_s = [i for i in other.states if i not in self.states]
    if missing_s:
      return f"no hidden state {missing_s[0]} (cached: {list(self.states)})"
    return None

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "CacheLayout":
    return cls(views=tuple(d["views"]), states=tuple(int(i) for i in d["states"]),
               num_states=int(d["num_states"]), hidden_size=int(d["hidden_size"]),
               dtype=str(d["dtype"]))


@dataclasses.dataclass(frozen=True)
class Fingerprint:
  """What the cached states depend on: the teacher (its settings and per-parameter statistics),
  its tokenizer, the training records and the tokenization limits."""

  teacher: Mapping[str, Any]
  params: Sequence[Sequence[float]]
  tokenizer: str
  records: str
  n_records: int
  tokenization: Mapping[str, Any]

  def to_json(self) -> dict:
    return {"teacher": dict(self.teacher), "params": [list(p) for p in self.params],
            "tokenizer": self.tokenizer, "records": self.records, "n_records": self.n_records,
            "tokenization": dict(self.tokenization)}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Fingerprint":
    return cls(teacher=d["teacher"], params=[tuple(p) for p in d["params"]],
               tokenizer=d["tokenizer"], records=d["records"], n_records=int(d["n_records"]),
               tokenization=d["tokenization"])

  def mismatch(self, other: "Fingerprint") -> str | None:
    """None if `other` (the run's) matches this (the cache's), else what differs (a phrase)."""
    if dict(self.teacher) != dict(other.teacher):
      keys = sorted(set(self.teacher) | set(other.teacher))
      k = next(k for k in keys if self.teacher.get(k) != other.teacher.get(k))
      return (f"another teacher setting: teacher.{k} is {self.teacher.get(k)!r} in the cache, "
              f"{other.teacher.get(k)!r} in the run")
    if not params_match(self.params, other.params):
      return "another teacher: its parameters differ from the cached teacher's"
    if self.tokenizer != other.tokenizer:
      return f"another teacher tokenizer ({self.tokenizer} vs {other.tokenizer})"
    if (self.records, self.n_records) != (other.records, other.n_records):
      return (f"other training records ({self.n_records} cached, {other.n_records} in the run, "
              "or the same number with other text)")
    if dict(self.tokenization) != dict(other.tokenization):
      k = next(k for k in sorted(self.tokenization)
               if self.tokenization[k] != other.tokenization.get(k))
      return (f"other lengths or special tokens: data.{k} is {self.tokenization[k]!r} in the "
              f"cache, {other.tokenization.get(k)!r} in the run")
    return None


def params_match(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> bool:
  """Per-parameter statistics equal within PARAM_RTOL (the same leaves in the same order)."""
  if len(a) != len(b):
    return False
  x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return x.shape == y.shape and bool(np.allclose(x, y, rtol=PARAM_RTOL, atol=0.0))


def records_digest(records: Sequence[Any]) -> str:
  """SHA-256 over every record's example index, kind and texts (prompts by their repr, which
  covers chat prompts)."""
  h = hashlib.sha256()
  for r in records:
    get = (lambda k, r=r: r.get(k)) if isinstance(r, dict) else (
        lambda k, r=r: getattr(r, k, None))
    for k in ("example_index", "example_id", "has_pair", "prompt", "response", "pair_prompt",
              "pair_response"):
      h.update(repr(get(k)).encode("utf-8", "surrogatepass"))
      h.update(b"\x00")
    h.update(b"\x01")
  return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------


def encode_entry(arrays: Mapping[str, np.ndarray]) -> bytes:
  """np.savez bytes of {name: array}; bfloat16 arrays go as their uint16 bits."""
  buf = io.BytesIO()
  np.savez(buf, **{k: (a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a)
                   for k, a in arrays.items()})
  return buf.getvalue()


def decode_entry(data: bytes, dtype: str) -> dict[str, np.ndarray]:
  """The arrays of encode_entry; state arrays ("<view>/h<i>") come back in `dtype`."""
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    out = {k: z[k] for k in z.files}
  if dtype == "bfloat16":
    out = {k: (a.view(ml_dtypes.bfloat16) if "/h" in k else a) for k, a in out.items()}
  return out


def entry_arrays(batch: Mapping[str, np.ndarray], states: Mapping[str, Sequence[np.ndarray]],
                 layout: CacheLayout, row: int) -> dict[str, np.ndarray]:
  """One record's entry from a teacher-forward batch: per view the real input ids [n] and the
  states [n, d] (states[view][k] is [B, Lt, d] for layout.states[k])."""
  out: dict[str, np.ndarray] = {}
  for v in layout.views:
    if v == "pair" and not batch["has_pair"][row]:
      continue
    n = int(batch[spec.key(v, "teacher", "attention_mask")][row].sum())
    out[f"{v}/ids"] = np.asarray(batch[spec.key(v, "teacher", "input_ids")][row, :n], np.int32)
    for i, s in zip(layout.states, states[v]):
      out[f"{v}/h{i}"] = np.asarray(s[row, :n]).astype(DTYPES[layout.dtype])
  return out


# --------------------------------------------------------------------------------------------
# Writing (cache_teacher)
# --------------------------------------------------------------------------------------------


def chunk_name(host: int, chunk: int) -> str:
  return f"host{host:03d}-{chunk:05d}"


def write_manifest(out: Path, layout: CacheLayout, fingerprint: Fingerprint, *,
                   process_count: int, batch_size: int, chunk_batches: int) -> None:
  """Writes DIR/manifest.json, or checks that an existing one (a run being resumed) describes the
  same cache; CacheError otherwise."""
  manifest = {"version": VERSION, "layout": layout.to_json(),
              "fingerprint": fingerprint.to_json(), "process_count": process_count,
              "batch_size": batch_size, "chunk_batches": chunk_batches}
  path = out / MANIFEST
  if path.exists():
    old = read_manifest(out)
    for key in ("version", "process_count", "batch_size", "chunk_batches"):
      if old.get(key) != manifest[key]:
        raise CacheError(f"{out} holds a cache written with {key}={old.get(key)}, this run has "
                         f"{manifest[key]}; use another --out or the same settings")
    if CacheLayout.from_json(old["layout"]) != layout:
      raise CacheError(f"{out} holds a cache of other views or layers ({old['layout']}); use "
                       "another --out")
    why = Fingerprint.from_json(old["fingerprint"]).mismatch(fingerprint)
    if why:
      raise CacheError(f"{out} holds a cache for {why}; use another --out")
    return
  out.mkdir(parents=True, exist_ok=True)
  _atomic_write(path, json.dumps(manifest, indent=1).encode())


def read_manifest(out: Path) -> dict:
  path = Path(out) / MANIFEST
  if not path.is_file():
    raise CacheError(f"no teacher cache at {out} (no {MANIFEST}); build it with python -m "
                     "cot2align_jax.cache_teacher")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CacheError(f"{path} is not valid JSON ({e})") from None


def _atomic_write(path: Path, data: bytes) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def done_chunks(out: Path, host: int) -> int:
  """The number of leading chunks of `host` already complete (their record file exists)."""
  c = 0
  while (out / f"{chunk_name(host, c)}.array_record").exists():
    c += 1
  return c


def write_chunk(out: Path, host: int, chunk: int, keys: Sequence[int],
                entries: Sequence[bytes]) -> int:
  """Writes one chunk (keys first, then the records, each renamed into place: a chunk whose
  record file exists is complete). Returns the bytes written."""
  name = chunk_name(host, chunk)
  buf = io.BytesIO()
  np.save(buf, np.asarray(keys, np.int64))
  _atomic_write(out / f"{name}.keys.npy", buf.getvalue())
  tmp = out / f"{name}.array_record.tmp"
  writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
  for e in entries:
    writer.write(e)
  writer.close()
  os.replace(tmp, out / f"{name}.array_record")
  return sum(len(e) for e in entries)


def mark_done(out: Path, host: int, n_records: int, n_chunks: int) -> None:
  _atomic_write(out / f"host{host:03d}.done.json",
                json.dumps({"records": n_records, "chunks": n_chunks}).encode())


# --------------------------------------------------------------------------------------------
# Reading (training)
# --------------------------------------------------------------------------------------------


class TeacherCache:
  """A finished cache opened for reading; calling it on a pipeline row adds the row's states.

  Picklable (grain worker processes get a copy; the record files are reopened there).
  """

  def __init__(self, out: Path, manifest: dict, files: list[str], index: dict[int, int]):
    self.out = out
    self.manifest = manifest
    self.layout = CacheLayout.from_json(manifest["layout"])
    self.fingerprint = Fingerprint.from_json(manifest["fingerprint"])
    self.files = files
    self.index = index
    self.source = array_record_data_source.ArrayRecordDataSource(files)
    self.fields: dict[str, tuple[int, Any]] = {}  # what rows get: set by check()
    self.views: tuple[str, ...] = ()

  @classmethod
  def open(cls, out: str | os.PathLike) -> "TeacherCache":
    """Reads the manifest and every host's key files; CacheError if anything is missing."""
    out = Path(out).expanduser()
    manifest = read_manifest(out)
    if manifest.get("version") != VERSION:
      raise CacheError(f"{out}: cache format version {manifest.get('version')}, this code "
                       f"reads {VERSION}; rebuild it with python -m cot2align_jax.cache_teacher")
    files, index, n_entries = [], {}, 0
    for host in range(int(manifest["process_count"])):
      if not (out / f"host{host:03d}.done.json").is_file():
        raise CacheError(f"teacher cache {out} is incomplete (host {host} has not finished); "
                         "rerun python -m cot2align_jax.cache_teacher to complete it")
      for c in range(done_chunks(out, host)):
        keys = np.load(out / f"{chunk_name(host, c)}.keys.npy")
        for k in keys.tolist():
          index[int(k)] = n_entries
          n_entries += 1
        files.append(str(out / f"{chunk_name(host, c)}.array_record"))
    expected = int(manifest["fingerprint"]["n_records"])
    if len(index) != n_entries or n_entries != expected:
      raise CacheError(f"teacher cache {out} holds {n_entries} entries ({len(index)} distinct) "
                       f"for {expected} records; rebuild it with python -m "
                       "cot2align_jax.cache_teacher")
    return cls(out, manifest, files, index)

  def check(self, fingerprint: Fingerprint, layout: CacheLayout) -> None:
    """CacheError (one line) unless this cache was built for the run's teacher, records and
    tokenization and holds the views and states `layout` asks for; then rows get those."""
    why = self.fingerprint.mismatch(fingerprint)
    if why:
      raise CacheError(f"teacher cache {self.out} was built for {why}; rebuild it with python "
                       "-m cot2align_jax.cache_teacher")
    why = self.layout.covers(layout)
    if why:
      raise CacheError(f"teacher cache {self.out} has {why}; rebuild it with the run's config")
    self.views = layout.views
    self.fields = dataclasses.replace(layout, dtype=self.layout.dtype).fields()

  def __len__(self) -> int:
    return len(self.index)

  def entry(self, example_id: int, has_pair: bool) -> dict[str, np.ndarray]:
    key = record_key(example_id, has_pair)
    if key not in self.index:
      raise CacheError(f"teacher cache {self.out} has no entry for example {example_id} "
                       f"({'CoT' if has_pair else 'plain'} record); rebuild it")
    return decode_entry(self.source[self.index[key]], self.layout.dtype)

  def __call__(self, row: Any) -> Any:
    """A pipeline row (data/pipeline.py RowBuilder) with its cached states added as [n, d]
    arrays under the batch keys; padding rows pass through."""
    if not isinstance(row, dict):
      return row
    entry = self.entry(row["example_id"], row["has_pair"])
    d, dtype = self.layout.hidden_size, DTYPES[self.layout.dtype]
    for v in self.views:
      ids = row[spec.key(v, "teacher", "input_ids")]
      if v == "pair" and not row["has_pair"]:
        cached = np.zeros((0,), np.int32)
      else:
        cached = entry[f"{v}/ids"]
      if cached.shape != ids.shape or not np.array_equal(cached, ids):
        raise CacheError(f"teacher cache {self.out}: the teacher tokens of example "
                         f"{row['example_id']} ({v} view) differ from the cached ones; "
                         "rebuild the cache for this data and tokenizer")
      for i in self.layout.states:
        k = batch_key(v, i)
        if k in self.fields:
          row[k] = entry[f"{v}/h{i}"] if len(ids) else np.zeros((0, d), dtype)
    return row

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop("source")
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self.source = array_record_data_source.ArrayRecordDataSource(self.files)
