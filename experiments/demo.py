"""The demo experiment: every method on the embedded demo's task, multi-seed, both budgets.

    python -m cot2align_jax.experiment --spec=experiments/demo.py:size=large \
        --workdir=runs/exp_large                       # docs/experiments/demo.md's run
    python -m cot2align_jax.experiment --spec=experiments/demo.py:size=ci,seeds=0-1 \
        --workdir=/tmp/exp_ci                                     # minutes, the CI check
    python -m cot2align_jax.experiment --spec=experiments/demo.py:set=ablations,size=small \
        --workdir=runs/exp_ablations

arg (configs' grammar): set ("main" | "ablations"), size ("full" | "large" | "small" | "ci",
the sizes of configs/demo.py; "large" is full with a wider student), seeds ("0-1-2-3-4" main,
"0-1-2" ablations), epochs (0 = the size's default: 6 for full/large/small ≈ the demo's
400/200 student steps on the plain records, 1 for ci).

Prepare (once): `python -m cot2align_jax.demo --workdir=<exp>/prepare --size=S
--stop_after=rationales` writes the data, the two tokenizers, the random initialisations, the
SFT teacher and its rationales; every student reads them from there (the teacher and the data
are fixed; the seed varies what a user varies: the student's random initialisation — student.init
= random from train.seed, shared by all methods at that seed —, the data order (data.seed) and
the step's randomness). Students are evaluated on the dev and test splits, greedy, exact match
of the final number, on the plain prompt (the paper's protocol) and the CoT prompt (does the
student reason step by step?). Choose variants on `arith/dev`; `arith/test` is for the claim.

Main runs: sft, uld, mined, dskd_cma, dskd_eta, multilevel_ot, cot2align and cot2align_plus
over dskd_cma (the baseline of the paired differences is dskd_cma, their base; the claim
compares each variant with the best other student, chosen on dev). Ablations (cot2align over
dskd_cma, one change each; the baseline of their differences is cot2align): CoT records
without OT (dskd_cma on plain + CoT records), OT without CoT records, each OT term alone, each
layer alone, ε ∈ {10, 1, 0.1}, cosine cost, unrolled gradient; cot2align_plus, and it with one
of its OT changes undone each (attention cost, absolute ε, not debiased, balanced cross terms,
fixed layer weights) or a middle layer added.
"""

from cot2align_jax.losses.methods import get_method
from cot2align_jax.training.config import ConfigError, parse_arg

ARG = {"set": "main", "size": "full", "seeds": "", "epochs": 0}
MAIN = ("sft", "uld", "mined", "dskd_cma", "dskd_eta", "multilevel_ot", "cot2align",
        "cot2align_plus")
SIZE_EPOCHS = {"full": 6, "large": 6, "small": 6, "ci": 1}
# seconds per training step on 2 CPU cores at size full (from the demo's timings); measured
# times of finished runs replace them in --dry_run.
COST = {"sft": 0.05, "uld": 0.08, "mined": 0.1, "dskd_cma": 0.12, "dskd_eta": 0.12,
        "multilevel_ot": 0.15, "cot2align": 0.35, "cot2align_plus": 0.4}


def _student(method: str, size: str, **overrides):
  return dict(config=f"configs/demo.py:{method},size={size}", overrides=overrides)


COT = {"data.rationales": "{prepare}/rationales.jsonl", "data.cot_rule": "all"}


