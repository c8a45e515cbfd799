"""The grain input pipeline: records -> tokenized, aligned, bucket-padded batches (core/spec.py).

    pipe = Pipeline(records, student_tok, teacher_tok, PipelineConfig(batch_size=8))
    it = iter(pipe); batch = next(it)   # dict of numpy arrays, every spec key, B = batch_size rows
    state = it.get_state()              # later: it2 = iter(pipe); it2.set_state(state)

Stages: records -> seeded shuffle (reshuffled each epoch) -> repeat -> this host's rows of every
global batch (`HostRowsMapDataset`: host h of P takes rows [h·B, (h+1)·B) of each global batch
of P·B records, so the global batch is the same whatever the process count) -> per record: main and pair view tokenized by both tokenizers + the main view's alignment arrays
(`RowBuilder`, unpadded 1-D rows) -> with a teacher cache, the row's cached teacher states
(data/teacher_cache.py) -> batch of `batch_size` rows padded per side to the smallest
bucket >= the side's longest row, a short last batch filled with example_id -1 rows (`Collate`)
-> thread prefetch -> optional grain worker processes (`worker_count`).

Resuming: `set_state()` on a fresh iterator of an identically configured pipeline continues
exactly (with workers: under the same worker count only; close such an iterator when done).
Records: any object or dict with prompt, response, pair_prompt, pair_response, has_pair and an
integer index, example_index (data/records.py `Record`) or an int-like example_id.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import grain
import jax
import numpy as np
from absl import flags

from cot2align_jax.alignment import mined, spans
from cot2align_jax.core import spec
from cot2align_jax.data import teacher_cache as cache_lib
from cot2align_jax.data.tokenize import (TokenizedView, check_special_tokens, pad_id,
                                         tokenize_view)

_log = logging.getLogger(__name__)
ALIGNMENTS = ("eta", "mined")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Settings of the input pipeline.

  batch_size: rows per batch (per host; the global batch is batch_size × shard_count).
  seed: shuffle seed (each epoch is reshuffled from it).
  shuffle: shuffle at all.
  num_epochs: passes over the data; None = forever.
  buckets: allowed sequence lengths (ascending); the largest must be ≥ max_len - 1.
  max_prompt, max_len: tokenization limits (tokenize.tokenize_view): max_prompt counts prompt
    tokens only, max_len every id (a BOS included).
  special_tokens: "convention" (each side gets a BOS iff its tokenizer adds one itself) or
    "reference" (no BOS on either side, the paper's code); only EOS is appended either way.
  drop_remainder: drop a short last batch (else it is padded with example_id -1 rows).
  alignment: alignment arrays to compute, of ("eta", "mined"); the others are zero with mask 0
    (a method the alignment module lacks raises at Pipeline construction).
  shard_index, shard_count: this host's shard; None = jax.process_index() / process_count().
    Host h takes rows [h·batch_size, (h+1)·batch_size) of every global batch of the shuffled
    stream, so every host has the same number of batches (a short last global batch gives
    padding rows to the hosts past its end, or is dropped everywhere with drop_remainder).
  read_threads, prefetch_buffer: grain ReadOptions of the in-process prefetch (0 = synchronous).
  worker_count: grain mp_prefetch worker processes; 0 = everything in this process.
  worker_buffer_size: batches buffered per worker.
  group_by_pair: 0 = off; k > 0 = within each window of k batches of shuffled records, put the
    records without a paired view first (stable order), so most batches are all-plain or
    all-CoT and the train step skips the paired-view forwards of all-plain batches (the bucket
    approach to docs/method.md §6.2). At most one batch per window mixes the two kinds.
  """

  batch_size: int = 8
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = 1
  buckets: tuple[int, ...] = (64, 128, 256, 512)
  max_prompt: int = 256
  max_len: int = 512
  special_tokens: str = "convention"
  drop_remainder: bool = False
  alignment: tuple[str, ...] = ALIGNMENTS
  shard_index: int | None = None
  shard_count: int | None = None
  group_by_pair: int = 0
  read_threads: int = 0
  prefetch_buffer: int = 0
  worker_count: int = 0
  worker_buffer_size: int = 2

  def __post_init__(self):
    check_special_tokens(self.special_tokens)

  def validate(self) -> None:
    """Raises ValueError on settings that cannot work."""
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
      raise ValueError(f"buckets must be ascending and distinct, got {self.buckets}")
    if self.buckets[-1] < self.max_len - 1:
      raise ValueError(f"largest bucket {self.buckets[-1]} < max_len - 1 = {self.max_len - 1}")
    if self.group_by_pair < 0:
      raise ValueError(f"group_by_pair must be >= 0, got {self.group_by_pair}")
    unknown = set(self.alignment) - set(ALIGNMENTS)
    if unknown:
      raise ValueError(f"unknown alignment {sorted(unknown)}; known: {ALIGNMENTS}")


