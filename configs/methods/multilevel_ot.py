"""MultiLevelOT: token-level L1 + sorted CE on top-50 std-normalised logits, and a
sequence-level Sinkhorn term (METHOD.md §8).

    python -m cot2align_jax.train --config=configs/methods/multilevel_ot.py --workdir=DIR \
        --config.student.path=... --config.teacher.path=...
    python -m cot2align_jax.train --config=configs/methods/multilevel_ot.py:tiny --workdir=DIR   # tiny problem

arg: "" = configs/base.py defaults (set the model paths), "tiny" = configs/tiny.py's problem.
"""

from cot2align_jax.training.config import load_sibling


def apply(c):
  c.kd.method = "multilevel_ot"
  return c


def get_config(arg=None):
  start = load_sibling(__file__, "../tiny.py" if arg == "tiny" else "../base.py")
  return apply(start.get_config())
