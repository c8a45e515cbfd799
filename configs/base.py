"""Defaults of every experiment: the paper's shared settings (docs/method.md §5, "All").

    python -m cot2align_jax.train --config=configs/base.py:cot2align,base=uld --workdir=/tmp/run \
        --config.student.path=gpt2 --config.teacher.path=/ckpt/qwen1.5-1.8b-dolly-sft

arg: `<method>[,base=<base KD>]` (default cot2align over dskd_cma): the KD method
(losses.methods) and, for cot2align, its base KD. Every key comes from the section dataclasses
(cot2align_jax/training/config.py `defaults()`, docs/config.md); only the values that differ
from their dataclass defaults are written below. Set any key with --config.<section>.<key>=v;
an unknown key is an error. configs/tiny.py and configs/paper/, configs/real/ start here.
"""

from cot2align_jax.training.config import defaults, parse_arg


def get_config(arg=None):
  c = defaults()
  # The teacher is frozen: held in bfloat16 (compute and storage).
  c.teacher.dtype = "bfloat16"
  c.teacher.param_dtype = "bfloat16"

  c.data.batch_size = 32       # the paper's global batch
  c.data.seed = 10             # the paper's seed
  # Within windows of this many batches, plain records first: all-plain batches skip the
  # paired-view forwards.
  c.data.group_by_pair = 8

  c.optim.total_steps = 0      # derived: train.steps, or train.epochs × batches per epoch

  c.checkpoint.best_metric = "dev/loss"   # the dev loss is always computed (dataclass: none)
  c.checkpoint.best_mode = "min"          # lower loss is better

  set_method(c, arg, where="configs/base.py")
  return c


def set_method(c, arg, *, where="config arg"):
  """kd.method / kd.base from an arg `<method>[,base=<base KD>]` (missing: c's values)."""
  a = parse_arg(arg, {"method": c.kd.method, "base": c.kd.base}, where=where)
  c.kd.method = a.method
  c.kd.base = a.base
  return c
