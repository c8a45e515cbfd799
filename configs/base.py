"""Defaults of every experiment: the paper's shared settings (METHOD.md §5, "All").

    python -m cot2align_jax.train --config=configs/base.py --workdir=/tmp/run \
        --config.student.path=gpt2 --config.teacher.path=/ckpt/qwen1.5-1.8b-dolly-sft

Other config files start from `get_config()` here and change what differs (configs/methods/,
configs/paper/, configs/tiny.py). Every key below can be set with --config.<section>.<key>=v;
an unknown key is an error. `arg` (configs/base.py:<method>) picks the KD method.

Sections
  student / teacher  path: HF checkpoint dir, Hub name (online only) or gguf:<name>;
                     tiny: a name from cot2align_jax.training.tiny instead of a path (tests, demo);
                     dtype / param_dtype: compute / storage dtype; init: "pretrained" | "random";
                     sharding: "rules" (logical-axis rules over the mesh) or "replicated";
                     valid_vocab_size: logits past it are -inf (0 = all rows, -1 = the tokenizer's
                     length when the embedding has padding rows, as Qwen's);
                     lora: LoRA of the student (rank, alpha, HF target module names; dropout is not
                     applied); base weights frozen, A·B merged into them on export.
  data               dataset/split (cot2align_jax.data.sources registry), source (data dir, ""
                     = shared/data), rationales (JSONL {"id", "rationale"}, "" = no CoT records),
                     cot_rule, dev_split (dev evaluation), then the PipelineConfig fields
                     (batch_size is the *global* batch; alignment "auto" = what the method needs).
  kd                 KDConfig: method, base (of cot2align), kd_rate λ, temperature τ, divergence,
                     divergence_params (all parameters; those the divergence takes are used), ot.
  optim              OptimConfig (total_steps 0 = train.steps or epochs × batches per epoch).
  mesh               data × fsdp × tensor devices (data -1 = all devices left).
  checkpoint         CheckpointConfig: save_every steps, keep latest K, best_metric ("" = none).
  train              steps (0 = use epochs), epochs, seed, log_every, eval_every (0 = once per
                     epoch, -1 = never), eval_batches (0 = the whole dev split), dev_metric
                     ("" = loss only; "rouge_l" = generation ROUGE-L, needs cot2align_jax.evaluation),
                     export (save_pretrained of the student to workdir/export), export_dtype.
"""

import ml_collections

DEFAULT_METHOD = "cot2align"


def model_section(path: str = "", dtype: str = "float32", param_dtype: str = "float32"):
  return ml_collections.ConfigDict(dict(
      path=path,
      tiny="",
      dtype=dtype,
      param_dtype=param_dtype,
      init="pretrained",
      remat=False,
      valid_vocab_size=0,
      # "rules": sharded by the logical-axis rules over the mesh (FSDP/tensor) like the student;
      # "replicated": a full copy on every device (small teachers; no gathers in the step).
      sharding="rules",
      lora=ml_collections.ConfigDict(dict(
          enabled=False,
          rank=256,
          alpha=8,
          dropout=0.1,
          # HF module names of the Llama family; GPT-2: c_attn, c_proj, c_fc.
          target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"),
      )),
  ))


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.student = model_section()
  c.teacher = model_section(dtype="bfloat16", param_dtype="bfloat16")

  c.data = ml_collections.ConfigDict(dict(
      dataset="dolly",
      split="train",
      source="",
      max_examples=0,
      rationales="",
      cot_rule="nonempty_input",
      dev_split="dev",
      dev_max_examples=0,
      # PipelineConfig fields (num_epochs and shards are set by the loop).
      batch_size=32,
      seed=10,
      shuffle=True,
      buckets=(64, 128, 256, 512),
      max_prompt=256,
      max_len=512,
      drop_remainder=False,
      alignment="auto",
      even_shards=True,
      read_threads=0,
      prefetch_buffer=0,
      worker_count=0,
      worker_buffer_size=2,
      # Within windows of this many batches, plain records first: all-plain batches skip the
      # paired-view forwards (0 = off).
      group_by_pair=8,
  ))

  c.kd = ml_collections.ConfigDict(dict(
      method=DEFAULT_METHOD,
      base="dskd_cma",
      kd_rate=0.5,
      temperature=2.0,
      divergence="fkl",
      divergence_params=ml_collections.ConfigDict(dict(lam=0.1, mu=0.5, beta=0.5)),
      ot=ml_collections.ConfigDict(dict(
          cost="attention",
          epsilon=10.0,
          num_iters=100,
          grad="envelope",
          solver="ott",
          lse_mode=True,
          ot_term_scale=0.25,
          terms=("same", "cross_a", "cross_b"),
          layers=("embed", "final"),
      )),
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=5e-4,
      proj_lr=1e-3,
      weight_decay=0.01,
      schedule="cosine",
      warmup_steps=0,
      total_steps=0,
      end_lr=1e-7,
      clip_norm=1.0,
      accumulate=1,
  ))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.checkpoint = ml_collections.ConfigDict(dict(
      save_every=500,
      keep=3,
      best_metric="dev/loss",
      best_mode="min",
      async_save=True,
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=0,
      epochs=20,
      seed=10,
      log_every=10,
      eval_every=0,
      eval_batches=0,
      dev_metric="",
      export=True,
      export_dtype="",
  ))

  if arg:
    set_method(c, arg)
  return c


def set_method(c, method: str, base: str = ""):
  """kd.method = method (and kd.base for cot2align); "cot2align[uld]" / "cot2align:uld" also work."""
  for sep in ("[", ":", "+"):
    if sep in method:
      method, base = method.split(sep, 1)
      base = base.rstrip("]")
  c.kd.method = method
  if base:
    c.kd.base = base
  return c
