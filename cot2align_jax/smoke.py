"""Model smoke job: load a real checkpoint, show its next-token guesses, generate, score.

    python -m cot2align_jax.smoke                                   # SmolLM2-135M-Instruct (GGUF)
    python -m cot2align_jax.smoke --model gguf:gemma3-270m
    python -m cot2align_jax.smoke --model path/to/hf_dir --prompt "Once upon a time"
    python -m cot2align_jax.smoke --json out.json                   # also write the numbers

Runs offline on a CPU. A bad argument or a missing model prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from cot2align_jax.core import cli
from cot2align_jax.models import from_pretrained, load_tokenizer, params_of
from cot2align_jax.models.config import ModelError
from cot2align_jax.models.generation import GenerationConfig, generate
from cot2align_jax.models.scoring import perplexity

DEFAULT_MODEL = "gguf:smollm2-135m-instruct"
DEFAULT_PROMPT = "The capital of Italy is"
DEFAULT_TEXT = "The capital of Italy is Rome. It is a beautiful city with a long history."


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m cot2align_jax.smoke", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=DEFAULT_MODEL,
                 help="HF checkpoint dir, .gguf file, gguf:smollm2-135m-instruct or "
                      "gguf:gemma3-270m (default: %(default)s)")
  p.add_argument("--prompt", default=DEFAULT_PROMPT)
  p.add_argument("--text", default=DEFAULT_TEXT, help="sentence whose perplexity is reported")
  p.add_argument("--max-new-tokens", type=int, default=24)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--no-repeat-ngram", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--json", default=None, help="write the results to this JSON file")
  return p


def run(args: argparse.Namespace) -> dict:
  """Loads, predicts, generates and scores; returns the numbers it printed."""
  t0 = time.perf_counter()
  tok = load_tokenizer(args.model)
  model = from_pretrained(args.model, dtype=args.dtype)
  load_s = time.perf_counter() - t0
  cfg = model.config
  n_params = sum(int(np.prod(x.shape)) for x in params_of(model).values())
  print(f"model       {args.model}: {cfg.model_type}, {cfg.num_layers} layers, "
        f"{n_params / 1e6:.1f}M params, {len(tok)} tokens; loaded in {load_s:.1f} s "
        f"on {jax.devices()[0].platform}")

  prompt_ids = np.asarray([tok(args.prompt)["input_ids"]], np.int32)
  logits = np.asarray(model(prompt_ids, logits="last", hidden_states="none").logits[0, -1])
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  top = np.argsort(-probs)[:5]
  top_list = [(tok.decode([int(i)]), float(probs[i])) for i in top]
  print(f"prompt      {args.prompt!r}")
  print("next token  " + " | ".join(f"{t!r} {p:.3f}" for t, p in top_list))

  gen_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p,
                             no_repeat_ngram_size=args.no_repeat_ngram, seed=args.seed)
  t0 = time.perf_counter()
  out = generate(model, prompt_ids, None, gen_cfg)
  out.tokens.block_until_ready()
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = generate(model, prompt_ids, None, gen_cfg)
  out.tokens.block_until_ready()
  run_s = time.perf_counter() - t0
  n = int(out.lengths[0])
  text = tok.decode(np.asarray(out.tokens[0, :n]).tolist())
  mode = "greedy" if gen_cfg.is_greedy else f"sampled (T={args.temperature}, seed {args.seed})"
  print(f"generated   {mode}: {args.prompt + text!r}")
  print(f"            {n} tokens with the KV cache; compile+run {first_s:.1f} s, "
        f"then {n / run_s:.1f} tokens/s")

  ids = np.asarray([tok(args.text)["input_ids"]], np.int32)
  ppl = float(perplexity(model, ids)[0])
  print(f"perplexity  {ppl:.2f} on {args.text!r} ({ids.shape[1]} tokens)")
  return {"model": args.model, "params": n_params, "load_s": load_s, "top5": top_list,
          "generated": text, "generated_tokens": n, "tokens_per_s": n / run_s,
          "perplexity": ppl, "perplexity_text": args.text}


def main(argv=None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.max_new_tokens < 1:
    cli.fail("--max-new-tokens must be >= 1")
  result = cli.guarded(lambda: run(args), (ModelError, FileNotFoundError, ValueError))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