class GroupByPairMapDataset(grain.MapDataset):
  """Reorders each window of `window` consecutive records: those without a pair first.

  A pure index permutation (stable within each kind), so random access, len and grain iterator
  state behave as for the parent. Reading a window's has_pair flags touches only the records,
  not the tokenizers.
  """

  def __init__(self, parent: grain.MapDataset, *, window: int):
    super().__init__(parent)
    if window < 1:
      raise ValueError(f"window must be >= 1, got {window}")
    self._window = window
    self._orders: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"GroupByPairMapDataset(window={self._window})"

  def _order(self, w: int) -> np.ndarray:
    if w not in self._orders:
      start = w * self._window
      stop = min(start + self._window, len(self._parent))
      paired = np.asarray([bool(_field(self._parent[i], "has_pair")) for i in range(start, stop)])
      if len(self._orders) > 8:
        self._orders.clear()
      self._orders[w] = np.argsort(paired, kind="stable")
    return self._orders[w]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    w, r = divmod(int(index), self._window)
    return self._parent[w * self._window + int(self._order(w)[r])]


class PadRow:
  """The element of a host's rows past the end of a short last global batch
  (HostRowsMapDataset): `RowBuilder` passes it through and `Collate` fills its place with a
  padding row. Not None: grain drops None elements, and a host must keep its batch count."""

  def __repr__(self) -> str:
    return "PAD_ROW"


PAD_ROW = PadRow()


class HostRowsMapDataset(grain.MapDataset):
  """One host's rows of every global batch of its parent (a stream of records).

  Global batch k is the parent's records [k·G, (k+1)·G), G = per_host · count; host `index`
  takes records k·G + index·per_host + r, r < per_host, so concatenating the hosts' batches in
  process order gives the global batch of a one-process pipeline with batch size G. A short
  last global batch (len % G records) is dropped with `drop_remainder`, else each host gets
  its rows of it, PAD_ROW past the end (always the trailing rows of a host's batch). Every
  host has the same length: len(self) = (number of global batches) · per_host.
  """

  def __init__(self, parent: grain.MapDataset, *, per_host: int, index: int, count: int,
               drop_remainder: bool):
    super().__init__(parent)
    if per_host < 1 or not 0 <= index < count:
      raise ValueError(f"bad host rows: per_host={per_host}, index={index}, count={count}")
    self._per_host, self._index, self._count = per_host, index, count
    n, g = len(parent), per_host * count
    self._batches = n // g if drop_remainder else -(-n // g)

  def __len__(self) -> int:
    return self._batches * self._per_host

  def __str__(self) -> str:
    return f"HostRowsMapDataset(per_host={self._per_host}, index={self._index}, " \
           f"count={self._count})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    k, r = divmod(int(index), self._per_host)
    g = k * self._per_host * self._count + self._index * self._per_host + r
    return self._parent[g] if g < len(self._parent) else PAD_ROW


def _field(record: Any, name: str) -> Any:
  """`record[name]` for a dict, else `record.name`."""
  return record[name] if isinstance(record, dict) else getattr(record, name)


