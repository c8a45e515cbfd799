"""A model's perplexity on the pipeline's training views with and without its BOS token.

Run from the repository root (the Dolly set of ../shared/data, or --data_dir):

  python bench/bos_perplexity.py                                  # gguf:gemma3-270m, 16 Dolly
  python bench/bos_perplexity.py --model=path/to/hf_dir --examples=64

Each of the first --examples Dolly train examples becomes its plain record (Alpaca prompt +
gold response); the record's view is tokenized as the pipeline does (data.tokenize.tokenize_view,
prompt ≤ 128 tokens, total ≤ 256) once with data.special_tokens="convention" (the tokenizer's
own BOS, if it adds one) and once with "reference" (no special tokens, the paper code's
views). Perplexity = exp(mean negative log-likelihood of the response tokens and the EOS), over
all tokens of all examples. JSON to --out (default bench/results/bos_perplexity.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from cot2align_jax.data import sources  # noqa: E402
from cot2align_jax.data.records import build_records  # noqa: E402
from cot2align_jax.data.tokenize import adds_bos, pad_id, tokenize_view  # noqa: E402
from cot2align_jax.models import from_pretrained, load_tokenizer  # noqa: E402
from cot2align_jax.models.scoring import token_logprobs  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "bos_perplexity.json"
MAX_PROMPT, MAX_LEN = 128, 256


def response_nll(model, tok, records, mode: str) -> tuple[float, int]:
  """(summed NLL in nats, token count) of the response labels of `records`' views."""
  total, count = 0.0, 0
  for r in records:
    view = tokenize_view(r.prompt, r.response, tok, max_prompt=MAX_PROMPT, max_len=MAX_LEN,
                         special_tokens=mode)
    n = len(view)
    ids = np.full((1, MAX_LEN), pad_id(tok), np.int32)
    mask = np.zeros((1, MAX_LEN), np.int32)
    ids[0, :n], mask[0, :n] = view.ids, 1
    lp, valid = token_logprobs(model, ids, mask)
    labels = np.zeros((MAX_LEN - 1,), bool)
    labels[:n - 1] = view.response_mask[1:].astype(bool)
    keep = labels & valid[0]
    total -= float(lp[0][keep].sum())
    count += int(keep.sum())
  return total, count


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="gguf:gemma3-270m")
  p.add_argument("--examples", type=int, default=16)
  p.add_argument("--data_dir", default=None, help="default: ../shared/data")
  p.add_argument("--out", default=str(DEFAULT_OUT))
  args = p.parse_args(argv)
  examples = sources.read_examples("dolly", "train", source=args.data_dir,
                                   max_examples=args.examples)
  records = build_records(examples, {}, cot_rule="none")
  model, tok = from_pretrained(args.model), load_tokenizer(args.model)
  rows = {}
  for mode in ("reference", "convention"):
    start = time.perf_counter()
    nll, n = response_nll(model, tok, records, mode)
    rows[mode] = {"perplexity": round(math.exp(nll / n), 3), "tokens": n,
                  "seconds": round(time.perf_counter() - start, 1)}
    print(f"{mode:10s} perplexity {rows[mode]['perplexity']:9.3f} over {n} response tokens",
          flush=True)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"model": args.model, "adds_bos": adds_bos(tok),
                             "examples": len(records), "max_prompt": MAX_PROMPT,
                             "max_len": MAX_LEN, "modes": rows}, indent=1) + "\n")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
