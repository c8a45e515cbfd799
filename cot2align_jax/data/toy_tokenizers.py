"""Tokenizers trained on the fly with `tokenizers` (data/arith.py: the demo size and the tiny size).

    teacher = train_byte_bpe(texts, 400, name="arith-teacher")        # GPT-2 style, "Ġ"
    student = train_metaspace_bpe(texts, 200, name="arith-student")   # Llama style, "▁"

Both come back as Hugging Face fast tokenizers with pad "<pad>" (id 0), EOS "</s>" (id 1) and
unk "<unk>" (id 2), so the data pipeline and the alignment code treat them like real ones.
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIALS = ("<pad>", "</s>", "<unk>")


def as_fast(tok, name: str):
  """A `tokenizers.Tokenizer` wrapped as a transformers fast tokenizer named `name`."""
  # transformers is heavy to import; only the wrapping needs it
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>")
  fast.name_or_path = name
  return fast


def train_byte_bpe(texts: Sequence[str], vocab_size: int, *, name: str):
  """A byte-level BPE (GPT-2 style: "Ġ" marks a leading space; every byte is in the alphabet)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.train_from_iterator(list(texts), trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return as_fast(tok, name)


def train_metaspace_bpe(texts: Sequence[str], vocab_size: int, *, name: str):
  """A BPE over the SentencePiece "▁" Metaspace (Llama style; no byte fallback, so characters
  outside the training texts become "<unk>")."""
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
  tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
  tok.train_from_iterator(list(texts), trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False))
  return as_fast(tok, name)