def example_index(record: Any) -> int:
  """The integer example id of the batch (spec.py): `example_index` when set (≥ 0, as
  records.Record carries it), else `example_id` as an int."""
  index = record.get("example_index", -1) if isinstance(record, dict) else getattr(
      record, "example_index", -1)
  if index is not None and int(index) >= 0:
    return int(index)
  try:
    return int(_field(record, "example_id"))
  except (TypeError, ValueError) as e:
    raise ValueError(f"record {_field(record, 'example_id')!r} has no integer example index; "
                     "set example_index (records.build_records does)") from e


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket ≥ n; ValueError when n exceeds the largest."""
  for b in buckets:
    if b >= n:
      return int(b)
  raise ValueError(f"row of {n} positions exceeds the largest bucket {buckets[-1]}")


def _zero_alignment(n: int) -> dict[str, np.ndarray]:
  """The four alignment arrays, [n] int32 zeros (mask 0: no alignment)."""
  return {spec.align_key(f): np.zeros((n,), np.int32) for f in spec.ALIGN_FIELDS}


def available_alignments() -> tuple[str, ...]:
  """The alignment methods cot2align_jax.alignment implements ("eta": spans.eta_arrays,
  "mined": mined.mined_arrays)."""
  have = {"eta": hasattr(spans, "eta_arrays"), "mined": hasattr(mined, "mined_arrays")}
  return tuple(m for m in ALIGNMENTS if have[m])


def _label_spans(view: TokenizedView, table: Any) -> np.ndarray:
  """[n - 1, 2] byte spans of the label tokens ids[1:] (alignment.spans.byte_spans: overlapping
  spans of a split multi-byte character resolved; (-1, -1) for tokens without text, e.g. EOS),
  counted from the response's first byte: the two sides' prompts may differ (chat templates)
  while their responses are the same text."""
  out = spans.byte_spans(view.text, view.ids, view.offsets, table, unit="byte")[1:]
  return np.where(out >= 0, out - view.prompt_bytes, out)


def _eta(student: TokenizedView, teacher: TokenizedView, tables: dict[str, Any],
         mined_vocab_map: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """ETA (pos, mask), each [n_s - 1]: alignment.spans.eta_arrays over the label byte spans."""
  del mined_vocab_map
  return spans.eta_arrays(_label_spans(student, tables["student"]),
                          _label_spans(teacher, tables["teacher"]), student.response_mask[1:],
                          teacher.response_mask[1:], len(student) - 1)


def _mined(student: TokenizedView, teacher: TokenizedView, tables: dict[str, Any],
           mined_vocab_map: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """MinED (pos, mask), each [n_s - 1]: alignment.mined.mined_arrays, the 1:1 steps of the DTW
  (edit-distance cost) between the response label tokens' text forms. The per-batch arrays need
  no vocabulary map (that one is built once: alignment.mined.build_mined_vocab_map)."""
  del mined_vocab_map
  return mined.mined_arrays(tables["student"].text_forms(student.ids[1:]),
                            tables["teacher"].text_forms(teacher.ids[1:]),
                            student.response_mask[1:], teacher.response_mask[1:],
                            len(student) - 1)


_METHODS = {"eta": (_eta, "eta_pos", "eta_mask"), "mined": (_mined, "mined_pos", "mined_mask")}


def _alignment_arrays(student: TokenizedView, teacher: TokenizedView, methods: Sequence[str],
                      tables: dict[str, Any] | None = None,
                      mined_vocab_map: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Alignment arrays of one main view, each [n_s - 1] int32, indexed by student label position.

  The one adapter to cot2align_jax.alignment. Student label i is the token ids[i + 1] (span
  offsets[i + 1]); the values point at teacher label positions j (teacher token ids[j + 1]).
  `tables`: {"student", "teacher"} alignment.spans.TokenBytes. Methods not in `methods` stay
  zero with mask 0.
  """
  n = len(student) - 1
  out = _zero_alignment(n)
  for m in methods:
    fn, pos_field, mask_field = _METHODS[m]
    pos, mask = _fit(*fn(student, teacher, tables or {}, mined_vocab_map), n)
    out[spec.align_key(pos_field)], out[spec.align_key(mask_field)] = pos, mask
  return out


