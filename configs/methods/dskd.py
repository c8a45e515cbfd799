"""DSKD (v1, no cross-model attention): t2s / s2t projectors on position-aligned states.

    python -m cot2align_jax.train --config=configs/methods/dskd.py --workdir=DIR \
        --config.student.path=... --config.teacher.path=...
    python -m cot2align_jax.train --config=configs/methods/dskd.py:tiny --workdir=DIR   # tiny problem

arg: "" = configs/base.py defaults (set the model paths), "tiny" = configs/tiny.py's problem.
"""

from cot2align_jax.training.config import load_sibling


def apply(c):
  c.kd.method = "dskd"
  return c


def get_config(arg=None):
  start = load_sibling(__file__, "../tiny.py" if arg == "tiny" else "../base.py")
  return apply(start.get_config())
