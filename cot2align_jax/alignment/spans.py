"""Byte-offset spans of tokens, exact 1:1 pairs (DSKD's ETA in byte form) and many-to-many chunks.

Two tokenizations of the same text are compared through the UTF-8 *bytes* each token covers,
never by decoding tokens to strings one at a time.

One side: `TokenBytes(tokenizer)` (once per tokenizer: the byte content of every vocabulary
entry) -> `byte_spans(text, ids, offsets, table)` -> spans [N, 2] int64, each token's [start,
end) in the UTF-8 bytes of `text`, (-1, -1) for a token that covers no text (BOS/EOS, a
SentencePiece dummy-prefix "▁"). Two sides are then combined with `exact_pairs`, `chunks` or,
for the fixed-shape batch arrays of core/spec.py, `eta_arrays`.

Text: `clean_text` replaces lone surrogates (no UTF-8 form; HF tokenizers reject them) with
U+FFFD, keeping character offsets valid. `byte_spans` applies it itself; the data pipeline must
apply it before tokenizing.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Sequence

import numpy as np

NO_SPAN = -1  # start and end of a token that covers no text

_SURROGATE = re.compile("[\ud800-\udfff]")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def clean_text(text: str) -> str:
  """`text` with every lone surrogate replaced by U+FFFD (same number of characters)."""
  if not isinstance(text, str):
    raise TypeError(f"text must be str, got {type(text).__name__}")
  return _SURROGATE.sub("\ufffd", text)


def char_to_byte_offsets(text: str) -> np.ndarray:
  """UTF-8 byte position of every character boundary: [len(text) + 1] int64, [0] = 0."""
  codes = np.frombuffer(clean_text(text).encode("utf-32-le"), dtype=np.uint32)
  widths = 1 + (codes >= 0x80).astype(np.int64) + (codes >= 0x800) + (codes >= 0x10000)
  out = np.zeros(len(codes) + 1, dtype=np.int64)
  np.cumsum(widths, out=out[1:])
  return out


def _gpt2_byte_decoder() -> dict[str, int]:
  """The inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte value."""
  kept = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
  kept_set = set(kept)
  table = {chr(b): b for b in kept}
  shifted = [b for b in range(256) if b not in kept_set]
  for n, b in enumerate(shifted):
    table[chr(256 + n)] = b
  return table


_BYTE_DECODER = _gpt2_byte_decoder()


def _backend(tokenizer: Any):
  """The `tokenizers.Tokenizer` behind a HF fast tokenizer (or the object itself)."""
  backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
  backend = backend if backend is not None else tokenizer
  if not hasattr(backend, "to_str") or not hasattr(backend, "get_vocab"):
    raise TypeError(f"not a HF fast tokenizer or tokenizers.Tokenizer: {type(tokenizer).__name__}")
  return backend


def _uses_byte_level(node: Any) -> bool:
  """Whether a tokenizer.json component (decoder / pre-tokenizer tree) contains ByteLevel."""
  if isinstance(node, dict):
    return node.get("type") == "ByteLevel" or any(_uses_byte_level(v) for v in node.values())
  if isinstance(node, list):
    return any(_uses_byte_level(v) for v in node)
  return False


@dataclasses.dataclass
class TokenBytes:
  """Byte content of every vocabulary entry of one tokenizer (built once per tokenizer).

  pieces[id]  the UTF-8 bytes the token stands for: byte-level BPE through GPT-2's byte decoder
              ("Ġ" -> b" "), SentencePiece with "▁" -> b" " and "<0xNN>" -> that single byte;
              special tokens hold their literal string (they only count as text where the text
              really contains that string).
  special     [V] bool, added tokens marked special (BOS, EOS, <unk>, chat markers).
  kind        "byte_level" or "sentencepiece" (SentencePiece-style: may prepend a dummy "▁").
  """

  pieces: list[bytes]
  special: np.ndarray
  kind: str
  eos_id: int | None = None
  unk_id: int | None = None

  @classmethod
  def from_tokenizer(cls, tokenizer: Any) -> "TokenBytes":
    """Build from a HF fast tokenizer or a `tokenizers.Tokenizer`."""
    backend = _backend(tokenizer)
    spec = json.loads(backend.to_str())
    byte_level = (_uses_byte_level(spec.get("decoder"))
                  or _uses_byte_level(spec.get("pre_tokenizer")))
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    strings = [""] * size
    for piece, idx in vocab.items():
      strings[idx] = piece
    special = np.zeros(size, dtype=bool)
    for entry in spec.get("added_tokens") or []:
      special[entry["id"]] = bool(entry.get("special"))
    pieces = []
    for idx, piece in enumerate(strings):
      if special[idx]:
        pieces.append(piece.encode("utf-8"))
      elif byte_level:
        pieces.append(_byte_level_bytes(piece))
      else:
        pieces.append(_sentencepiece_bytes(piece, byte_fallback))
    eos = getattr(tokenizer, "eos_token_id", None)
    unk = vocab.get((spec.get("model") or {}).get("unk_token") or "")
    return cls(pieces=pieces, special=special,
               kind="byte_level" if byte_level else "sentencepiece",
               eos_id=int(eos) if eos is not None else None, unk_id=unk)

  def __len__(self) -> int:
    return len(self.pieces)

  def text_form(self, token_id: int) -> str | None:
    """The token's text with one leading space (the Ġ / ▁ marker) stripped; None for specials.

    Bytes that are not valid UTF-8 on their own (a piece of a multi-byte character) become lone
    surrogates U+DC80..U+DCFF (Python's "surrogateescape"), one per byte, so the same byte gives the
    same symbol in every tokenizer ("Ġæ" in GPT-2 and "<0xE6>" in Llama both give "\\udce6").
    """
    if self.special[token_id]:
      return None
    text = self.pieces[token_id].decode("utf-8", "surrogateescape")
    return text[1:] if text.startswith(" ") else text

  def text_forms(self, token_ids: Sequence[int]) -> list[str | None]:
    """`text_form` of each id."""
    return [self.text_form(int(t)) for t in token_ids]


def _byte_level_bytes(piece: str) -> bytes:
  """Bytes of a byte-level BPE piece (falls back to UTF-8 for strings outside the byte alphabet)."""
  try:
    return bytes(_BYTE_DECODER[c] for c in piece)
  except KeyError:
    return piece.encode("utf-8")


def _sentencepiece_bytes(piece: str, byte_fallback: bool) -> bytes:
  """Bytes of a SentencePiece piece: "▁" is a space, "<0xNN>" one byte (with byte fallback)."""
  match = _BYTE_PIECE.fullmatch(piece) if byte_fallback else None
  if match:
    return bytes([int(match.group(1), 16)])
  return piece.replace("\u2581", " ").encode("utf-8")


def _check_inputs(text: str, ids: Any, offsets: Any, n_units: int) -> tuple[np.ndarray, np.ndarray]:
  """Validated ids [N] int64 and offsets [N, 2] int64 (ValueError on any inconsistency)."""
  ids = np.asarray(ids, dtype=np.int64).reshape(-1)
  offsets = np.asarray(offsets, dtype=np.int64)
  if offsets.size == 0:
    offsets = offsets.reshape(0, 2)
  if offsets.ndim != 2 or offsets.shape[1] != 2:
    raise ValueError(f"offsets must have shape [N, 2], got {offsets.shape}")
  if len(ids) != len(offsets):
    raise ValueError(f"{len(ids)} token ids but {len(offsets)} offsets")
  if len(offsets) and (offsets.min() < 0 or offsets.max() > n_units):
    raise ValueError(f"offsets out of range for a text of {n_units} units "
                     f"(min {offsets.min()}, max {offsets.max()}): offsets of another text?")
  if np.any(offsets[:, 0] > offsets[:, 1]):
    raise ValueError("offsets with start > end")
  return ids, offsets


def byte_spans(text: str, ids: Sequence[int], offsets: Any, table: TokenBytes,
               unit: str = "char") -> np.ndarray:
  """Each token's [start, end) in the UTF-8 bytes of `text`.

  text     the string that was tokenized (lone surrogates are replaced, see `clean_text`).
  ids      [N] token ids.
  offsets  [N, 2] offsets as given by a HF fast tokenizer with return_offsets_mapping=True
           (`unit="char"`, positions in the str) or UTF-8 byte positions (`unit="byte"`).
  table    the tokenizer's `TokenBytes`.

  Returns [N, 2] int64; (-1, -1) for tokens that cover no text: empty offsets (BOS/EOS added by the
  tokenizer or the pipeline), special tokens whose literal string is not at that place in the text
  (the unknown token keeps its offsets), and SentencePiece dummy-prefix "▁" tokens. The non-empty
  spans are disjoint and in order.

  Several tokens can carry the same character offsets: byte-level pieces or byte-fallback tokens of
  one multi-byte character, or a dummy "▁" next to "▁word". Such overlapping groups are resolved
  by matching each token's byte content against the text, in order.
  """
  if unit not in ("char", "byte"):
    raise ValueError(f"unit must be 'char' or 'byte', got {unit!r}")
  text = clean_text(text)
  data = text.encode("utf-8")
  n_units = len(text) if unit == "char" else len(data)
  ids, offsets = _check_inputs(text, ids, offsets, n_units)
  if len(ids) and (ids.min() < 0 or ids.max() >= len(table)):
    raise ValueError(f"token ids outside the vocabulary of {len(table)} entries")
  spans = char_to_byte_offsets(text)[offsets] if unit == "char" else offsets.copy()
  live = spans[:, 1] > spans[:, 0]
  for k in np.flatnonzero(live & table.special[ids]):
    if ids[k] != table.unk_id and data[spans[k, 0]:spans[k, 1]] != table.pieces[ids[k]]:
      live[k] = False
  spans[~live] = NO_SPAN
  order = np.flatnonzero(live)
  if len(order) > 1:
    starts, ends = spans[order, 0], spans[order, 1]
    if np.any(np.diff(starts) < 0):
      raise ValueError("token offsets are not in text order")
    reach = np.maximum.accumulate(ends)
    new_group = np.concatenate([[True], starts[1:] >= reach[:-1]])
    group_id = np.cumsum(new_group) - 1
    sizes = np.bincount(group_id)
    for g in np.flatnonzero(sizes > 1):
      members = order[group_id == g]
      lo, hi = int(spans[members, 0].min()), int(spans[members, 1].max())
      pieces = [table.pieces[ids[k]] for k in members]
      spans[members] = _resolve_group(data, lo, hi, pieces, table.kind)
  return spans


def _resolve_group(data: bytes, lo: int, hi: int, pieces: list[bytes], kind: str) -> np.ndarray:
  """Spans [K, 2] for K tokens whose offsets overlap and together cover data[lo:hi].

  Each token consumes either its whole byte content or its content minus one leading space (a
  SentencePiece dummy prefix; tried first for SentencePiece, second for byte-level), so that the
  K tokens consume data[lo:hi] exactly, in order (depth-first with memo of dead states). If no
  such split exists (e.g. a normalizer changed the text), bytes are handed out in order by
  content length, clipped to the group, the last token taking the rest.
  """
  target = data[lo:hi]
  dead: set[tuple[int, int]] = set()
  choice: list[int] = []

  def options(piece: bytes) -> list[int]:
    full = [len(piece)]
    trimmed = [len(piece) - 1] if piece.startswith(b" ") else []
    return trimmed + full if kind == "sentencepiece" else full + trimmed

  def search(k: int, pos: int) -> bool:
    if k == len(pieces):
      return pos == len(target)
    if (k, pos) in dead:
      return False
    piece = pieces[k]
    for width in options(piece):
      if target[pos:pos + width] == piece[len(piece) - width:]:
        choice.append(width)
        if search(k + 1, pos + width):
          return True
        choice.pop()
    dead.add((k, pos))
    return False

  if not search(0, 0):
    widths = [len(p) for p in pieces]
    choice = []
    pos = 0
    for k, w in enumerate(widths):
      w = len(target) - pos if k == len(widths) - 1 else min(w, len(target) - pos)
      choice.append(w)
      pos += w
  out = np.full((len(pieces), 2), NO_SPAN, dtype=np.int64)
  pos = lo
  for k, w in enumerate(choice):
    if w > 0:
      out[k] = (pos, pos + w)
    pos += w
  return out


def _valid(spans: np.ndarray) -> np.ndarray:
  """[N] bool: the token covers some text."""
  return spans[:, 1] > spans[:, 0]


def exact_pairs(student_spans: np.ndarray, teacher_spans: np.ndarray) -> np.ndarray:
  """1:1 pairs (i, j): student token i and teacher token j cover exactly the same bytes.

  Inputs: [Ns, 2] and [Nt, 2] spans from `byte_spans` over the same text. Returns [P, 2] int64,
  sorted by i. Tokens without text never pair (pair EOS explicitly, see `eta_arrays`).
  """
  s = np.asarray(student_spans, dtype=np.int64).reshape(-1, 2)
  t = np.asarray(teacher_spans, dtype=np.int64).reshape(-1, 2)
  si, ti = np.flatnonzero(_valid(s)), np.flatnonzero(_valid(t))
  width = int(max(s.max(initial=0), t.max(initial=0))) + 1
  _, a, b = np.intersect1d(s[si, 0] * width + s[si, 1], t[ti, 0] * width + t[ti, 1],
                           assume_unique=True, return_indices=True)
  pairs = np.stack([si[a], ti[b]], axis=1)
  return pairs[np.argsort(pairs[:, 0], kind="stable")]


@dataclasses.dataclass(frozen=True)
class Chunk:
  """A many-to-many aligned piece: bytes [start, end) and the tokens of each side inside it."""

  start: int
  end: int
  student: np.ndarray  # [ks] int64 token indices
  teacher: np.ndarray  # [kt] int64 token indices


def chunks(student_spans: np.ndarray, teacher_spans: np.ndarray) -> list[Chunk]:
  """The coarsest common partition of two tokenizations.

  Chunk boundaries are the byte positions that are token boundaries on both sides; every token
  with text falls in exactly one chunk (where its span starts). A 1:1 chunk is an `exact_pairs`
  pair. Where one side covers bytes the other does not (e.g. one side truncated), the chunk holds
  tokens of that side only.
  """
  s = np.asarray(student_spans, dtype=np.int64).reshape(-1, 2)
  t = np.asarray(teacher_spans, dtype=np.int64).reshape(-1, 2)
  si, ti = np.flatnonzero(_valid(s)), np.flatnonzero(_valid(t))
  s_bounds = np.unique(s[si].ravel())
  t_bounds = np.unique(t[ti].ravel())
  cuts = np.intersect1d(s_bounds, t_bounds)
  if not len(si) and not len(ti):
    return []
  lo = int(min(s[si, 0].min(initial=2**62), t[ti, 0].min(initial=2**62)))
  hi = int(max(s[si, 1].max(initial=0), t[ti, 1].max(initial=0)))
  cuts = np.unique(np.concatenate([[lo], cuts, [hi]]))
  s_chunk = np.searchsorted(cuts, s[si, 0], side="right") - 1
  t_chunk = np.searchsorted(cuts, t[ti, 0], side="right") - 1
  out = []
  for c in range(len(cuts) - 1):
    ks, kt = si[s_chunk == c], ti[t_chunk == c]
    if len(ks) or len(kt):
      out.append(Chunk(int(cuts[c]), int(cuts[c + 1]), ks, kt))
  return out


def pairs_to_arrays(pairs: np.ndarray, student_mask: Any, teacher_mask: Any,
                    length: int) -> tuple[np.ndarray, np.ndarray]:
  """Fixed-shape (pos [length] int32, mask [length] int32) from label-position pairs (i, j).

  pos[i] = j and mask[i] = 1 for each pair where student_mask[i] and teacher_mask[j] are both 1;
  elsewhere 0. Raises ValueError if a student position does not fit in `length`.
  """
  sm = np.asarray(student_mask).reshape(-1).astype(bool)
  tm = np.asarray(teacher_mask).reshape(-1).astype(bool)
  if len(sm) > length:
    nz = np.flatnonzero(sm)
    if len(nz) and nz[-1] >= length:
      raise ValueError(f"student mask has valid positions beyond length {length}")
  pos = np.zeros(length, dtype=np.int32)
  mask = np.zeros(length, dtype=np.int32)
  pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
  if len(pairs):
    i, j = pairs[:, 0], pairs[:, 1]
    ok = (i >= 0) & (i < min(length, len(sm))) & (j >= 0) & (j < len(tm))
    i, j = i[ok], j[ok]
    ok = sm[i] & tm[j]
    pos[i[ok]] = j[ok]
    mask[i[ok]] = 1
  return pos, mask


def _last_true(mask: np.ndarray) -> int:
  nz = np.flatnonzero(mask)
  return int(nz[-1]) if len(nz) else -1


def eta_arrays(student_label_spans: np.ndarray, teacher_label_spans: np.ndarray,
               student_mask: Any, teacher_mask: Any, L_s: int) -> tuple[np.ndarray, np.ndarray]:
  """`main/align/eta_pos` and `eta_mask` ([L_s] int32 each) of one sequence.

  How the pipeline calls it: for each side, tokenize prompt and response of the view (ids and
  offsets into the full view text; `byte_spans` on the concatenated ids/offsets, EOS appended with
  an empty span (-1, -1)); the label spans are `spans[1:]` (labels = ids[1:]), the masks the
  loss_masks (1 at response labels, EOS included), unpadded or padded.

  student_label_spans [ns, 2], teacher_label_spans [nt, 2]: byte spans of the label tokens.
  student_mask [>= ns], teacher_mask [>= nt]: loss masks.
  Returns eta_pos[i] = the teacher label position j whose span equals student label i's span, and
  eta_mask[i] = 1 where such j exists and both masks are 1. The final masked labels of the two
  sides are paired too when both cover no text (EOS <-> EOS).
  """
  s = np.asarray(student_label_spans, dtype=np.int64).reshape(-1, 2)
  t = np.asarray(teacher_label_spans, dtype=np.int64).reshape(-1, 2)
  sm = np.asarray(student_mask).reshape(-1)[:len(s)].astype(bool)
  tm = np.asarray(teacher_mask).reshape(-1)[:len(t)].astype(bool)
  pairs = exact_pairs(s, t)
  ls, lt = _last_true(sm), _last_true(tm)
  if ls >= 0 and lt >= 0 and not _valid(s[ls:ls + 1])[0] and not _valid(t[lt:lt + 1])[0]:
    pairs = np.concatenate([pairs, [[ls, lt]]])
  return pairs_to_arrays(pairs, sm, tm, L_s)
