"""OT block benchmark: our vmapped, jitted Sinkhorn terms vs the reference's per-example loop.

Run from the repository root:

  python bench/ot.py              # B=8, lengths <= 256, dS=768, dT=2048, + scaling 128 -> 2048
  python bench/ot.py --quick      # a smoke run (tiny shapes, 1 repetition)

What is timed (fwd+bwd of one training step's full OT block: 3 view pairs x 2 layers, the shared
teacher->student projector included; gradients w.r.t. the student states and the projector):

1. ours: `ot_view_terms` under `jax.jit(jax.value_and_grad(...))`, float32 (the ott-jax
   solver), for grad in {envelope, unrolled}; compile time reported separately;
2. the reference: a PyTorch loop over the batch and the 6 problems written the way the
   CoT2Align code runs it (boolean-mask gather of the response states, projector, attention
   cost, the 100-iteration multiplicative Sinkhorn loop u = a/(Kv+1e-9), v = b/(K^T u+1e-9),
   <P, C>, sum / B * 1/4, autograd through the loop), in bfloat16 (how the reference runs) and
   in float32;
3. scaling: our default (envelope gradients), for lengths 128 -> 2048 at a smaller batch.

Values: ours (float32) vs torch bf16 and vs torch float32 on identical inputs and projector.
Results go to bench/results/ot.json. On a shared CPU host the times are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "bench" / "results" / "ot.json"
VIEW_LAYERS = [(v, l) for v in ("main", "pair") for l in ("embed", "final")]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=256, help="padded length of every view")
  p.add_argument("--min-length", type=int, default=None,
                 help="smallest valid response length (default length // 4)")
  p.add_argument("--d-student", type=int, default=768)
  p.add_argument("--d-teacher", type=int, default=2048)
  p.add_argument("--iters", type=int, default=100)
  p.add_argument("--epsilon", type=float, default=10.0)
  p.add_argument("--reps", type=int, default=2, help="timed repetitions (median reported)")
  p.add_argument("--scaling-lengths", default="128,256,512,1024,2048")
  p.add_argument("--scaling-batch", type=int, default=2)
  p.add_argument("--skip-unrolled-ott", action="store_true",
                 help="skip unrolled gradients (the slower variant)")
  p.add_argument("--torch-threads", type=int, default=None, help="default: os.cpu_count()")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=Path, default=DEFAULT_OUT)
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.length, args.d_student, args.d_teacher = 2, 32, 64, 96
    args.reps, args.scaling_lengths, args.scaling_batch = 1, "32,64", 2
  if args.min_length is None:
    args.min_length = max(1, args.length // 4)
  if not 1 <= args.min_length <= args.length or args.batch < 1 or args.reps < 1:
    p.error("need 1 <= --min-length <= --length, --batch >= 1, --reps >= 1")
  try:
    args.scaling_lengths = [int(t) for t in args.scaling_lengths.split(",") if t]
  except ValueError:
    p.error("--scaling-lengths must be comma-separated integers")
  return args


# ---- inputs -------------------------------------------------------------------------------


def make_inputs(rng, batch, length, min_length, d_s, d_t):
  """Random hidden states, response masks (random valid prefix lengths) and projector weights.

  Returns numpy float32 arrays: student[(view, layer)] [B, L, dS], teacher[(view, layer)]
  [B, L, dT], masks[(view, side)] [B, L] int32, w [dT, dS], bias [dS].
  """
  import numpy as np
  student = {k: rng.normal(size=(batch, length, d_s)).astype(np.float32) for k in VIEW_LAYERS}
  teacher = {k: rng.normal(size=(batch, length, d_t)).astype(np.float32) for k in VIEW_LAYERS}
  masks = {}
  for view in ("main", "pair"):
    for side in ("student", "teacher"):
      lens = rng.integers(min_length, length + 1, size=batch)
      masks[(view, side)] = (np.arange(length)[None] < lens[:, None]).astype(np.int32)
  w = (rng.normal(size=(d_t, d_s)) / math.sqrt(d_t)).astype(np.float32)
  bias = (0.01 * rng.normal(size=(d_s,))).astype(np.float32)
  return student, teacher, masks, w, bias


# ---- ours ---------------------------------------------------------------------------------


def build_ours(student, teacher, masks, w, bias, *, grad, epsilon, iters):
  """A jitted fwd+bwd step of our OT block and its arguments."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from cot2align_jax.core import spec
  from cot2align_jax.losses import ot
  from cot2align_jax.losses.projectors import Projectors

  d_t, d_s = w.shape
  proj = Projectors.ot(d_t, d_s, rngs=nnx.Rngs(0))
  proj.linear.kernel[...] = jnp.asarray(w)
  proj.linear.bias[...] = jnp.asarray(bias)
  graphdef, params = nnx.split(proj)
  cfg = ot.OTConfig(cost="attention", epsilon=epsilon, num_iters=iters, grad=grad)
  batch = {spec.key(v, s, "loss_mask"): jnp.asarray(m) for (v, s), m in masks.items()}
  batch["has_pair"] = jnp.ones((next(iter(masks.values())).shape[0],), bool)
  s_states = {v: {l: jnp.asarray(student[(v, l)]) for l in ot.LAYERS} for v in ("main", "pair")}
  t_states = {v: {l: jnp.asarray(teacher[(v, l)]) for l in ot.LAYERS} for v in ("main", "pair")}

  def loss(s, p):
    return ot.ot_view_terms(s, t_states, batch, nnx.merge(graphdef, p), cfg)["ot/total"]

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return step, (s_states, params)


