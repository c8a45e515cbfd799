"""Decoder throughput benchmark: forward and fwd+bwd tokens/s, FLOP/s and an MFU-style ratio.

Run from the repository root:

  python bench/models.py                       # GPT-2 small shape, seq 512, batch 1, float32
  python bench/models.py --quick               # 2 layers, seq 128: a CI smoke run
  python bench/models.py --batch 16 --steps 20 --dtype bfloat16   # on a GPU / TPU

What is measured (all in one process, on `jax.devices()[0]`):

1. forward: a jitted `model(ids, mask, hidden_states="none", logits="all")` returning the float32
   logits [B, T, V];
2. train: a jitted `jax.value_and_grad` of the mean next-token cross-entropy over those logits
   with respect to the parameters (no optimizer update);
3. matmul: a jitted square matmul `a @ b` of size n x n in the same compute dtype, as a measured
   stand-in for the device's peak matmul FLOP/s.

Each is compiled ahead of time (`jit(...).lower(...).compile()`; that time is reported as
`compile_s`), run `--warmup` times, then timed for `--steps` calls with `block_until_ready`; the
model rows report the median step time. The matmul is timed max(--steps, 5) times both before and
after the model runs and its *best* step defines the peak, so drift or a shared host biases the
ratio low rather than above 100%.

Model FLOPs per token are analytic (the PaLM-paper "model FLOPs" convention; no rematerialisation
counted, only matmuls):

  N_mm        = L * (D*H*hd + 2*D*K*hd + H*hd*D + m*D*F) + D*V
                (q, k, v, o projections, MLP with m = 2 matrices, 3 if gated; LM head D*V.
                 Embedding / position lookups, norms, biases and softmax are not counted.)
  forward     = 2 * N_mm + L * 4 * T_att * H * hd     (T_att = T, or the window if smaller)
                (2 FLOPs per multiply-add for every weight; attention scores q.k and the
                 probability-weighted sum of v each cost 2 * T * H * hd per token per layer,
                 i.e. "2 * 2 * T * d" with d = H * hd; the causal mask is not credited since
                 the implementation computes the full T x T scores)
  train       = 3 * forward                        (backward = 2 x forward)

achieved FLOP/s = flops_per_token * tokens_per_s and `mfu` = achieved / measured matmul FLOP/s
(a ratio to the *measured* matmul peak, not to a vendor datasheet figure). XLA's own
`cost_analysis()` FLOP count of each compiled step is recorded as a cross-check where available.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/models.py` puts bench/, not the repo root, first
  sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "bench" / "results" / "models.json"
GPT2_SMALL = {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12,
              "n_head": 12, "n_positions": 1024}
DTYPES = ("float32", "bfloat16")

# Defaults: (normal, --quick). Chosen so the normal run finishes in well under ~3 min on a 2-core
# CPU; raise --batch / --steps on an accelerator.
DEFAULTS = {"batch": (1, 1), "seq": (512, 128), "steps": (3, 2), "warmup": (1, 1),
            "layers": (12, 2), "matmul_size": (None, 1024)}
MATMUL_MIN_STEPS = 5  # the matmul is cheap; time at least this many calls (twice, see run())


class BenchError(Exception):
  """A bad argument or setup problem, reported in one line."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line instead of usage + message
    raise BenchError(message)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="bench/models.py", description=__doc__.split("\n", 1)[0])
  p.add_argument("--batch", type=int, help="sequences per step (default 1)")
  p.add_argument("--seq", type=int, help="tokens per sequence (default 512; 128 with --quick)")
  p.add_argument("--steps", type=int, help="timed steps, median reported (default 3; 2 --quick)")
  p.add_argument("--warmup", type=int, help="untimed runs after compiling (default 1)")
  p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype")
  p.add_argument("--param-dtype", choices=DTYPES, default="float32",
                 help="parameter storage dtype (default float32: mixed precision with "
                      "--dtype bfloat16)")
  p.add_argument("--layers", type=int, help="decoder layers (default 12; 2 with --quick)")
  p.add_argument("--matmul-size", type=int,
                 help="n of the n x n peak matmul (default 4096 on GPU/TPU, 2048 on CPU; "
                      "1024 with --quick)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true",
                 help="CI smoke run: 2 layers, seq 128, 2 steps (explicit flags still win)")
  p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON path (default {DEFAULT_OUT})")
  return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  args = _parser().parse_args(argv)
  for name, (normal, quick) in DEFAULTS.items():
    if getattr(args, name) is None:
      setattr(args, name, quick if args.quick else normal)
  checks = [("batch", 1), ("seq", 2), ("steps", 1), ("warmup", 0), ("layers", 1)]
  for name, low in checks:
    if getattr(args, name) < low:
      raise BenchError(f"--{name} must be >= {low}, got {getattr(args, name)}")
  if args.matmul_size is not None and args.matmul_size < 16:
    raise BenchError(f"--matmul-size must be >= 16, got {args.matmul_size}")
  if args.out.exists() and args.out.is_dir():
    raise BenchError(f"--out {args.out} is a directory; give a file path")
  return args