def _ablations(size: str) -> dict:
  c2a = lambda **o: _student("cot2align", size, **{"kd.base": "dskd_cma", **COT, **o})  # noqa: E731

  def plus(**o):
    keys = {(k if k.startswith("kd.") else f"kd.cot2align_plus.{k}"): v for k, v in o.items()}
    return _student("cot2align_plus", size, **{"kd.base": "dskd_cma", **COT, **keys})

  return {
      "dskd_cma": _student("dskd_cma", size),
      "cot2align": c2a(),
      "cot_no_ot": _student("dskd_cma", size, **COT),
      "ot_no_cot": _student("cot2align", size, **{"kd.base": "dskd_cma", "data.rationales": "",
                                                  "data.cot_rule": "none"}),
      "term_same": c2a(**{"kd.ot.terms": ("same",)}),
      "term_cross_a": c2a(**{"kd.ot.terms": ("cross_a",)}),
      "term_cross_b": c2a(**{"kd.ot.terms": ("cross_b",)}),
      "layer_embed": c2a(**{"kd.ot.layers": ("embed",)}),
      "layer_final": c2a(**{"kd.ot.layers": ("final",)}),
      "eps_1": c2a(**{"kd.ot.epsilon": 1.0}),
      "eps_0.1": c2a(**{"kd.ot.epsilon": 0.1}),
      "cost_cosine": c2a(**{"kd.ot.cost": "cosine"}),
      "grad_unrolled": c2a(**{"kd.ot.grad": "unrolled"}),
      # cot2align_plus, and it with one of its OT changes undone (kd.cot2align_plus.*)
      "plus": plus(),
      "plus_attention_cost": plus(cost="attention"),
      "plus_absolute_eps": plus(relative_epsilon="none", epsilon=10.0),
      "plus_not_debiased": plus(debiased=False, value="transport"),
      "plus_balanced": plus(tau_cross_cot=1.0),
      "plus_fixed_weights": plus(layer_weighting="fixed"),
      "plus_mid_layer": plus(**{"kd.ot.layers": ("embed", "mid", "final")}),
  }


def get_spec(arg=None):
  a = parse_arg(arg, ARG, where="experiments/demo.py")
  if a.set not in ("main", "ablations"):
    raise ConfigError(f"experiments/demo.py: unknown set {a.set!r}; known: main, ablations")
  if a.size not in SIZE_EPOCHS:
    raise ConfigError(f"experiments/demo.py: unknown size {a.size!r}; known: "
                      f"{', '.join(SIZE_EPOCHS)}")
  seeds = a.seeds or ("0-1-2-3-4" if a.set == "main" else "0-1-2")
  if a.set == "main":
    runs = {m: _student(m, a.size, **(dict(COT, **{"kd.base": "dskd_cma"})
                                      if get_method(m).uses_rationales else {})) for m in MAIN}
  else:
    runs = _ablations(a.size)
  new_tokens = {"plain": 8, "cot": 48}     # the demo's evaluation budgets
  return dict(
      name=f"demo_{a.set}_{a.size}",
      description=("Students distilled from the demo's SFT teacher (Llama-like, byte BPE) into a "
                   "Qwen2-like student with another tokenizer (Metaspace BPE) on multi-step "
                   "arithmetic word problems; exact match of the final number, greedy."),
      runs=runs,
      # main: dskd_cma, the base KD of both CoT2Align variants; ablations: cot2align, each
      # ablation being it with one thing changed
      baseline="dskd_cma" if a.set == "main" else "cot2align",
      # the claim: each CoT2Align variant against the best other student, chosen on dev
      candidates=("cot2align", "cot2align_plus") if a.set == "main" else (),
      select_on="arith/dev", claim_on="arith/test",
      seeds=[int(s) for s in seeds.replace(",", "-").split("-") if s],
      budgets=("epochs", "compute"),
      epochs=int(a.epochs) or SIZE_EPOCHS[a.size],
      seed_keys=("train.seed", "data.seed"),
      overrides={"data.source": "{prepare}/data",
                 "student.path": "{prepare}/models/student_init", "student.init": "random",
                 "teacher.path": "{prepare}/teacher/export"},
      evaluation=dict(datasets=("arith/dev", "arith/test"), prompts=("plain", "cot"),
                      greedy=True, new_tokens=new_tokens, max_prompt_length=48,
                      batch_size=64, prompt_bucket=16),
      prepare=dict(command=("{python}", "-m", "cot2align_jax.demo", "--workdir={prepare}",
                            f"--size={a.size}", "--stop_after=rationales")),
      cost=COST,
      default_cost=0.2,
      eval_cost=40.0,
  )
