"""CoT2Align: base KD (DSKD-CMA by default) + OT between hidden-state sequences at layers
0 and L, within the view and across the plain/CoT views (METHOD.md §4). Change the base with
--config.kd.base=uld|mined|kd|dskd|dskd_eta|multilevel_ot.

    python -m cot2align_jax.train --config=configs/methods/cot2align.py --workdir=DIR \
        --config.student.path=... --config.teacher.path=...
    python -m cot2align_jax.train --config=configs/methods/cot2align.py:tiny --workdir=DIR   # tiny problem

arg: "" = configs/base.py defaults (set the model paths), "tiny" = configs/tiny.py's problem.
"""

from cot2align_jax.training.config import load_sibling


def apply(c):
  c.kd.method = "cot2align"
  c.kd.base = "dskd_cma"
  return c


def get_config(arg=None):
  start = load_sibling(__file__, "../tiny.py" if arg == "tiny" else "../base.py")
  return apply(start.get_config())
