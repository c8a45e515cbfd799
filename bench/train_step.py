"""Train-step throughput: tokens/s, achieved FLOP/s vs a matmul peak measured in the same run,
peak memory, and the saving of skipping paired-view forwards on batches without pairs.

Run from the repository root:

  python bench/train_step.py                 # (a) tiny and (b) GPT-2-small student / 0.5B teacher
  python bench/train_step.py --quick         # (a) only, few steps (CI smoke)
  python bench/train_step.py --setting gpt2 --batch 4 --seq 256 --dtype bfloat16   # on a GPU

Settings:
  tiny  the tiny cross-tokenizer problem (tests/support/tiny.py), real batches from
        the grain pipeline (B = --batch, one bucket of 64).
  gpt2  a GPT-2-small-shaped student (124M) and a Qwen2.5-0.5B-shaped teacher (random weights,
        vocab 151936, 24 layers, d 896), synthetic batches of B × T tokens per view (prompt =
        first half, response = second half).

Rows (one jitted train_step each, the whole optimizer update included):
  sft                    student CE only (no teacher)
  dskd_cma               teacher forward + DSKD-CMA
  cot2align/pairs        cot2align (dskd_cma base, OT same + cross terms, 2 layers) on a batch
                         where half of the rows have a paired view: pair forwards run
  cot2align/no_pairs     the same step on a batch without pairs: the cond skips the pair
                         forwards (pair_saving=True, the default)
  cot2align/no_pairs/nosave  that batch with pair_saving=False: the pair forwards run anyway
The saving = time(nosave) / time(no_pairs) on the same batch.

FLOPs per step are analytic model FLOPs of the forwards actually run (bench/models.py's
formula: student 3·fwd per view trained, teacher 1·fwd per view; OT, DSKD projections and the
optimizer are not counted), and XLA's cost_analysis() of the compiled step is recorded as a
cross-check. `of matmul peak` = achieved FLOP/s / best measured n×n matmul FLOP/s. tokens/s
counts the student's main-view positions (B·T). Peak memory: the device's peak_bytes_in_use
where it reports one (GPU/TPU), else the compiled step's memory_analysis (arguments + outputs
+ temporaries). JSON to --out (default bench/results/train_step.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
  if str(p) not in sys.path:
    sys.path.insert(0, str(p))

DEFAULT_OUT = ROOT / "bench" / "results" / "train_step.json"

QWEN05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24,
               num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
               max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
               tie_word_embeddings=True, hidden_act="silu", bos_token_id=151643,
               eos_token_id=151643, architectures=["Qwen2ForCausalLM"])


def _parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--setting", choices=("tiny", "gpt2", "both"), default="both")
  p.add_argument("--quick", action="store_true", help="tiny setting, 2 timed steps")
  p.add_argument("--batch", type=int, default=None, help="rows (tiny 8, gpt2 2)")
  p.add_argument("--seq", type=int, default=128, help="gpt2 setting: positions per view")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--dtype", default="float32", help="compute dtype of both models")
  p.add_argument("--teacher-dtype", default=None, help="teacher param storage (default dtype)")
  p.add_argument("--ot-iters", type=int, default=100)
  p.add_argument("--matmul-size", type=int, default=None)
  p.add_argument("--out", default=str(DEFAULT_OUT))
  return p


def _matmul_peak(n: int, dtype, reps: int = 5) -> float:
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
  jax.block_until_ready(f(a, a))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, a))
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def _fwd_flops(cfg, seq: int) -> int:
  import models as bench_models  # bench/models.py
  return bench_models.flops_per_token(cfg, seq)["forward"] * seq


def _synthetic_batch(b: int, t_s: int, t_t: int, v_s: int, v_t: int, pair_rows: int, seed=0):
  import numpy as np
  from cot2align_jax.core import spec
  rng = np.random.RandomState(seed)
  batch = {}
  for view in spec.VIEWS:
    for side, t, v in (("student", t_s, v_s), ("teacher", t_t, v_t)):
      ids = rng.randint(2, v, size=(b, t)).astype(np.int32)
      loss = np.zeros((b, t), np.int32)
      loss[:, t // 2:] = 1
      att = np.ones((b, t), np.int32)
      if view == "pair":
        keep = (np.arange(b) < pair_rows)[:, None]
        loss, att = loss * keep, att * keep
      batch[spec.key(view, side, "input_ids")] = ids
      batch[spec.key(view, side, "labels")] = np.roll(ids, -1, axis=1) * loss
      batch[spec.key(view, side, "loss_mask")] = loss
      batch[spec.key(view, side, "attention_mask")] = att
  for f in spec.ALIGN_FIELDS:
    batch[spec.align_key(f)] = np.zeros((b, t_s), np.int32)
  batch["has_pair"] = np.arange(b) < pair_rows
  batch["example_id"] = np.arange(b, dtype=np.int32)
  return batch


def _strip_pairs(batch):
  import numpy as np
  out = dict(batch)
  for k in out:
    if k.startswith("pair/") and not k.endswith("input_ids"):
      out[k] = np.zeros_like(out[k])
  out["has_pair"] = np.zeros_like(out["has_pair"])
  return out


def _memory(compiled, device) -> dict[str, Any]:
  out: dict[str, Any] = {}
  try:
    ma = compiled.memory_analysis()
    out["compiled_bytes"] = int(ma.argument_size_in_bytes + ma.output_size_in_bytes +
                                ma.temp_size_in_bytes - getattr(ma, "alias_size_in_bytes", 0))
    out["temp_bytes"] = int(ma.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def _xla_flops(compiled):
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops")) if ca and ca.get("flops") is not None else None
  except Exception:  # pylint: disable=broad-except
    return None


def _time_row(name, su, batch, *, pair_saving, steps, warmup, flops, tokens, device, peak,
              log):
  import jax
  import jax.numpy as jnp
  step = su.train_step(pair_saving=pair_saving)
  state = jax.tree.map(jnp.copy, su.state)
  t0 = time.perf_counter()
  compiled = step.lower(state, su.teacher_params, batch).compile()
  compile_s = time.perf_counter() - t0
  times, loss = [], None
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, m = compiled(state, su.teacher_params, batch)
    jax.block_until_ready(m)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
    loss = float(m["loss"][0] / m["loss"][1])
  med = statistics.median(times)
  row = {"name": name, "compile_s": compile_s, "step_s": med, "times": times,
         "tokens_per_s": tokens / med, "model_flops_per_step": flops,
         "achieved_flops_per_s": flops / med, "of_matmul_peak": flops / med / peak,
         "xla_flops_per_step": _xla_flops(compiled), "first_loss": loss,
         **_memory(compiled, device)}
  log(f"  {name:28s} {med * 1e3:9.1f} ms  {row['tokens_per_s']:10.0f} tok/s  "
      f"{row['of_matmul_peak'] * 100:6.2f}% of matmul peak  compile {compile_s:5.1f}s  "
      f"mem {row.get('device_peak_bytes', row.get('compiled_bytes', 0)) / 2**20:8.1f} MiB")
  return row


def run_setting(setting: str, args, peak: float, log=print) -> dict[str, Any]:
  import jax
  import numpy as np
  from cot2align_jax.losses.methods import KDConfig
  from cot2align_jax.losses.ot import OTConfig
  from cot2align_jax.models import config_from_hf
  from cot2align_jax.training import state as state_lib
  from tests.support import tiny  # the repository root is on sys.path (above)

  import models as bench_models  # bench/models.py
  device = jax.devices()[0]
  if setting == "tiny":
    prob = tiny.tiny_problem(n_examples=128)
    b = args.batch or 8
    s_cfg, t_cfg = prob.student_cfg, prob.teacher_cfg
    mixed = prob.batches(batch_size=b, n=8)
    frac = [float(x["has_pair"].mean()) for x in mixed]
    batch = mixed[int(np.argmin(np.abs(np.asarray(frac) - 0.5)))]
    t_s = t_t = prob.bucket
  else:
    b = args.batch or 2
    t_s = t_t = args.seq
    s_cfg = config_from_hf(dict(bench_models.GPT2_SMALL))
    t_cfg = config_from_hf(dict(QWEN05B))
    prob = tiny.TinyProblem(None, None, s_cfg, t_cfg, [], bucket=t_s)
    batch = _synthetic_batch(b, t_s, t_t, s_cfg.vocab_size, t_cfg.vocab_size, pair_rows=b // 2
                             or 1)
  s_cfg = s_cfg.replace(dtype=args.dtype)
  t_cfg = t_cfg.replace(dtype=args.dtype, param_dtype=args.teacher_dtype or t_cfg.param_dtype)
  prob.student_cfg, prob.teacher_cfg = s_cfg, t_cfg
  no_pairs = _strip_pairs(batch)
  log(f"[{setting}] student L={s_cfg.num_layers} D={s_cfg.hidden_size} V={s_cfg.vocab_size}; "
      f"teacher L={t_cfg.num_layers} D={t_cfg.hidden_size} V={t_cfg.vocab_size}; "
      f"B={b} Ts={t_s} Tt={t_t}; pair rows {int(batch['has_pair'].sum())}/{b}")
  student, teacher = prob.student(0), prob.teacher(1)
  fs, ft = _fwd_flops(s_cfg, t_s), _fwd_flops(t_cfg, t_t)
  # fwd FLOPs scale with the rows; the pair view's hidden-only forwards skip the LM head but
  # we count the full forward (a small over-count for the pair rows of big-vocab models)
  tokens = b * t_s
  rows = []
  opt_cfg = state_lib.OptimConfig(lr=1e-4, total_steps=1000)
  common = dict(steps=args.steps, warmup=args.warmup, tokens=tokens, device=device, peak=peak,
                log=log)
  for method in ("sft", "dskd_cma", "cot2align"):
    kd = KDConfig(method=method, base="dskd_cma", ot=OTConfig(num_iters=args.ot_iters))
    su = tiny.make_setup(prob, kd, opt_cfg, student=student, teacher=teacher)
    if method == "sft":
      rows.append(_time_row("sft", su, batch, pair_saving=True, flops=b * 3 * fs, **common))
    elif method == "dskd_cma":
      rows.append(_time_row("dskd_cma", su, batch, pair_saving=True, flops=b * (3 * fs + ft),
                            **common))
    else:
      full = b * (6 * fs + 2 * ft)
      rows.append(_time_row("cot2align/pairs", su, batch, pair_saving=True, flops=full,
                            **common))
      rows.append(_time_row("cot2align/no_pairs", su, no_pairs, pair_saving=True,
                            flops=b * (3 * fs + ft), **common))
      rows.append(_time_row("cot2align/no_pairs/nosave", su, no_pairs, pair_saving=False,
                            flops=full, **common))
    del su
  by = {r["name"]: r for r in rows}
  saving = by["cot2align/no_pairs/nosave"]["step_s"] / by["cot2align/no_pairs"]["step_s"]
  same = abs(by["cot2align/no_pairs/nosave"]["first_loss"] -
             by["cot2align/no_pairs"]["first_loss"])
  log(f"  pair saving on a batch without pairs: {saving:.2f}x faster "
      f"(loss difference saved vs not saved {same:.2e})")
  return {"setting": setting, "batch": b, "seq_student": t_s, "seq_teacher": t_t,
          "student": {"layers": s_cfg.num_layers, "d": s_cfg.hidden_size,
                      "vocab": s_cfg.vocab_size},
          "teacher": {"layers": t_cfg.num_layers, "d": t_cfg.hidden_size,
                      "vocab": t_cfg.vocab_size, "param_dtype": t_cfg.param_dtype},
          "pair_rows": int(batch["has_pair"].sum()), "rows": rows,
          "pair_saving_speedup": saving, "pair_saving_loss_diff": same}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = _parser().parse_args(argv)
  import flax
  import jax
  import jax.numpy as jnp
  if args.quick:
    args.setting, args.steps, args.warmup, args.ot_iters = "tiny", 2, 1, 10
  device = jax.devices()[0]
  n = args.matmul_size or (2048 if device.platform == "cpu" else 8192)
  peak = _matmul_peak(n, jnp.dtype(args.dtype))
  print(f"device {device.platform}/{device.device_kind}  jax {jax.__version__}  "
        f"matmul peak ({n}, {args.dtype}) {peak / 1e9:.1f} GFLOP/s")
  settings = ("tiny", "gpt2") if args.setting == "both" else (args.setting,)
  results = [run_setting(s, args, peak) for s in settings]
  peak_after = _matmul_peak(n, jnp.dtype(args.dtype))
  out = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
         "platform": device.platform, "device_kind": device.device_kind,
         "host": platform.node(), "jax": jax.__version__, "flax": flax.__version__,
         "dtype": args.dtype, "steps": args.steps, "ot_iters": args.ot_iters,
         "matmul_n": n, "matmul_peak_flops_per_s": peak,
         "matmul_peak_after_flops_per_s": peak_after, "settings": results}
  path = Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1))
  print(f"wrote {path}")
  return out


if __name__ == "__main__":
  main()