def time_jax(step, args, reps):
  """(compile_s, [step_s...], value) of a jitted function."""
  import jax
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  out = jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return compile_s, times, float(out[0])


# ---- the reference, in PyTorch ------------------------------------------------------------


def torch_reference_step(student, teacher, masks, w, bias, *, dtype, epsilon, iters):
  """One fwd+bwd of the OT block as the reference computes it: per-example Python loops.

  Returns (value, seconds). The 1/4 and the division by the full batch size as in docs/method.md §4.
  """
  import torch
  s_t = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in student.items()}
  t_t = {k: torch.tensor(v, dtype=dtype) for k, v in teacher.items()}
  m_t = {k: torch.tensor(v).bool() for k, v in masks.items()}
  proj = torch.nn.Linear(w.shape[0], w.shape[1]).to(dtype)
  with torch.no_grad():
    proj.weight.copy_(torch.tensor(w.T, dtype=dtype))
    proj.bias.copy_(torch.tensor(bias, dtype=dtype))
  alpha = 1.0 / epsilon
  terms = (("main", "main"), ("pair", "main"), ("main", "pair"))
  batch = next(iter(student.values())).shape[0]

  t0 = time.perf_counter()
  total = torch.zeros((), dtype=dtype)
  for layer in ("embed", "final"):
    for s_view, t_view in terms:
      term = torch.zeros((), dtype=dtype)
      for b in range(batch):
        xs = s_t[(s_view, layer)][b][m_t[(s_view, "student")][b]]
        yt = proj(t_t[(t_view, layer)][b][m_t[(t_view, "teacher")][b]])
        n, m = xs.shape[0], yt.shape[0]
        if n == 0 or m == 0:
          continue
        cost = 1.0 - torch.softmax(xs @ yt.T / math.sqrt(xs.shape[1]), dim=-1)
        a = torch.ones(n, 1, dtype=dtype) / n
        bb = torch.ones(m, 1, dtype=dtype) / m
        kernel = torch.exp(-alpha * cost)
        v = torch.ones(m, 1, dtype=dtype)
        for _ in range(iters):
          u = a / (kernel @ v + 1e-9)
          v = bb / (kernel.T @ u + 1e-9)
        plan = u * kernel * v.T
        term = term + torch.sum(plan * cost)
      total = total + 0.25 * term / batch
  total.backward()
  return float(total.detach().float()), time.perf_counter() - t0


