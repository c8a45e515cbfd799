"""The demo's pictures: training curves, accuracy bars and one OT transport plan.

    plot_training_curves({"teacher": "runs/demo/teacher/metrics.jsonl", ...}, "curves.png")
    plot_accuracy(rows, "accuracy.png")                 # rows of demo/stages.py's table
    plot_ot_plan(ot_plan_example(config, run_dir, data_dir), "ot_plan.png")

`ot_plan_example` restores a run's checkpoint (student and its OT projector), runs the exported
teacher and the student on one test problem's plain view (prompt + gold answer + EOS) and
solves the training's OT problem between the final hidden states at the response positions
plus the prompt's last few tokens (two token sequences of a readable length), with the
method's own OT settings (cost, ε, solver: `losses.methods.ot_config`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from cot2align_jax.data.records import plain_record
from cot2align_jax.data.sources import read_examples
from cot2align_jax.data.tokenize import tokenize_view
from cot2align_jax.losses import ot
from cot2align_jax.losses.methods import ot_config
from cot2align_jax.models import from_pretrained, load_tokenizer
from cot2align_jax.training import config as C
from cot2align_jax.training.restore import train_state_from_checkpoint

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
          "#8c8c8c", "#ccb974", "#64b5cd")


def _pyplot():
  # matplotlib is heavy and needed only for the report stage
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def read_metrics(path: str | Path, split: str = "train") -> list[dict[str, Any]]:
  """The rows of a run's metrics.jsonl for one split (missing file: [])."""
  path = Path(path)
  if not path.is_file():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if r.get("split") == split]


