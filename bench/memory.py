"""Train-step memory of a real cross-tokenizer pair with and without vocabulary chunking
(kd.vocab_chunk), from the compiled program (abstract shapes, no weights), and optionally the
step time on this machine.

Run from the repository root (the GGUF models installed: configs/real/README.md):

  python bench/memory.py                      # Gemma-3-270M -> SmolLM2-135M, batch 8 x 512
  python bench/memory.py --time               # + step times at 4 x 256 (~1 min/step on a CPU)
  python bench/memory.py --time --no-compiled  # the step times only
  python bench/memory.py --config configs/tiny.py:cot2align --batch 4 --seq 64   # a quick look

Programs compiled (one device, each from the models' config.json via the memory planner,
cot2align_jax/plan.py):
  full         the train step as the loop runs it, kd.vocab_chunk = 0 (full [B, L, V] logits)
  chunked      the same step with kd.vocab_chunk = --chunk
  models_only  the same forwards (student main and pair views with gradients, teacher main and
               pair views frozen) and the optimizer update, with the objective replaced by the
               mean of the final hidden states: no LM head, no loss
"loss part" of a program = its temporaries − models_only's: what the objective (logits,
softmaxes, divergences, DSKD projections, OT) adds. The JSON reports every program's XLA
memory analysis, the planner's per-device peak, and loss_part_ratio = full's loss part /
chunked's (the target is >= 4).

--time: each variant (full, chunked, and cached = chunked with the teacher's states read from a
teacher cache, teacher.cache, instead of its forward) runs --steps steps after one warm-up on
random weights (random cached states) at --time-batch x --time-seq, in float32 (the `cpu` run's
dtypes: bf16 is not faster on a CPU); median seconds per step, and each variant's speed-up over
`full`. JSON to --out (default bench/results/memory.json).
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
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "bench" / "results" / "memory.json"
DEFAULT_CONFIG = "configs/real/gemma3_to_smollm2.py:full"
TIME_CONFIG = "configs/real/gemma3_to_smollm2.py:cpu"


def _parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default=DEFAULT_CONFIG, help="config file[:arg] (%(default)s)")
  p.add_argument("--batch", type=int, default=8, help="rows of the compiled step (8)")
  p.add_argument("--seq", type=int, default=512, help="positions per view (512)")
  p.add_argument("--chunk", type=int, default=8192, help="kd.vocab_chunk of 'chunked' (8192)")
  p.add_argument("--time", action="store_true", help="also time the steps on this machine")
  p.add_argument("--no-compiled", dest="compiled", action="store_false",
                 help="skip the compiled-memory programs (with --time: the timings only)")
  p.add_argument("--time-config", default=TIME_CONFIG, help="config of the timed steps")
  p.add_argument("--time-batch", type=int, default=4)
  p.add_argument("--time-seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=2, help="timed steps per variant (2)")
  p.add_argument("--out", default=str(DEFAULT_OUT))
  return p


def _config(spec: str, batch: int, seq: int, chunk: int | None, cache: bool = False):
  from cot2align_jax.training import config as C
  path, arg = C.split_config_arg(spec)
  cfg = C.load_config(path, arg)
  C.set_key(cfg, "data.batch_size", batch)
  C.set_key(cfg, "data.buckets", (seq,))
  C.set_key(cfg, "data.max_len", seq + 1)
  C.set_key(cfg, "data.max_prompt", min(cfg.data.max_prompt, seq // 2))
  C.set_key(cfg, "mesh.data", 1)
  if chunk is not None:
    C.set_key(cfg, "kd.vocab_chunk", chunk)
  if cache:
    C.set_key(cfg, "teacher.cache", "planned")  # the step reads the states from the batch
  return cfg


def models_only_step(problem):
  """The jitted step of the `models_only` program (module doc) for a plan.Abstract."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from cot2align_jax.core import spec
  from cot2align_jax.training import mesh as mesh_lib
  from cot2align_jax.training import steps as steps_lib
  s_gd, t_gd, _ = problem.graphdefs
  need_s_pair, need_t_pair = steps_lib.pair_views_needed(problem.method, problem.kd_cfg)
  states = steps_lib.hidden_states_needed(problem.method, problem.kd_cfg)

  def ids(batch, view, side):
    return (batch[spec.key(view, side, "input_ids")],
            batch[spec.key(view, side, "attention_mask")])

  def loss_fn(trainable, tparams, batch):
    student = nnx.merge(s_gd, trainable["student"])
    total = jnp.zeros((), jnp.float32)
    for view in ("main", "pair") if need_s_pair else ("main",):
      h = student(*ids(batch, view, "student"), hidden_states=states, logits="none")
      total += h.hidden_states[-1].astype(jnp.float32).mean()
    if t_gd is not None:
      teacher = nnx.merge(t_gd, jax.lax.stop_gradient(tparams))
      for view in ("main", "pair") if need_t_pair else ("main",):
        h = teacher(*ids(batch, view, "teacher"), hidden_states=states, logits="none")
        total += jax.lax.stop_gradient(h.hidden_states[-1]).astype(jnp.float32).mean()
    return total

  def step(state, tparams, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.trainable, tparams, batch)
    updates, opt_state = problem.optimizer.update(grads, state.opt_state, state.trainable)
    new = optax.apply_updates(state.trainable, updates)
    return state.replace(params=new["student"], proj=new["proj"], opt_state=opt_state), loss

  rep = mesh_lib.replicated(problem.mesh)
  return jax.jit(step, in_shardings=(problem.state_shardings, problem.teacher_shardings,
                                     problem.batch_shardings),
                 out_shardings=(problem.state_shardings, rep), donate_argnums=(0,))


