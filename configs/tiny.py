"""The tiny cross-tokenizer problem: tests and the demo.

    python -m cot2align_jax.train --config=configs/tiny.py:cot2align --workdir=/tmp/tiny
    python -m cot2align_jax.train --config=configs/tiny.py:cot2align,base=uld --workdir=/tmp/uld

arg: `<method>[,base=<base KD>]` as configs/base.py, default sft.
Two tokenizers trained on the fly (byte-level BPE student, Metaspace BPE teacher), a 2-layer
Qwen2-like student (d 32) and a 2-layer Llama-like teacher (d 48), both randomly initialised;
arithmetic word problems with CoT records for about half of them. Runs in seconds on a CPU.
"""

from cot2align_jax.training.config import load_sibling


def get_config(arg=None):
  base = load_sibling(__file__, "base.py")
  c = base.get_config()

  c.student.tiny = "d=32,layers=2"
  c.student.dtype = "float32"
  c.student.param_dtype = "float32"
  c.teacher.tiny = "d=48,layers=2"
  c.teacher.dtype = "float32"
  c.teacher.param_dtype = "float32"

  c.data.dataset = "tiny"
  c.data.max_examples = 32       # train problems
  c.data.dev_split = "dev"
  c.data.dev_max_examples = 8    # dev problems (plain records)
  c.data.batch_size = 4
  c.data.seed = 0
  c.data.buckets = (64,)
  c.data.max_prompt = 32
  c.data.max_len = 65
  c.data.drop_remainder = True

  c.kd.ot.num_iters = 20

  c.optim.lr = 1e-3
  c.mesh.data = 1

  c.checkpoint.save_every = 4
  c.checkpoint.keep = 2
  c.checkpoint.best_metric = "dev/loss"
  c.checkpoint.best_mode = "min"

  c.train.steps = 8
  c.train.epochs = 0
  c.train.seed = 0
  c.train.log_every = 1
  c.train.eval_every = 4
  c.train.eval_batches = 2

  c.kd.method = "sft"           # the default of the arg
  return base.set_method(c, arg, where="configs/tiny.py")