# --------------------------------------------------------------------------------------------
# FLOP accounting


def matmul_params(cfg) -> int:
  """N_mm: weights that take part in a matmul per token (see the module docstring)."""
  d, h, k, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, \
      cfg.intermediate_size
  per_layer = d * h * hd + 2 * d * k * hd + h * hd * d + (3 if cfg.gated_mlp else 2) * d * f
  return cfg.num_layers * per_layer + d * cfg.vocab_size


def attention_flops_per_token(cfg, seq: int) -> int:
  """Forward attention FLOPs per token: per layer 2 * 2 * T_att * H * hd (scores + weighted sum)."""
  total = 0
  for i in range(cfg.num_layers):
    window = cfg.window_for(i)
    t_att = seq if window is None else min(seq, window)
    total += 4 * t_att * cfg.num_heads * cfg.head_dim
  return total


def flops_per_token(cfg, seq: int) -> dict[str, int]:
  fwd = 2 * matmul_params(cfg) + attention_flops_per_token(cfg, seq)
  return {"forward": fwd, "train": 3 * fwd}


# --------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class Timing:
  compile_s: float
  step_s: list[float]
  xla_flops: float | None  # XLA cost_analysis FLOPs of one call, when the backend reports it

  @property
  def median_s(self) -> float:
    return statistics.median(self.step_s)


def _xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  value = float(cost["flops"])
  return value if value > 0 else None


def compile_jitted(fn: Callable, args: tuple):
  """`jax.jit(fn)` compiled ahead of time for `args`, and the seconds that took."""
  import jax

  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - t0


def time_compiled(compiled, args: tuple, steps: int, warmup: int) -> list[float]:
  """Seconds per call of `compiled(*args)` for `steps` calls after `warmup` untimed calls."""
  import jax

  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return times


def time_jitted(fn: Callable, args: tuple, steps: int, warmup: int) -> Timing:
  """AOT-compiles `jax.jit(fn)` for `args`, then times `steps` calls after `warmup` calls."""
  compiled, compile_s = compile_jitted(fn, args)
  return Timing(compile_s, time_compiled(compiled, args, steps, warmup), _xla_flops(compiled))


# --------------------------------------------------------------------------------------------
# The benchmark


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
  import flax
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from cot2align_jax.models import config_from_hf, create_model

  device = jax.devices()[0]
  hf = dict(GPT2_SMALL, n_layer=args.layers, n_positions=max(GPT2_SMALL["n_positions"], args.seq))
  cfg = config_from_hf(hf).replace(dtype=args.dtype, param_dtype=args.param_dtype)
  b, t = args.batch, args.seq
  tokens = b * t
  matmul_n = args.matmul_size or (2048 if device.platform == "cpu" else 4096)
  log(f"device {device.platform}/{device.device_kind}  jax {jax.__version__}  "
      f"model gpt2-small-shaped L={cfg.num_layers} D={cfg.hidden_size} T={t} B={b} "
      f"dtype={cfg.dtype} params={cfg.param_dtype}")

  model = create_model(cfg, args.seed)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # grads w.r.t. params only
  del model
  n_params = int(sum(x.size for x in jax.tree.leaves(params)))

  key = jax.random.key(args.seed)
  ids = jax.random.randint(key, (b, t), 0, cfg.vocab_size, dtype=jnp.int32)
  mask = jnp.ones((b, t), jnp.int32)

  def forward(params, ids, mask):
    return nnx.merge(graphdef, params, rest)(ids, mask, hidden_states="none", logits="all").logits

  def loss_fn(params, ids, mask):
    logits = forward(params, ids, mask)[:, :-1]                     # [B, T-1, V] float32
    targets = ids[:, 1:]
    weights = mask[:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  train_step = jax.value_and_grad(loss_fn)

  # The peak matmul is timed before and after the model (the same compiled program) and the best
  # step is taken as the peak, so a noisy or shared host does not make the model look > 100%.
  peak_timings = []
  matmul_n_flops = 2 * matmul_n ** 3
  ka, kb = jax.random.split(jax.random.key(args.seed + 1))
  a = jax.random.normal(ka, (matmul_n, matmul_n), jnp.float32).astype(cfg.dtype)
  bm = jax.random.normal(kb, (matmul_n, matmul_n), jnp.float32).astype(cfg.dtype)
  mm_compiled, mm_compile_s = compile_jitted(lambda a, b: a @ b, (a, bm))
  mm_steps = max(args.steps, MATMUL_MIN_STEPS)
  log(f"[matmul] {matmul_n}x{matmul_n} {cfg.dtype}, {mm_steps} step(s) ...")
  peak_timings += time_compiled(mm_compiled, (a, bm), mm_steps, args.warmup)

  fpt = flops_per_token(cfg, t)
  results: dict[str, Any] = {}
  for name, fn, per_token in (("forward", forward, fpt["forward"]),
                              ("train", train_step, fpt["train"])):
    log(f"[{name}] compiling and timing {args.steps} step(s) ...")
    timing = time_jitted(fn, (params, ids, mask), args.steps, args.warmup)
    tps = tokens / timing.median_s
    results[name] = {
        "compile_s": timing.compile_s,
        "step_s_median": timing.median_s,
        "step_s_min": min(timing.step_s),
        "step_s": timing.step_s,
        "tokens_per_step": tokens,
        "tokens_per_s": tps,
        "flops_per_token": per_token,
        "flop_per_s": per_token * tps,
        "xla_flops_per_token": None if timing.xla_flops is None else timing.xla_flops / tokens,
    }

  log(f"[matmul] again after the model, {mm_steps} step(s) ...")
  peak_timings += time_compiled(mm_compiled, (a, bm), mm_steps, args.warmup)
  peak = matmul_n_flops / min(peak_timings)
  matmul = {"size": matmul_n, "dtype": cfg.dtype, "flops_per_call": matmul_n_flops,
            "compile_s": mm_compile_s, "step_s_min": min(peak_timings),
            "step_s_median": statistics.median(peak_timings), "step_s": peak_timings,
            "flop_per_s": peak,
            "flop_per_s_median": matmul_n_flops / statistics.median(peak_timings),
            "xla_flops_per_call": _xla_flops(mm_compiled)}
  for r in results.values():
    r["mfu_vs_matmul_peak"] = r["flop_per_s"] / peak

  return {
      "bench": "models",
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "argv": list(sys.argv[1:]) if args.argv is None else list(args.argv),
      "jax_version": jax.__version__,
      "flax_version": flax.__version__,
      "python": platform.python_version(),
      "platform": device.platform,
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "host": {"machine": platform.machine(), "cpu_count": os.cpu_count()},
      "model": {
          "shape": "gpt2-small", "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
          "num_heads": cfg.num_heads, "head_dim": cfg.head_dim,
          "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
          "max_position_embeddings": cfg.max_position_embeddings,
          "params": n_params, "matmul_params": matmul_params(cfg),
      },
      "dtype": cfg.dtype,
      "param_dtype": cfg.param_dtype,
      "batch": b,
      "seq": t,
      "steps": args.steps,
      "warmup": args.warmup,
      "quick": bool(args.quick),
      "flops_per_token": dict(fpt, formula=(
          "forward = 2*N_mm + L*4*T*H*hd; N_mm = L*(D*H*hd + 2*D*K*hd + H*hd*D + m*D*F) + D*V "
          "(m=2 MLP matrices, 3 if gated); train = 3*forward")),
      "forward": results["forward"],
      "train": results["train"],
      "matmul": matmul,
  }


def _si(x: float, unit: str = "") -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.2f} {prefix}{unit}"
  return f"{x:.2f} {unit}"