def compiled_rows(args, log=print) -> dict[str, Any]:
  import jax
  from cot2align_jax import plan as P
  devices = jax.devices()[:1]
  rows: dict[str, Any] = {}
  chunk_ok = P.has_vocab_chunk()
  variants = [("full", 0 if chunk_ok else None)]
  if chunk_ok:
    variants.append(("chunked", args.chunk))
  else:
    rows["chunked"] = {"available": False, "why": "this version has no kd.vocab_chunk"}
  base = None
  for layers in (None, 1):
    tag = "" if layers is None else "/1_layer"
    for name, chunk in variants:
      cfg = _config(args.config, args.batch, args.seq, chunk)
      problem = P.build_abstract(cfg, devices, num_layers=layers)
      t0 = time.perf_counter()
      mem = P.step_memory(problem)
      compile_s = time.perf_counter() - t0
      rows[name + tag] = {"vocab_chunk": chunk, "num_layers": layers, "compile_s": compile_s,
                          "xla": mem, "per_device": P.breakdown(problem), "peak": mem["peak"]}
      log(f"  {name + tag:20s} temp {P.fmt_bytes(mem['temp']):>10s}  "
          f"peak {P.fmt_bytes(mem['peak']):>10s}  (compiled in {compile_s:.0f} s)")
      if layers is None:
        base = base or problem
    if layers is not None:
      one = P.build_abstract(_config(args.config, args.batch, args.seq, variants[0][1]), devices,
                             num_layers=layers)
      t0 = time.perf_counter()
      compiled = models_only_step(one).lower(one.state, one.teacher_params, one.batch).compile(
          compiler_options=P.PLAN_COMPILER_OPTIONS)
      mem = P.compiled_memory(compiled)
      rows["models_only" + tag] = {"num_layers": layers, "compile_s": time.perf_counter() - t0,
                                   "xla": mem}
      log(f"  {'models_only' + tag:20s} temp {P.fmt_bytes(mem['temp']):>10s}")
      for name, _ in variants:
        rows[name + tag]["loss_part_temp"] = rows[name + tag]["xla"]["temp"] - mem["temp"]
  setting = {"method": base.method.name, "batch": args.batch, "seq": args.seq,
             "student": P._model_summary(base.student_cfg, base.config.student.path or "tiny"),
             "teacher": (P._model_summary(base.teacher_cfg, base.config.teacher.path or "tiny")
                         if base.teacher_cfg is not None else None)}
  out = {"setting": setting, "programs": rows}
  if "chunked" in rows and "xla" in rows["chunked"]:
    out["temp_ratio"] = rows["full"]["xla"]["temp"] / max(rows["chunked"]["xla"]["temp"], 1)
    full = rows["full/1_layer"]["loss_part_temp"]
    chunked = rows["chunked/1_layer"]["loss_part_temp"]
    out["loss_part_ratio"] = full / max(chunked, 1)
    log(f"  whole step: temporaries {out['temp_ratio']:.1f}x less with kd.vocab_chunk="
        f"{args.chunk}; loss part (1-layer models): {P.fmt_bytes(full)} -> "
        f"{P.fmt_bytes(chunked)} ({out['loss_part_ratio']:.1f}x less)")
  return out


