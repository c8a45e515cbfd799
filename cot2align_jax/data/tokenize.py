"""Tokenization of one view (prompt + response) by one tokenizer, with byte spans.

Rules (docs/method.md §2): BOS per `special_tokens` (below); the prompt keeps its *first*
`max_prompt` tokens (BOS not counted); the response follows; EOS is appended; the whole id
sequence (BOS included) keeps its first `max_len` tokens. No other special token is added.
Inputs are ids[:-1], labels ids[1:], and only response labels (the EOS included) are valid.
Prompt + response are tokenized jointly and split at the prompt's end by character offsets (a
token that starts inside the prompt belongs to the prompt). A records.ChatPrompt is first
rendered by this tokenizer's own chat template (data.template=chat), so the two sides' prompts
may differ while the response text is the same; a prompt that already starts with the BOS
text gets no second BOS.

special_tokens (`SPECIAL_TOKENS`, the config key data.special_tokens):
  "convention"  BOS first iff the tokenizer itself puts its BOS first when called with
                add_special_tokens=True (`adds_bos`: Llama-2, Mistral, Gemma yes; GPT-2, Qwen,
                SmolLM2 and the toy tokenizers no). A tokenizer without a BOS never gets one.
  "reference"   never a BOS (the paper's code): only the appended EOS.

Byte spans: UTF-8 byte offsets into the view text (HF fast tokenizers report character offsets).
Tokens sharing a multi-byte character all get that character's span, so spans may overlap; BOS
has the empty span (0, 0) and response_mask 0 (it is only ever an input, never a label, so it is
in no alignment pair); EOS has the empty span (len(text), len(text)); prompt tokens dropped by
truncation have none.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref

import numpy as np

from cot2align_jax.data.records import render_prompt

_log = logging.getLogger(__name__)
_WARNED_NO_PAD: set[str] = set()

SPECIAL_TOKENS = ("convention", "reference")
_PROBE_TEXT = "a"   # encoded with and without special tokens to see whether BOS is prepended
_ADDS_BOS: "weakref.WeakKeyDictionary[object, bool]" = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class TokenizedView:
  """One view tokenized by one tokenizer; n = number of ids (≤ max_len).

  ids            [n]    int32  [BOS], prompt ids (≤ max_prompt), response ids, EOS; truncated to
                              max_len
  offsets        [n, 2] int32  UTF-8 byte span [start, end) of each id in `text`; BOS: (0, 0);
                              EOS: empty at the end
  response_mask  [n]    int32  1 at response ids and at the EOS (0 at BOS and prompt ids)
  text           str           the view text (prompt + response, lone surrogates replaced)
  prompt_bytes   int           UTF-8 byte length of the prompt part of `text`
  """

  ids: np.ndarray
  offsets: np.ndarray
  response_mask: np.ndarray
  text: str
  prompt_bytes: int

  def __len__(self) -> int:
    return int(self.ids.shape[0])

  def model_arrays(self) -> dict[str, np.ndarray]:
    """The four spec.py sequence fields of this row, unpadded, each [n - 1] int32.

    input_ids = ids[:-1]; labels = ids[1:] where the label is a response token, else 0;
    loss_mask = response_mask[1:]; attention_mask = 1 everywhere (every input is a real token).
    """
    n = len(self) - 1
    loss_mask = self.response_mask[1:].astype(np.int32)
    return {
        "input_ids": self.ids[:-1].astype(np.int32),
        "labels": (self.ids[1:] * loss_mask).astype(np.int32),
        "loss_mask": loss_mask,
        "attention_mask": np.ones((n,), np.int32),
    }


def clean_text(text: str) -> str:
  """`text` with lone UTF-16 surrogates replaced by U+FFFD (valid surrogate pairs are joined).

  Strings read with `surrogateescape`/`surrogatepass` may hold code points that cannot be
  UTF-8 encoded; tokenizers and byte offsets need encodable text.
  """
  try:
    text.encode("utf-8")
    return text
  except UnicodeEncodeError:
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def tokenizer_name(tok) -> str:
  """A readable name of a tokenizer for log lines (its path or class)."""
  return str(getattr(tok, "name_or_path", "") or type(tok).__name__)


def eos_id(tok) -> int:
  """The tokenizer's EOS id; raises ValueError when it has none."""
  eos = getattr(tok, "eos_token_id", None)
  if eos is None:
    raise ValueError(f"tokenizer {tokenizer_name(tok)} has no EOS token; it cannot build views")
  return int(eos)


def pad_id(tok) -> int:
  """The tokenizer's pad id, or its EOS id (warning once per tokenizer name) when it has none."""
  pad = getattr(tok, "pad_token_id", None)
  if pad is not None:
    return int(pad)
  name = tokenizer_name(tok)
  if name not in _WARNED_NO_PAD:
    _WARNED_NO_PAD.add(name)
    _log.warning("tokenizer %s has no pad token; using EOS", name)
  return eos_id(tok)