def plot_training_curves(runs: Mapping[str, str | Path], out: str | Path) -> Path:
  """Two panels: the teacher's training loss, and each student's cross-entropy on its main
  view (per response token) and total loss, against the step. `runs`: name -> metrics.jsonl;
  the name "teacher" goes to the left panel."""
  plt = _pyplot()
  fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(10, 3.8))
  students = [name for name in runs if name != "teacher"]
  for name, path in runs.items():
    rows = read_metrics(path)
    if not rows:
      continue
    steps = [r["step"] for r in rows]
    if name == "teacher":
      ax_t.plot(steps, [r["ce"] for r in rows], color="#333333", label="teacher CE")
      continue
    color = COLORS[students.index(name) % len(COLORS)]
    ax_s.plot(steps, [r["ce"] for r in rows], color=color, label=f"{name}: CE")
    if "kd" in rows[-1] or "ot/total" in rows[-1]:  # a KD objective beyond the CE
      ax_s.plot(steps, [r["loss"] for r in rows], color=color, linestyle=":", alpha=0.8,
                label=f"{name}: loss")
  ax_t.set_title("teacher (SFT from scratch)", fontsize=10)
  ax_s.set_title("students (CE = main-view cross-entropy; dotted = full objective)", fontsize=9)
  for ax in (ax_t, ax_s):
    ax.set_xlabel("step")
    ax.set_ylabel("nats per response token")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7)
  fig.tight_layout()
  out = Path(out)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def plot_accuracy(rows: Sequence[Mapping[str, Any]], out: str | Path) -> Path:
  """Bars of test exact match (%) per model row ({"model", "prompt", "accuracy", "n"}); the
  teacher rows are grey, the students keep their colour of `plot_training_curves`."""
  plt = _pyplot()
  labels = [f"{r['model']}\n{r['prompt']} prompt" for r in rows]
  values = [float(r["accuracy"]) for r in rows]
  students = [r for r in rows if not str(r["model"]).startswith("teacher")]
  colors = ["#333333" if str(r["model"]).startswith("teacher") else
            COLORS[students.index(r) % len(COLORS)] for r in rows]
  fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 1.0), 3.8))
  bars = ax.bar(range(len(rows)), values, color=colors)
  for bar, v in zip(bars, values):
    ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels(labels, fontsize=7)
  n = rows[0]["n"] if rows else 0
  ax.set_ylabel(f"test exact match (%), n = {n}")
  ax.set_ylim(0, 105)
  ax.set_title("multi-step arithmetic: greedy answers, exact match of the final number",
               fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  out = Path(out)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def _tokens(tokenizer, ids: Sequence[int]) -> list[str]:
  """Readable labels of token ids (byte-level "Ġ" and Metaspace "▁" kept: they show the
  tokenizers' different conventions)."""
  return [t.replace("\n", "\\n") for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


def ot_plan_example(config, run_dir: str | Path, data_dir: str | Path, *, index: int = 0,
                    prompt_tail: int = 6) -> dict[str, Any]:
  """Cost and plan of the OT between the student's and the (projected) teacher's final hidden
  states for test problem `index` of the arith set.

  Positions: the last `prompt_tail` prompt tokens + the response (answer and EOS) of each side.
  Returns {"student_tokens", "teacher_tokens", "cost" [n, m], "plan" [n, m], "epsilon" (the
  ε solved at, after a relative scaling), "cost_kind", "method", "plan_peak" (max P·n·m),
  "question", "answer"} (numpy float32 arrays; the plan sums to 1). The cost, ε and solver are
  the method's own OT settings (`losses.methods.ot_config`).
  """
  example = read_examples("arith", "test", source=data_dir, max_examples=index + 1)[index]
  record = plain_record(example, template="qa")
  restored = train_state_from_checkpoint(config, Path(run_dir) / "checkpoints")
  student = restored.student()
  projectors = restored.projectors()
  if projectors is None or projectors.ot is None:
    raise ValueError(f"{run_dir}: the run has no OT projector (its method has no OT block)")
  teacher = from_pretrained(config.teacher.path)
  t_tok = load_tokenizer(config.teacher.path)
  kd = C.kd_config(config)
  ot_cfg = ot_config(kd, C.method_of(kd))   # the method's own OT settings (cot2align_plus)
  states = {}
  for side, model, tok in (("student", student, restored.tokenizer), ("teacher", teacher, t_tok)):
    view = tokenize_view(record.prompt, record.response, tok,
                         max_prompt=int(config.data.max_prompt), max_len=int(config.data.max_len),
                         special_tokens=str(config.data.special_tokens))
    ids = np.asarray(view.ids)[None, :]
    hidden = model(jnp.asarray(ids), hidden_states="ends", logits="none").hidden_states[-1][0]
    first = max(int(np.argmax(view.response_mask)) - prompt_tail, 0)
    states[side] = (hidden[first:], _tokens(tok, view.ids[first:]))
  x = states["student"][0].astype(jnp.float32)
  y = projectors.ot(states["teacher"][0])
  ones_x, ones_y = jnp.ones(x.shape[0]), jnp.ones(y.shape[0])
  cost = ot.cost_matrix(x, y, ones_y, ot_cfg.cost)
  epsilon = float(ot.resolve_epsilon(cost, ones_x, ones_y, ot_cfg))
  plan = ot.sinkhorn_plan(cost, ot.uniform_marginal(ones_x), ot.uniform_marginal(ones_y), ot_cfg,
                          epsilon=epsilon)
  return {"student_tokens": states["student"][1], "teacher_tokens": states["teacher"][1],
          "cost": np.asarray(cost, np.float32), "plan": np.asarray(plan, np.float32),
          "epsilon": epsilon, "cost_kind": ot_cfg.cost, "method": kd.method,
          "plan_peak": float(ot.plan_peak(plan, ones_x, ones_y)),
          "question": example.input, "answer": example.outputs[0]}


def plot_ot_plan(example: Mapping[str, Any], out: str | Path) -> Path:
  """Heatmaps of the cost and of the plan relative to the independent coupling (P_ij·n·m:
  1 = no preference; at a large epsilon the plan is close to uniform, so this ratio is what
  shows its structure), student tokens on the rows, teacher tokens on the columns."""
  plt = _pyplot()
  cost, plan = np.asarray(example["cost"]), np.asarray(example["plan"])
  n, m = plan.shape
  ratio = plan * n * m
  s_tok, t_tok = example["student_tokens"], example["teacher_tokens"]
  fig, axes = plt.subplots(1, 2, figsize=(4.0 + 0.55 * m * 2, 2.2 + 0.4 * n))
  panels = ((cost, f"cost ({example['cost_kind']})", "viridis_r"),
            (ratio, f"transport plan × n·m (ε = {example['epsilon']:.3g}, "
                    f"max {float(np.max(ratio)):.2f})", "magma"))
  for ax, (mat, title, cmap) in zip(axes, panels):
    im = ax.imshow(mat, cmap=cmap, aspect="auto")
    ax.set_xticks(range(m))
    ax.set_xticklabels(t_tok, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n))
    ax.set_yticklabels(s_tok, fontsize=7)
    ax.set_xlabel("teacher tokens (byte-level BPE)", fontsize=8)
    ax.set_ylabel("student tokens (Metaspace BPE)", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  question = str(example.get("question", ""))
  short = question if len(question) < 90 else question[:87] + "..."
  fig.suptitle(f"OT of the {example.get('method', 'cot2align')} student, final layer: "
               f"\"{short}\" -> {example.get('answer', '')}", fontsize=8)
  fig.tight_layout()
  out = Path(out)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out
