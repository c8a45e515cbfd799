"""Shared settings of the five paper settings (docs/method.md §5); not a config file itself.

All settings: AdamW (wd 0.01, no decay on biases and norms), cosine decay to 1e-7, no warmup,
grad clip 1.0, max length 512, prompt 256, no BOS (data.special_tokens = "reference"), τ = 2.0,
projector lr 1e-3, seed 10, batch 32; the best checkpoint by dev ROUGE-L, evaluated once per
epoch. Dolly is the training set.

The teacher path must be the teacher *fine-tuned on the task's plain data* (the paper's
teachers are; the Hub names below are their base models), and `data.rationales` a JSONL file of
that teacher's CoT rationales ({"id", "rationale"}, see `python -m cot2align_jax.generate_cot`).
Set both on the command line:
    --config.teacher.path=/ckpt/teacher-dolly-sft --config.data.rationales=/data/dolly_cot.jsonl
"""

from cot2align_jax.training.config import ConfigError, load_sibling, parse_arg

LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                      "down_proj")
GPT2_LORA_TARGETS = ("c_attn", "c_proj", "c_fc")


def paper_config(this_file, *, teacher: str, student: str, base: str, kd_rate: float,
                 divergence: str, lr: float, epochs: int, lora: bool,
                 lora_targets=LLAMA_LORA_TARGETS, teacher_valid_vocab: int = 0):
  c = load_sibling(this_file, "../base.py").get_config()
  c.teacher.path = teacher
  c.teacher.dtype = "bfloat16"
  c.teacher.param_dtype = "bfloat16"
  c.teacher.valid_vocab_size = teacher_valid_vocab
  c.student.path = student
  c.student.dtype = "bfloat16"      # compute; parameters and optimizer state stay float32
  c.student.param_dtype = "float32"
  c.student.lora.enabled = lora
  c.student.lora.rank = 256
  c.student.lora.alpha = 8
  c.student.lora.dropout = 0.1
  c.student.lora.target_modules = tuple(lora_targets)

  c.data.dataset = "dolly"
  c.data.split = "train"
  c.data.dev_split = "dev"
  c.data.cot_rule = "nonempty_input"
  c.data.batch_size = 32
  c.data.seed = 10
  c.data.max_prompt = 256
  c.data.max_len = 512
  c.data.buckets = (128, 256, 512)
  c.data.special_tokens = "reference"   # no BOS, only the appended EOS: the paper's code

  c.kd.method = "cot2align"
  c.kd.base = base
  c.kd.kd_rate = kd_rate
  c.kd.temperature = 2.0
  c.kd.divergence = divergence
  c.kd.divergence_params.lam = 0.1   # the skew of skl / srkl

  c.optim.lr = lr
  c.optim.proj_lr = 1e-3
  c.optim.weight_decay = 0.01
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 0
  c.optim.end_lr = 1e-7
  c.optim.clip_norm = 1.0

  c.train.epochs = epochs
  c.train.steps = 0
  c.train.seed = 10
  c.train.eval_every = 0            # once per epoch
  c.train.dev_metric = "rouge_l"
  c.checkpoint.best_metric = "dev/rouge_l"
  c.checkpoint.best_mode = "max"
  return c


def pick_base(arg, default: str, rates: dict):
  """(base, kd_rate) for the config arg `[base=]<base KD>` (none: the setting's default)."""
  base = parse_arg(arg, {"base": default}, where="configs/paper arg").base
  if base not in rates:
    raise ConfigError(f"configs/paper arg: base KD {base!r} is not one of this setting's: "
                      f"{', '.join(rates)}")
  return base, rates[base]