def format_table(res: dict[str, Any]) -> str:
  m = res["model"]
  head = (f"{res['platform']} / {res['device_kind']} | jax {res['jax_version']} | "
          f"GPT-2-small shape, {m['num_layers']} layers, {_si(m['params'])} params "
          f"({_si(m['matmul_params'])} matmul) | dtype {res['dtype']} (params "
          f"{res['param_dtype']}) | batch {res['batch']} x seq {res['seq']} | "
          f"median of {res['steps']} step(s)")
  rows = [("", "compile s", "step s", "tokens/s", "FLOP/token", "FLOP/s", "of matmul peak")]
  for name in ("forward", "train"):
    r = res[name]
    rows.append((name if name == "forward" else "fwd+bwd", f"{r['compile_s']:.2f}",
                 f"{r['step_s_median']:.4f}", f"{r['tokens_per_s']:,.1f}",
                 _si(r["flops_per_token"]), _si(r["flop_per_s"], "FLOP/s"),
                 f"{100 * r['mfu_vs_matmul_peak']:.1f}%"))
  mm = res["matmul"]
  rows.append((f"matmul {mm['size']}^2", f"{mm['compile_s']:.2f}", f"{mm['step_s_min']:.4f}",
               "-", f"{_si(mm['flops_per_call'])}/call", _si(mm["flop_per_s"], "FLOP/s"),
               "(peak)"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = [head, "step s = median (model rows), best (matmul row, timed before and after)", ""]
  for j, r in enumerate(rows):
    lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths))))
    if j == 0:
      lines.append("  ".join("-" * w for w in widths))
  xla = [f"{n} {_si(res[n]['xla_flops_per_token'])}" for n in ("forward", "train")
         if res[n]["xla_flops_per_token"] is not None]
  if xla:
    lines.append(f"(XLA cost_analysis FLOP/token, cross-check: {', '.join(xla)})")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark, prints the table, writes the JSON; returns the result dict."""
  args = parse_args(argv)
  args.argv = None if argv is None else list(argv)
  res = run(args)
  print()
  print(format_table(res))
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(res, indent=2) + "\n")
  print(f"\nwrote {args.out}")
  return res


def _cli() -> int:
  try:
    main()
  except BenchError as e:
    print(f"bench/models.py: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(_cli())
