"""ULD (cross-tokenizer): sorted-probability L1 between the k-th response tokens, + CE.

    python -m cot2align_jax.train --config=configs/methods/uld.py --workdir=DIR \
        --config.student.path=... --config.teacher.path=...
    python -m cot2align_jax.train --config=configs/methods/uld.py:tiny --workdir=DIR   # tiny problem

arg: "" = configs/base.py defaults (set the model paths), "tiny" = configs/tiny.py's problem.
"""

from cot2align_jax.training.config import load_sibling


def apply(c):
  c.kd.method = "uld"
  return c


def get_config(arg=None):
  start = load_sibling(__file__, "../tiny.py" if arg == "tiny" else "../base.py")
  return apply(start.get_config())
