"""The batch contract between the data pipeline and the losses / train step.

A batch is a flat dict of numpy arrays (jax arrays once on the mesh) with fixed shapes per
bucket. B = batch size, Ls / Lt = student / teacher sequence length of the bucket (inputs are
ids[:-1], so a view of n tokens fills n - 1 positions), Vt = teacher vocabulary.

Per view ("main", "pair") and side ("student", "teacher"):

  {view}/{side}/input_ids       [B, L] int32  ids[:-1]; padding = the tokenizer's pad id
  {view}/{side}/labels          [B, L] int32  ids[1:]; 0 where loss_mask is 0
  {view}/{side}/loss_mask       [B, L] int32  1 where labels[b, i] is a response token
                                               (the EOS included): what CE, KD and OT use
  {view}/{side}/attention_mask  [B, L] int32  1 at real input tokens (prompt and response)

  has_pair                      [B]    bool   the record has a paired plain view (CoT records);
                                               for rows without a pair the "pair/..." arrays are
                                               all padding (masks 0)
  example_id                    [B]    int32  index of the source example (-1 for padding rows)

Token alignments of the main view, indexed by the *student* label position i and pointing to a
*teacher* label position j (labels[i] on the student side and labels[j] on the teacher side
cover the same bytes of the text):

  main/align/eta_pos            [B, Ls] int32  exact 1:1 alignment (DSKD's ETA): the teacher
                                               position whose label token decodes to the same
                                               string (space markers stripped, EOS <-> EOS) and
                                               whose decoded prefix matches; 0 where none
  main/align/eta_mask           [B, Ls] int32  1 where eta_pos is valid (both loss_masks are 1)
  main/align/mined_pos          [B, Ls] int32  MinED: 1:1 pairs of the DTW alignment of the two
                                               response token sequences (edit-distance cost)
  main/align/mined_mask         [B, Ls] int32  1 where mined_pos is valid

Vocabulary maps are not per batch: `mined_vocab_map` [Vt] int32 maps each teacher token id to
the student id of minimum edit distance (computed once per tokenizer pair and cached on disk).
"""

from __future__ import annotations

VIEWS = ("main", "pair")
SIDES = ("student", "teacher")
SEQ_FIELDS = ("input_ids", "labels", "loss_mask", "attention_mask")
ALIGN_FIELDS = ("eta_pos", "eta_mask", "mined_pos", "mined_mask")


def key(view: str, side: str, field: str) -> str:
  """The batch key of one sequence field, e.g. key("main", "student", "labels")."""
  if view not in VIEWS or side not in SIDES or field not in SEQ_FIELDS:
    raise KeyError(f"no batch field {view}/{side}/{field}")
  return f"{view}/{side}/{field}"


def align_key(field: str) -> str:
  if field not in ALIGN_FIELDS:
    raise KeyError(f"no alignment field {field!r}; known: {', '.join(ALIGN_FIELDS)}")
  return f"main/align/{field}"


def all_keys() -> list[str]:
  keys = [key(v, s, f) for v in VIEWS for s in SIDES for f in SEQ_FIELDS]
  return keys + [align_key(f) for f in ALIGN_FIELDS] + ["has_pair", "example_id"]