# ---- main ---------------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  import jax
  import numpy as np
  import torch

  torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
  rng = np.random.default_rng(args.seed)
  inputs = make_inputs(rng, args.batch, args.length, args.min_length, args.d_student,
                       args.d_teacher)
  kw = dict(epsilon=args.epsilon, iters=args.iters)
  rows = []

  variants = ["envelope"] if args.skip_unrolled_ott else ["envelope", "unrolled"]
  for grad in variants:
    step, step_args = build_ours(*inputs, grad=grad, **kw)
    compile_s, times, value = time_jax(step, step_args, args.reps)
    rows.append(dict(name=f"ours ott/{grad} f32", compile_s=compile_s, times=times,
                     step_s=statistics.median(times), value=value))
    print(f"  done {rows[-1]['name']}", flush=True)
  for dtype_name, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
    times, value = [], None
    for _ in range(args.reps):
      value, sec = torch_reference_step(*inputs, dtype=dtype, **kw)
      times.append(sec)
    rows.append(dict(name=f"reference torch loop {dtype_name}", compile_s=0.0, times=times,
                     step_s=statistics.median(times), value=value))
    print(f"  done {rows[-1]['name']}", flush=True)

  ref_bf16 = rows[-2]
  ref_f32 = rows[-1]
  print(f"\nOT block fwd+bwd: B={args.batch}, L={args.length} (valid {args.min_length}.."
        f"{args.length}), dS={args.d_student}, dT={args.d_teacher}, {args.iters} iters, "
        f"eps={args.epsilon}, attention cost, device {jax.devices()[0].device_kind}")
  print(f"{'variant':<30}{'compile s':>10}{'step s':>10}{'vs ref bf16':>13}{'value':>14}"
        f"{'- ref bf16':>12}{'- ref f32':>12}")
  for r in rows:
    r["speedup_vs_ref_bf16"] = ref_bf16["step_s"] / r["step_s"]
    r["diff_vs_ref_bf16"] = r["value"] - ref_bf16["value"]
    r["diff_vs_ref_f32"] = r["value"] - ref_f32["value"]
    print(f"{r['name']:<30}{r['compile_s']:>10.2f}{r['step_s']:>10.3f}"
          f"{r['speedup_vs_ref_bf16']:>12.1f}x{r['value']:>14.7f}"
          f"{r['diff_vs_ref_bf16']:>12.2e}{r['diff_vs_ref_f32']:>12.2e}")

  scaling = []
  print(f"\nscaling (ours, B={args.scaling_batch}, valid lengths L/2..L, fwd+bwd, "
        f"median of {args.reps})")
  print(f"{'L':>6}{'ott/envelope s':>16}{'ms / problem':>14}")
  for length in args.scaling_lengths:
    sc_inputs = make_inputs(rng, args.scaling_batch, length, max(1, length // 2),
                            args.d_student, args.d_teacher)
    row = dict(length=length, batch=args.scaling_batch)
    step, step_args = build_ours(*sc_inputs, grad="envelope", **kw)
    compile_s, times, _ = time_jax(step, step_args, args.reps)
    row["ott_envelope_s"] = statistics.median(times)
    row["ott_envelope_compile_s"] = compile_s
    del step, step_args
    scaling.append(row)
    per_problem_ms = 1e3 * row["ott_envelope_s"] / (6 * args.scaling_batch)
    print(f"{length:>6}{row['ott_envelope_s']:>16.3f}{per_problem_ms:>14.1f}", flush=True)

  import flax
  import ott
  result = dict(
      timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(),
      platform=platform.platform(), device=jax.devices()[0].device_kind,
      jax=jax.__version__, flax=flax.__version__, ott=ott.__version__,
      torch=torch.__version__, torch_threads=torch.get_num_threads(),
      args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
      block=rows, scaling=scaling)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=1))
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