def _fit(pos: np.ndarray, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(pos, mask) as [n] int32 with pos = 0 where mask = 0."""
  pos = np.asarray(pos, np.int32).reshape(-1)
  mask = np.asarray(mask, np.int32).reshape(-1)
  if pos.shape != (n,) or mask.shape != (n,):
    raise ValueError(f"alignment arrays of shape {pos.shape}/{mask.shape}, expected ({n},)")
  return pos * mask, mask


class RowBuilder:
  """Record → one unpadded row: spec.py keys with 1-D arrays of per-row length.

  {view}/{side}/{field}: [n - 1] int32 (length 0 for the pair view of a record without one);
  main/align/*: [n_student - 1] int32; has_pair: bool; example_id: int. Picklable (grain
  worker processes receive a copy).
  """

  def __init__(self, student_tok, teacher_tok, config: PipelineConfig,
               mined_vocab_map: np.ndarray | None = None):
    self.toks = {"student": student_tok, "teacher": teacher_tok}
    self.config = config
    self.mined_vocab_map = mined_vocab_map
    self.tables = {}
    if config.alignment:
      self.tables = {s: spans.TokenBytes.from_tokenizer(t) for s, t in self.toks.items()}

  def view(self, prompt: str, response: str, side: str) -> TokenizedView:
    """One view tokenized by one side's tokenizer."""
    return tokenize_view(prompt, response, self.toks[side], max_prompt=self.config.max_prompt,
                         max_len=self.config.max_len,
                         special_tokens=self.config.special_tokens)

  def __call__(self, record: Any) -> dict[str, Any] | PadRow:
    if isinstance(record, PadRow):
      return record
    has_pair = bool(_field(record, "has_pair"))
    row: dict[str, Any] = {"has_pair": has_pair, "example_id": example_index(record)}
    main = {s: self.view(_field(record, "prompt"), _field(record, "response"), s)
            for s in spec.SIDES}
    for side, tv in main.items():
      for f, arr in tv.model_arrays().items():
        row[spec.key("main", side, f)] = arr
    for side in spec.SIDES:
      if has_pair:
        arrays = self.view(_field(record, "pair_prompt"), _field(record, "pair_response"),
                           side).model_arrays()
      else:
        arrays = {f: np.zeros((0,), np.int32) for f in spec.SEQ_FIELDS}
      for f, arr in arrays.items():
        row[spec.key("pair", side, f)] = arr
    row.update(_alignment_arrays(main["student"], main["teacher"], self.config.alignment,
                                 self.tables, self.mined_vocab_map))
    return row


class Collate:
  """Rows (≤ B) → one batch per spec.py: [B, L] arrays padded to the bucket length of each side.

  input_ids are padded with the side's pad id, every other field with 0; missing rows (short last
  batch, PAD_ROW elements of a host's share of one) have example_id -1, has_pair False and all
  masks 0. `cache_fields` {key: (d, dtype)}: teacher-cache rows [n, d] (data/teacher_cache.py)
  become [B, Lt, d] arrays, zero-padded.
  """

  def __init__(self, pad_ids: dict[str, int], config: PipelineConfig,
               cache_fields: dict[str, tuple[int, Any]] | None = None):
    self.pad_ids = pad_ids
    self.config = config
    self.cache_fields = dict(cache_fields or {})

  def side_length(self, rows: Sequence[dict[str, Any]], side: str) -> int:
    """The bucket length of one side: the smallest bucket ≥ its longest row over both views."""
    longest = max((len(r[spec.key(v, side, "input_ids")]) for r in rows for v in spec.VIEWS
                   if not isinstance(r, PadRow)), default=0)
    return bucket_length(longest, self.config.buckets)

  def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    b = self.config.batch_size
    rows = [r for r in rows if not isinstance(r, PadRow)]
    lengths = {s: self.side_length(rows, s) for s in spec.SIDES}
    batch: dict[str, np.ndarray] = {}
    for v in spec.VIEWS:
      for s in spec.SIDES:
        for f in spec.SEQ_FIELDS:
          fill = self.pad_ids[s] if f == "input_ids" else 0
          batch[spec.key(v, s, f)] = _stack(rows, spec.key(v, s, f), b, lengths[s], fill)
    for f in spec.ALIGN_FIELDS:
      batch[spec.align_key(f)] = _stack(rows, spec.align_key(f), b, lengths["student"], 0)
    for k, (d, dtype) in self.cache_fields.items():
      out = np.zeros((b, lengths["teacher"], d), dtype)
      for r, row in enumerate(rows):
        out[r, :len(row[k])] = row[k]
      batch[k] = out
    batch["has_pair"] = np.zeros((b,), np.bool_)
    batch["has_pair"][:len(rows)] = [r["has_pair"] for r in rows]
    batch["example_id"] = np.full((b,), -1, np.int32)
    batch["example_id"][:len(rows)] = [r["example_id"] for r in rows]
    return batch


def _stack(rows: Sequence[dict[str, Any]], k: str, b: int, length: int,
           fill: int) -> np.ndarray:
  """[b, length] int32: row r's 1-D array rows[r][k] left-aligned, the rest `fill`."""
  out = np.full((b, length), fill, np.int32)
  for r, row in enumerate(rows):
    a = row[k]
    out[r, :len(a)] = a
  return out


def side_lengths(batch: dict[str, np.ndarray]) -> dict[str, int]:
  """{side: L} of a batch (core/spec.py): the padded length of each side's arrays."""
  return {s: int(batch[spec.key("main", s, "input_ids")].shape[1]) for s in spec.SIDES}


def pad_to_lengths(batch: dict[str, np.ndarray], lengths: dict[str, int],
                   pad_ids: dict[str, int]) -> dict[str, np.ndarray]:
  """The batch with each side's [B, L] arrays right-padded to `lengths[side]` (≥ L): input_ids
  with the side's pad id, every other field with 0; the alignment arrays follow the student.
  Teacher-cache arrays [B, Lt, d] follow the teacher, zero-padded.
  The hosts of a multi-process job pad their batches to the longest side lengths of all hosts,
  which is what a one-process pipeline over the global batch produces."""
  def pad(a: np.ndarray, length: int, fill: int) -> np.ndarray:
    if a.shape[1] > length:
      raise ValueError(f"cannot pad a length-{a.shape[1]} batch down to {length}")
    if a.shape[1] == length:
      return a
    widths = ((0, 0), (0, length - a.shape[1])) + ((0, 0),) * (a.ndim - 2)
    return np.pad(a, widths, constant_values=fill)

  out = dict(batch)
  for v in spec.VIEWS:
    for s in spec.SIDES:
      for f in spec.SEQ_FIELDS:
        k = spec.key(v, s, f)
        out[k] = pad(batch[k], lengths[s], pad_ids[s] if f == "input_ids" else 0)
  for f in spec.ALIGN_FIELDS:
    k = spec.align_key(f)
    out[k] = pad(batch[k], lengths["student"], 0)
  for k in batch:
    if k.startswith(cache_lib.PREFIX):
      out[k] = pad(batch[k], lengths["teacher"], 0)
  return out


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside absl.app.run mark the defaults parsed."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _shard(config: PipelineConfig) -> tuple[int, int]:
  """(index, count) of this host's shard: the config's, else jax's process index / count."""
  if config.shard_index is not None and config.shard_count is not None:
    index, count = config.shard_index, config.shard_count
  else:
    index, count = jax.process_index(), jax.process_count()
  if not 0 <= index < count:
    raise ValueError(f"shard index {index} not in [0, {count})")
  return index, count


class Pipeline:
  """Records → batches (spec.py) with grain; iterate it, checkpoint its iterator's state.

  Usage:
    pipe = Pipeline(records, student_tok, teacher_tok, PipelineConfig(batch_size=8))
    it = iter(pipe)
    batch = next(it)            # dict of numpy arrays, spec.all_keys()
    state = it.get_state()      # later: it2 = iter(pipe); it2.set_state(state)
  """

  def __init__(self, source: Sequence[Any], student_tok, teacher_tok,
               config: PipelineConfig = PipelineConfig(), *,
               mined_vocab_map: np.ndarray | None = None,
               teacher_cache: cache_lib.TeacherCache | None = None):
    config.validate()
    missing = set(config.alignment) - set(available_alignments())
    if missing:
      raise ValueError(f"alignment {sorted(missing)} requested but cot2align_jax.alignment does "
                       f"not implement it yet; available: {available_alignments()}")
    self.source = source
    self.config = config
    self.row_builder = RowBuilder(student_tok, teacher_tok, config, mined_vocab_map)
    self.teacher_cache = teacher_cache
    self.collate = Collate({"student": pad_id(student_tok), "teacher": pad_id(teacher_tok)},
                           config, teacher_cache.fields if teacher_cache is not None else None)

  def records(self) -> grain.MapDataset:
    """This host's records (before tokenization): the shuffled (per epoch) and repeated stream,
    every host computing the same one, then this host's rows of each global batch
    (`HostRowsMapDataset`); PAD_ROW past the end of a short last global batch."""
    c = self.config
    index, count = _shard(c)
    ds = grain.MapDataset.source(self.source)
    if c.shuffle:
      ds = ds.shuffle(seed=c.seed)
    ds = ds.repeat(c.num_epochs)
    if c.group_by_pair:
      ds = GroupByPairMapDataset(ds, window=c.group_by_pair * c.batch_size * count)
    if count > 1:
      ds = HostRowsMapDataset(ds, per_host=c.batch_size, index=index, count=count,
                              drop_remainder=c.drop_remainder)
    return ds

  def dataset(self) -> grain.IterDataset:
    """The whole pipeline as a grain IterDataset of batches."""
    c = self.config
    ds = self.records().map(self.row_builder)
    if self.teacher_cache is not None:
      ds = ds.map(self.teacher_cache)
    ds = ds.batch(c.batch_size, drop_remainder=c.drop_remainder, batch_fn=self.collate)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=c.read_threads,
                                                 prefetch_buffer_size=c.prefetch_buffer))
    if c.worker_count > 0:
      _ensure_absl_flags_parsed()
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=c.worker_count, per_worker_buffer_size=c.worker_buffer_size))
    return it_ds

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.dataset())