def _random_arrays(problem):
  """Random-init state, teacher params and a synthetic batch placed like the loop's."""
  import jax
  import numpy as np
  from flax import nnx
  from cot2align_jax.core import spec
  from cot2align_jax.losses.methods import build_projectors
  from cot2align_jax.models import hf
  from cot2align_jax.training import mesh as mesh_lib
  from cot2align_jax.training import state as state_lib
  s_cfg, t_cfg = problem.student_cfg, problem.teacher_cfg
  proj = build_projectors(problem.method, s_cfg.hidden_size, t_cfg.hidden_size,
                          rngs=nnx.Rngs(0), kd=problem.kd_cfg)
  state, _ = state_lib.init_state(hf.create_model(s_cfg, 0), proj, problem.opt_cfg, 0,
                                  optimizer=problem.optimizer)
  state = jax.device_put(state, problem.state_shardings)
  _, tparams = state_lib.split_params(hf.create_model(t_cfg, 1))
  tparams = jax.device_put(tparams, problem.teacher_shardings)
  rng = np.random.default_rng(0)
  b, length = problem.batch["has_pair"].shape[0], problem.seq_len
  batch = {}
  for view in spec.VIEWS:
    for side, cfg in (("student", s_cfg), ("teacher", t_cfg)):
      ids = rng.integers(3, cfg.vocab_size, size=(b, length)).astype(np.int32)
      loss = np.zeros((b, length), np.int32)
      loss[:, length // 2:] = 1
      batch[spec.key(view, side, "input_ids")] = ids
      batch[spec.key(view, side, "labels")] = np.roll(ids, -1, axis=1) * loss
      batch[spec.key(view, side, "loss_mask")] = loss
      batch[spec.key(view, side, "attention_mask")] = np.ones((b, length), np.int32)
  for f in spec.ALIGN_FIELDS:
    batch[spec.align_key(f)] = np.zeros((b, length), np.int32)
  batch["has_pair"] = np.arange(b) % 2 == 0
  batch["example_id"] = np.arange(b, dtype=np.int32)
  for k, x in problem.batch.items():
    if k not in batch:  # teacher-cache states
      batch[k] = rng.standard_normal(x.shape).astype(x.dtype)
  return state, tparams, mesh_lib.shard_batch(batch, problem.mesh)


def timed_rows(args, log=print) -> dict[str, Any]:
  import jax
  from cot2align_jax import plan as P
  devices = jax.devices()[:1]
  out: dict[str, Any] = {"config": args.time_config, "batch": args.time_batch,
                         "seq": args.time_seq, "steps": args.steps}
  variants = [("full", 0, False), ("chunked", args.chunk, False),
              ("cached", args.chunk, True)]
  for name, chunk, cache in variants:
    cfg = _config(args.time_config, args.time_batch, args.time_seq, chunk, cache)
    problem = P.build_abstract(cfg, devices)
    t0 = time.perf_counter()
    compiled = P.train_step(problem).lower(problem.state, problem.teacher_params,
                                           problem.batch).compile()
    compile_s = time.perf_counter() - t0
    state, tparams, batch = _random_arrays(problem)
    times, loss = [], None
    for i in range(1 + args.steps):
      t0 = time.perf_counter()
      state, m = compiled(state, tparams, batch)
      jax.block_until_ready(m)
      if i:
        times.append(time.perf_counter() - t0)
      loss = float(m["loss"][0] / m["loss"][1])
    out[name] = {"vocab_chunk": chunk, "teacher_cache": cache, "compile_s": compile_s,
                 "step_s": statistics.median(times), "times": times, "loss": loss}
    out[name]["speedup_vs_full"] = out["full"]["step_s"] / out[name]["step_s"]
    row = out[name]
    log(f"  {name:8s} {row['step_s']:8.2f} s/step  x{row['speedup_vs_full']:.2f} vs full  "
        f"(compile {compile_s:.0f} s, loss {loss:.4f})")
    del state, tparams, batch, compiled
  return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = _parser().parse_args(argv)
  import flax
  import jax
  from cot2align_jax.core import cli
  from cot2align_jax.models.config import ModelError
  from cot2align_jax.training.config import ConfigError
  errors = (ConfigError, ModelError, FileNotFoundError)
  device = jax.devices()[0]
  print(f"[memory] {args.config}: batch {args.batch} x {args.seq}, chunk {args.chunk}")
  result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "platform": device.platform, "device_kind": device.device_kind,
            "host": platform.node(), "jax": jax.__version__, "flax": flax.__version__,
            "config": args.config, "chunk": args.chunk}
  if args.compiled:
    result["compiled"] = cli.guarded(lambda: compiled_rows(args), errors)
  if args.time:
    print(f"[time] {args.time_config}: batch {args.time_batch} x {args.time_seq}")
    result["timed"] = cli.guarded(lambda: timed_rows(args), errors)
  path = Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1))
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main()
