"""The embedded demo's training runs (python -m cot2align_jax.demo runs them all).

    python -m cot2align_jax.demo --workdir=runs/demo                 # the whole demo
    python -m cot2align_jax.train --config=configs/demo.py:teacher --workdir=runs/demo/teacher
    python -m cot2align_jax.train --config=configs/demo.py:cot2align,size=ci --workdir=/tmp/c

arg: `<role>[,size=<size>]` (or positional `<role>,<size>`). role = "teacher" (SFT of the
teacher from scratch on plain + gold CoT records) or a student method of losses.methods (sft,
uld, dskd_cma, cot2align, ...); size = "full" (default, the README's numbers), "large" (full
with a wider student, STUDENT_MODELS; the demo experiment's size), "small" or "ci" (the reduced
demo of the tests). Paths point into `DEMO_ROOT` (runs/demo); the demo command sets them to
its --workdir: data.source = <root>/data (data/arith.py writes it), the randomly initialised
models in <root>/models/{teacher,student}_init, the teacher's export in
<root>/teacher/export, its rationales in <root>/rationales.jsonl (read by the methods that
train on CoT records).

Every student gets the same budget: same steps, batch, learning rate, seed and initial weights
(one saved random initialisation); only the KD method differs. The baselines train on the plain
records (no rationales, as in the paper); cot2align adds the teacher's CoT records and the OT
terms.
"""

from cot2align_jax.losses.methods import METHODS, get_method
from cot2align_jax.training.config import ConfigError, load_sibling, parse_arg

DEMO_ROOT = "runs/demo"
ROLES_EXTRA = ("teacher",)

# Model shapes (the demo writes them as config.json of the random initialisations) and budgets.
TEACHER_MODEL = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                     intermediate_size=384)
STUDENT_MODEL = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                     intermediate_size=192)
# Sizes whose student differs from STUDENT_MODEL (the same for every method of that size).
# "large": full's data, teacher and budget with a wider student (d 128, 0.42M parameters, half
# the teacher), big enough to learn the worked steps it is shown (docs/experiments/demo.md).
STUDENT_MODELS = {"large": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                intermediate_size=384)}
SIZES = {
    # train problems, dev problems, test problems, teacher steps, student steps, batch
    "full": dict(train=2000, dev=64, test=200, teacher_steps=600, student_steps=400, batch=32),
    "small": dict(train=1000, dev=32, test=100, teacher_steps=300, student_steps=200, batch=32),
    "large": dict(train=2000, dev=64, test=200, teacher_steps=600, student_steps=400, batch=32),
    "ci": dict(train=128, dev=16, test=16, teacher_steps=24, student_steps=8, batch=8),
}

ARG = {"role": "cot2align", "size": "full"}   # configs/demo.py:<role>[,size=<size>]


def get_config(arg=None):
  a = parse_arg(arg, ARG, where="configs/demo.py")
  role, size = a.role, a.size
  if size not in SIZES:
    raise ConfigError(f"configs/demo.py: unknown size {size!r}; known: {', '.join(SIZES)}")
  if role not in METHODS and role not in ROLES_EXTRA:
    raise ConfigError(f"configs/demo.py: unknown role {role!r}; known: "
                      f"{', '.join(ROLES_EXTRA + tuple(METHODS))}")
  s = SIZES[size]
  root = DEMO_ROOT
  base = load_sibling(__file__, "base.py")
  c = base.get_config()
  for side in ("student", "teacher"):
    c[side].dtype = "float32"
    c[side].param_dtype = "float32"
    c[side].sharding = "replicated"
  c.student.path = f"{root}/models/student_init"
  c.teacher.path = f"{root}/teacher/export"

  c.data.dataset = "arith"
  c.data.source = f"{root}/data"
  c.data.split = "train"
  c.data.max_examples = s["train"]
  c.data.dev_split = "dev"
  c.data.dev_max_examples = s["dev"]
  c.data.cot_rule = "none"
  c.data.batch_size = s["batch"]
  c.data.seed = 0
  c.data.buckets = (32, 64)
  c.data.max_prompt = 48
  c.data.max_len = 65
  c.data.drop_remainder = True
  c.data.group_by_pair = 0

  c.optim.lr = 3e-3
  c.optim.proj_lr = 3e-3
  c.optim.warmup_steps = 20 if size != "ci" else 0
  c.optim.weight_decay = 0.0
  c.optim.end_lr = 1e-5

  c.mesh.data = 1
  c.checkpoint.save_every = 100000   # a final checkpoint only
  c.checkpoint.keep = 1
  c.checkpoint.best_metric = ""
  c.checkpoint.async_save = False

  c.train.steps = s["student_steps"]
  c.train.epochs = 0
  c.train.seed = 0
  c.train.log_every = 10 if size != "ci" else 2
  c.train.eval_every = -1
  c.train.export = True

  if role == "teacher":
    c.student.path = f"{root}/models/teacher_init"
    c.teacher.path = ""
    c.kd.method = "sft"
    c.data.rationales = f"{root}/data/arith/gold_rationales.jsonl"
    c.data.cot_rule = "all"
    c.train.steps = s["teacher_steps"]
    return c

  base.set_method(c, role, where="configs/demo.py")
  c.kd.ot.num_iters = 20
  if get_method(role).uses_rationales:
    c.data.rationales = f"{root}/rationales.jsonl"
    c.data.cot_rule = "all"
  return c
