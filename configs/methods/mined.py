"""MinED (cross-tokenizer): teacher logits gathered into the student vocabulary through the
minimum-edit-distance vocabulary map on DTW-aligned 1:1 tokens, forward KL, + CE.

    python -m cot2align_jax.train --config=configs/methods/mined.py --workdir=DIR \
        --config.student.path=... --config.teacher.path=...
    python -m cot2align_jax.train --config=configs/methods/mined.py:tiny --workdir=DIR   # tiny problem

arg: "" = configs/base.py defaults (set the model paths), "tiny" = configs/tiny.py's problem.
"""

from cot2align_jax.training.config import load_sibling


def apply(c):
  c.kd.method = "mined"
  c.kd.divergence = "fkl"
  return c


def get_config(arg=None):
  start = load_sibling(__file__, "../tiny.py" if arg == "tiny" else "../base.py")
  return apply(start.get_config())
