"""Generation benchmark: generated tokens/s with the KV cache vs full recomputation.

Run from the repository root:

  python bench/generate.py                 # random Llama-shaped model, B=8, prompt 64, 64 new
  python bench/generate.py --quick         # CI smoke: 2 layers, width 64, 16 new tokens
  python bench/generate.py --layers 12 --hidden 768 --vocab 32000 --batch 32 --prompt 256 \
      --new 256                            # on a GPU

Both decoders run the same random model on the same left-padded batch (real prompt lengths
spread between prompt/2 and prompt) with the evaluation's sampler (temperature 1, top-p 1,
top-k off, no-repeat-ngram 6) and the same seed, EOS disabled so that every row generates
exactly --new tokens:

* cache: `models.generation.generate` (prefill + a `lax.while_loop` over a KV cache, one
  jitted program). Compiled and warmed by one untimed call, then **one** timed call.
* recompute: `models.generation.decode_full_recompute` (a Python loop; each step runs the whole
  [B, P + N] sequence through the model without a cache). Its two jitted pieces are compiled
  and warmed by one untimed step each, then **one** timed full decode.

tokens/s = B × N generated tokens / wall seconds of the timed call (`block_until_ready`).
`tokens_match` says whether both produced identical tokens (they use the same keys; a rare float
tie can differ). Writes JSON (default bench/results/generate.json). Bad arguments: one line on
stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/generate.py` puts bench/, not the repo root, first
  sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "bench" / "results" / "generate.json"
# (normal, --quick)
DEFAULTS = {"layers": (4, 2), "hidden": (256, 64), "vocab": (8192, 1024), "batch": (8, 4),
            "prompt": (64, 32), "new": (64, 16)}


class BenchError(Exception):
  """A bad argument, reported in one line."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise BenchError(message)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="bench/generate.py", description=__doc__.split("\n", 1)[0])
  p.add_argument("--layers", type=int, help="decoder layers (4; 2 with --quick)")
  p.add_argument("--hidden", type=int, help="model width (256; 64 with --quick); heads = "
                 "hidden/64, MLP 8/3 x hidden")
  p.add_argument("--vocab", type=int, help="vocabulary (8192; 1024 with --quick)")
  p.add_argument("--batch", type=int, help="prompts per batch (8; 4 with --quick)")
  p.add_argument("--prompt", type=int, help="padded prompt width P (64; 32 with --quick)")
  p.add_argument("--new", type=int, help="generated tokens N per row (64; 16 with --quick)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--no-repeat-ngram", type=int, default=6)
  p.add_argument("--seed", type=int, default=10)
  p.add_argument("--skip-recompute", action="store_true", help="time the cached decoder only")
  p.add_argument("--quick", action="store_true", help="CI smoke sizes (explicit flags win)")
  p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON path ({DEFAULT_OUT})")
  return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  args = _parser().parse_args(argv)
  for name, (normal, quick) in DEFAULTS.items():
    if getattr(args, name) is None:
      setattr(args, name, quick if args.quick else normal)
  for name, low in (("layers", 1), ("hidden", 64), ("vocab", 16), ("batch", 1), ("prompt", 2),
                    ("new", 1)):
    if getattr(args, name) < low:
      raise BenchError(f"--{name} must be >= {low}, got {getattr(args, name)}")
  if args.hidden % 64:
    raise BenchError(f"--hidden must be a multiple of 64 (head size), got {args.hidden}")
  if args.out.exists() and args.out.is_dir():
    raise BenchError(f"--out {args.out} is a directory; give a file path")
  return args


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from cot2align_jax.models import config_from_hf, create_model
  from cot2align_jax.models import generation as G

  hf = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
            intermediate_size=(8 * args.hidden // 3 + 63) // 64 * 64,
            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
            num_key_value_heads=args.hidden // 64, max_position_embeddings=args.prompt + args.new,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
  cfg = config_from_hf(hf, dtype=args.dtype, param_dtype="float32")
  model = create_model(cfg, 0)
  b, p, n = args.batch, args.prompt, args.new
  rng = np.random.default_rng(0)
  ids = rng.integers(3, args.vocab, size=(b, p)).astype(np.int32)
  lengths = np.linspace(max(1, p // 2), p, b).astype(int)
  mask = (np.arange(p)[None, :] >= (p - lengths)[:, None]).astype(np.int32)
  gen_cfg = G.GenerationConfig(max_new_tokens=n, temperature=1.0, top_p=1.0, top_k=0,
                               no_repeat_ngram_size=args.no_repeat_ngram, eos_token_ids=(),
                               pad_token_id=0)
  result: dict[str, Any] = {
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
      "host": platform.node(), "jax": jax.__version__,
      "config": {k: getattr(args, k) for k in ("layers", "hidden", "vocab", "batch", "prompt",
                                               "new", "dtype", "no_repeat_ngram", "seed")},
      "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
      "prompt_lengths": lengths.tolist()}

  t0 = time.perf_counter()
  jax.block_until_ready(G.generate(model, ids, mask, gen_cfg, seed=args.seed + 1))
  warm = time.perf_counter() - t0
  t0 = time.perf_counter()
  cached = jax.block_until_ready(G.generate(model, ids, mask, gen_cfg, seed=args.seed))
  secs = time.perf_counter() - t0
  toks = int(np.asarray(cached.lengths).sum())
  result["cache"] = {"seconds": secs, "tokens": toks, "tokens_per_s": toks / secs,
                     "first_call_s": warm, "steps": int(cached.steps)}
  log(f"cache:     {toks} tokens in {secs:.3f} s = {toks / secs:,.1f} tok/s "
      f"(first call incl. compile {warm:.1f} s)")

  if not args.skip_recompute:
    graphdef, state = nnx.split(model)
    ids_c, mask_c, rcfg = G._check_inputs(model, ids, mask, gen_cfg)
    full = jnp.asarray(np.concatenate([ids_c, np.zeros((b, n), np.int32)], 1))
    fmask = jnp.asarray(np.concatenate([mask_c, np.zeros((b, n), np.int32)], 1))
    t0 = time.perf_counter()
    logits = G._logits_at(graphdef, state, full, fmask, p - 1)
    jax.block_until_ready(G._select_jit(logits, jax.random.key(0), full, fmask, p,
                                        cfg=G._static(rcfg),
                                        valid_vocab_size=cfg.valid_vocab_size))
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = jax.block_until_ready(G.decode_full_recompute(model, ids, mask, gen_cfg,
                                                        seed=args.seed))
    secs = time.perf_counter() - t0
    toks = int(np.asarray(ref.lengths).sum())
    result["recompute"] = {"seconds": secs, "tokens": toks, "tokens_per_s": toks / secs,
                           "first_step_s": warm}
    result["speedup"] = result["cache"]["tokens_per_s"] / result["recompute"]["tokens_per_s"]
    result["tokens_match"] = bool(np.array_equal(np.asarray(ref.tokens),
                                                 np.asarray(cached.tokens)))
    log(f"recompute: {toks} tokens in {secs:.3f} s = {toks / secs:,.1f} tok/s "
        f"(first step incl. compile {warm:.1f} s)")
    log(f"speedup {result['speedup']:.1f}x; tokens identical: {result['tokens_match']}")
  return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  result = run(args)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {args.out}")
  return result


def _cli() -> int:
  try:
    main()
  except BenchError as e:
    print(f"bench/generate.py: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(_cli())