def check_special_tokens(value: str) -> str:
  """`value` when it is one of SPECIAL_TOKENS, else ValueError (one line)."""
  if value not in SPECIAL_TOKENS:
    raise ValueError(f"special_tokens must be one of {', '.join(SPECIAL_TOKENS)}, got {value!r}")
  return value


def _detect_bos(tok) -> bool:
  """Whether encoding a short text with add_special_tokens=True puts bos_token_id first and
  without special tokens does not (False when the tokenizer has no BOS)."""
  bos = getattr(tok, "bos_token_id", None)
  if bos is None:
    return False
  with_special = list(tok(_PROBE_TEXT, add_special_tokens=True)["input_ids"])
  without = list(tok(_PROBE_TEXT, add_special_tokens=False)["input_ids"])
  return with_special[:1] == [int(bos)] and without[:1] != [int(bos)]


def adds_bos(tok) -> bool:
  """The tokenizer's own BOS convention (`_detect_bos`), cached per tokenizer object."""
  try:
    cached = _ADDS_BOS.get(tok)
  except TypeError:  # not weak-referenceable or not hashable: detect every time
    return _detect_bos(tok)
  if cached is None:
    cached = _ADDS_BOS[tok] = _detect_bos(tok)
  return cached


def bos_ids(tok, special_tokens: str = "convention") -> list[int]:
  """The ids put before a model input: [bos_token_id] under "convention" when the tokenizer
  adds a BOS itself (`adds_bos`), else [] (always [] under "reference")."""
  check_special_tokens(special_tokens)
  if special_tokens == "convention" and adds_bos(tok):
    return [int(tok.bos_token_id)]
  return []


def starts_with_bos(text: str, tok) -> bool:
  """Whether `text` already starts with the tokenizer's BOS token as text (chat templates that
  write it themselves): then no second BOS is put before it."""
  bos = getattr(tok, "bos_token", None)
  return bool(bos) and isinstance(bos, str) and text.startswith(bos)


def _char_to_byte(text: str) -> np.ndarray:
  """[len(text) + 1] int64: the UTF-8 byte offset of each character index of `text`."""
  cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
  widths = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
  return np.concatenate([[0], np.cumsum(widths)])


def _encode(text: str, tok) -> tuple[np.ndarray, np.ndarray]:
  """Ids [k] and character offsets [k, 2] of `text`, no special tokens added."""
  enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], dtype=np.int32).reshape(-1)
  offs = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
  return ids, offs


def tokenize_view(prompt: str, response: str, tok, *, max_prompt: int = 256,
                  max_len: int = 512, special_tokens: str = "convention") -> TokenizedView:
  """Tokenizes one view (see the module docstring for the rules).

  Args:
    prompt: the prompt text (template filled in).
    response: the response text; "" gives an EOS-only response.
    tok: a Hugging Face fast tokenizer (offsets needed).
    max_prompt: prompt tokens kept (the first ones); a BOS does not count.
    max_len: total ids kept (BOS + prompt + response + EOS), the first ones; ≥ 2.
    special_tokens: "convention" (BOS iff the tokenizer adds one) or "reference" (no BOS).

  Returns:
    A TokenizedView of n ≤ max_len ids.
  """
  if max_prompt < 0 or max_len < 2:
    raise ValueError(f"need max_prompt >= 0 and max_len >= 2, got {max_prompt}, {max_len}")
  prompt = render_prompt(prompt, tok)         # a ChatPrompt: this tokenizer's chat template
  bos = np.asarray([] if starts_with_bos(prompt, tok) else bos_ids(tok, special_tokens), np.int32)
  prompt, response = clean_text(prompt), clean_text(response)
  text = prompt + response
  ids, offs = _encode(text, tok) if text else (np.zeros((0,), np.int32), np.zeros((0, 2), np.int64))
  in_prompt = offs[:, 0] < len(prompt)
  keep = ~in_prompt | (np.cumsum(in_prompt) <= max_prompt)
  c2b = _char_to_byte(text)
  n_bytes = int(c2b[-1])
  ids = np.concatenate([bos, ids[keep], np.asarray([eos_id(tok)], np.int32)])[:max_len]
  spans = np.concatenate([np.zeros((len(bos), 2), np.int64), c2b[offs[keep]],
                          np.asarray([[n_bytes, n_bytes]])])[:max_len]
  resp = np.concatenate([np.zeros((len(bos),), bool), ~in_prompt[keep], [True]])[:max_len]
  return TokenizedView(ids=ids.astype(np.int32), offsets=spans.astype(np.int32),
                       response_mask=resp.astype(np.int32), text=text,
                       prompt_bytes=int(c2b[len(prompt)]))
