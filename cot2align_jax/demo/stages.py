r"""The demo's stages: a complete cross-tokenizer distillation, offline, on a CPU.

    demo = make_demo("runs/demo", size="ci", methods="sft,cot2align", seed=0,
                     config=str(DEFAULT_CONFIG))
    run(demo)                               # every stage; run(demo, stop_after="rationales")

Stages (each one's output is kept; a rerun skips what is done, make_demo(force=True) deletes
the demo's outputs first):
  1. data       multi-step arithmetic word problems (data/arith.py): train/dev/test splits and the
                gold worked steps; two tokenizers trained on them (teacher byte-level BPE, 400;
                student Metaspace BPE, 200); one random initialisation of each model saved as a
                Hugging Face checkpoint (models/{teacher,student}_init).
  2. teacher    a 4-layer Llama-like teacher (d 128) trained from scratch with SFT on plain and
                gold-CoT records (configs/demo.py:teacher), exported to teacher/export.
  3. rationales the teacher writes a rationale for every train problem on the CoT prompt
                (greedy; evaluation/rationales.py): rationales.jsonl, when a student's method
                trains on CoT records (Method.uses_rationales) or the run stops after it.
  4. students   a 2-layer Qwen2-like student (d 64, other tokenizer) distilled with each method
                from the same initialisation, same steps, batch, learning rate and seed
                (configs/demo.py:<method>): students/<method>/.
  5. evaluate   greedy decoding on the test split; exact match of the final number: teacher with
                the CoT prompt and with the plain prompt, every student with the plain prompt
                (docs/method.md §5): eval/<model>/ (generations with per-example scores).
  6. report     demo_results.{md,json} and plots/: training_curves.png, accuracy.png,
                ot_plan.png (cost and transport plan of the first student with an OT block for
                one test problem, student tokens × teacher tokens).

Everything is read from and written to the workdir; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from cot2align_jax.core.paths import PROJECT_ROOT
from cot2align_jax.data import arith
from cot2align_jax.data.records import COT_ANSWER_JOINER, get_template
from cot2align_jax.data.sources import read_examples, read_rationales, write_rationales
from cot2align_jax.demo import plots
from cot2align_jax.evaluation.gsm8k import extract_answer
from cot2align_jax.evaluation.protocol import SamplingSettings, evaluate_sets
from cot2align_jax.evaluation.rationales import generate_rationales
from cot2align_jax.losses.methods import METHODS, get_method
from cot2align_jax.models import from_pretrained, hf, load_tokenizer
from cot2align_jax.models.toy import toy_config
from cot2align_jax.training.config import load_config, load_sibling
from cot2align_jax.training.loop import train

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "demo.py"

TEST_SEED = 0
STAGES = ("data", "teacher", "rationales", "students", "evaluate", "report")
OUTPUTS = ("data", "tokenizers", "models", "teacher", "rationales.jsonl", "rationales_raw.jsonl",
           "rationales_stats.json", "students", "eval", "plots", "demo_results.md",
           "demo_results.json", "demo_settings.json")
SETTINGS_FILE = "demo_settings.json"   # size and seed of the run a workdir holds


class DemoError(ValueError):
  """A bad flag or an unusable workdir."""


@dataclasses.dataclass
class Demo:
  """The paths and settings of one demo run."""

  workdir: Path
  size: str
  methods: tuple[str, ...]
  seed: int
  config_file: Path
  timings: dict[str, float] = dataclasses.field(default_factory=dict)
  kept: set[str] = dataclasses.field(default_factory=set)   # stages kept from an earlier run

  @property
  def data_dir(self) -> Path:
    return self.workdir / "data"

  def model_dir(self, side: str) -> Path:
    return self.workdir / "models" / f"{side}_init"

  def run_dir(self, role: str) -> Path:
    return self.workdir / ("teacher" if role == "teacher" else f"students/{role}")

  @property
  def rationales(self) -> Path:
    return self.workdir / "rationales.jsonl"

  def config(self, role: str):
    """configs/demo.py:<role>,size=<size> with every path pointed into the workdir."""
    overrides = {"data.source": str(self.data_dir), "data.seed": self.seed,
                 "train.seed": self.seed, "student.path": str(self.model_dir("student")),
                 "teacher.path": str(self.run_dir("teacher") / "export")}
    if role == "teacher":
      overrides.update({"student.path": str(self.model_dir("teacher")), "teacher.path": "",
                        "data.rationales": str(self.data_dir / "arith" /
                                               "gold_rationales.jsonl")})
    elif get_method(role).uses_rationales:
      overrides["data.rationales"] = str(self.rationales)
    return load_config(self.config_file, f"{role},size={self.size}", overrides)

  def wants_rationales(self) -> bool:
    """Whether a student's method trains on the teacher's CoT records."""
    return any(get_method(m).uses_rationales for m in self.methods)

  def sizes(self) -> dict[str, int]:
    module = load_sibling(str(self.config_file), self.config_file.name)
    return dict(module.SIZES[self.size])

  def model_shapes(self) -> tuple[dict, dict]:
    module = load_sibling(str(self.config_file), self.config_file.name)
    students = getattr(module, "STUDENT_MODELS", {})
    return dict(module.TEACHER_MODEL), dict(students.get(self.size, module.STUDENT_MODEL))


def _stage(name: str, index: int, text: str) -> float:
  print(f"\n[{index}/{len(STAGES)}] {name}: {text}", flush=True)
  return time.perf_counter()


TIMINGS_FILE = "stage_timings.json"


def _done(demo: Demo, name: str, start: float) -> None:
  """Records a stage's seconds; a stage kept from an earlier run keeps the seconds it took
  then (workdir/stage_timings.json), so a rerun reports the demo's real cost."""
  path = demo.workdir / TIMINGS_FILE
  saved = json.loads(path.read_text()) if path.is_file() else {}
  if name in demo.kept and name in saved:
    demo.timings[name] = saved[name]
    print(f"    {name}: {saved[name]:.1f} s when it ran", flush=True)
  else:
    demo.timings[name] = round(time.perf_counter() - start, 1)
    print(f"    {name} done in {demo.timings[name]:.1f} s", flush=True)
  path.write_text(json.dumps({**saved, name: demo.timings[name]}, indent=1) + "\n")


def _total(demo: Demo, t_all: float) -> None:
  """timings total = the stages' seconds (kept ones as they ran); this_run = this call's."""
  demo.timings["this_run"] = round(time.perf_counter() - t_all, 1)
  demo.timings["total"] = round(sum(v for k, v in demo.timings.items()
                                    if k not in ("total", "this_run")), 1)


# --------------------------------------------------------------------------------------------
# 1. data, tokenizers, initial models
# --------------------------------------------------------------------------------------------


def model_configs(teacher_tok, student_tok, teacher_shape: dict, student_shape: dict):
  """(teacher, student) ModelConfigs (models/toy.py): a Llama-like teacher (GQA, untied head)
  and a Qwen2-like student (q/k/v biases, tied embeddings) over their tokenizers' vocabularies
  (rounded up to a multiple of 8; the padding ids are never predicted)."""
  return tuple(toy_config(model_type, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, valid_vocab_size=len(tok), **shape)
               for tok, shape, model_type in ((teacher_tok, teacher_shape, "llama"),
                                              (student_tok, student_shape, "qwen2")))


def stage_data(demo: Demo) -> dict[str, Any]:
  sizes = demo.sizes()
  marker = demo.workdir / "models" / "done.json"
  if marker.is_file():
    print("    (kept from an earlier run)")
    demo.kept.add("data")
    return json.loads(marker.read_text())
  arith.write_dataset(demo.data_dir, {k: sizes[k] for k in arith.SPLITS}, seed=demo.seed)
  teacher_tok, student_tok = arith.train_tokenizers(demo.data_dir, demo.workdir / "tokenizers")
  t_shape, s_shape = demo.model_shapes()
  t_cfg, s_cfg = model_configs(teacher_tok, student_tok, t_shape, s_shape)
  info = {}
  for side, cfg, tok, seed in (("teacher", t_cfg, teacher_tok, demo.seed + 1),
                               ("student", s_cfg, student_tok, demo.seed)):
    model = hf.create_model(cfg, seed=seed)
    hf.save_pretrained(model, demo.model_dir(side), tokenizer=tok)
    n_params = sum(int(v.size) for v in hf.params_of(model).values())
    info[side] = {"vocab": len(tok), "params": n_params, "layers": cfg.num_layers,
                  "hidden_size": cfg.hidden_size, "tokenizer": tok.name_or_path}
  info["sizes"] = sizes
  sample = arith.make_splits({"train": 1, "dev": 1, "test": 1}, seed=demo.seed)["test"][0]
  info["sample"] = sample
  info["sample_tokens"] = {"teacher": teacher_tok.tokenize(sample["question"]),
                           "student": student_tok.tokenize(sample["question"])}
  marker.write_text(json.dumps(info, indent=2) + "\n")
  print(f"    {sizes['train']}/{sizes['dev']}/{sizes['test']} train/dev/test problems, e.g.")
  print(f"      Q: {sample['question']}\n      worked steps: {sample['rationale']}  "
        f"answer: {sample['answer']}")
  print(f"    teacher tokenizer: byte-level BPE, {info['teacher']['vocab']} tokens: "
        f"{' '.join(info['sample_tokens']['teacher'][:12])} ...")
  print(f"    student tokenizer: Metaspace BPE, {info['student']['vocab']} tokens: "
        f"{' '.join(info['sample_tokens']['student'][:12])} ...")
  return info


# --------------------------------------------------------------------------------------------
# 2 and 4. training runs
# --------------------------------------------------------------------------------------------


def _train(demo: Demo, role: str) -> dict[str, Any]:
  """Trains (or resumes) one run; returns {"seconds", "steps", "final_metrics"}."""
  run_dir = demo.run_dir(role)
  summary_path = run_dir / "demo_summary.json"
  if summary_path.is_file() and (run_dir / "export" / "config.json").is_file():
    print(f"    {role}: kept from an earlier run")
    demo.kept.add(role if role == "teacher" else f"student/{role}")
    return json.loads(summary_path.read_text())
  start = time.perf_counter()
  summary = train(demo.config(role), run_dir)
  if summary.get("preempted"):
    raise KeyboardInterrupt(f"{role} was interrupted; rerun the demo to resume it")
  out = {"seconds": round(time.perf_counter() - start, 1), "steps": summary["step"],
         "final_metrics": summary["final_metrics"]}
  summary_path.write_text(json.dumps(out, indent=2) + "\n")
  return out


# --------------------------------------------------------------------------------------------
# 3. rationales
# --------------------------------------------------------------------------------------------


def split_cot_output(text: str) -> tuple[str, str | None]:
  """A CoT generation "<steps>\\nTherefore, the answer is: N" -> (steps, final answer or None).
  Without the answer phrase the whole text is the rationale."""
  head, joiner, _ = text.partition(COT_ANSWER_JOINER.strip())
  return head.strip(), (extract_answer(text) if joiner else None)


def _settings(new_tokens: int):
  return SamplingSettings(greedy=True, temperature=1.0, no_repeat_ngram_size=0,
                          max_prompt_length=48, max_length=48 + new_tokens,
                          max_new_tokens=new_tokens, prompt_bucket=16)


PLAIN_NEW_TOKENS = 8
COT_NEW_TOKENS = 48


def stage_rationales(demo: Demo) -> dict[str, Any]:
  """The teacher's greedy CoT for every train problem; rationales.jsonl keeps the steps (the
  answer phrase is cut: training appends it with the gold answer, docs/method.md §2)."""
  stats_path = demo.workdir / "rationales_stats.json"
  if demo.rationales.is_file() and stats_path.is_file():
    print("    (kept from an earlier run)")
    demo.kept.add("rationales")
    return json.loads(stats_path.read_text())
  examples = read_examples("arith", "train", source=demo.data_dir,
                           max_examples=demo.sizes()["train"])
  export = demo.run_dir("teacher") / "export"
  teacher, tok = from_pretrained(str(export)), load_tokenizer(str(export))
  raw = demo.workdir / "rationales_raw.jsonl"
  report = generate_rationales(teacher, tok, examples, raw, settings=_settings(COT_NEW_TOKENS),
                               seed=demo.seed, batch_size=64, cot_rule="all", log_every=8,
                               prompt_fn=get_template(arith.TEMPLATE).cot)
  texts = read_rationales(raw)
  steps, correct = {}, 0
  for ex in examples:
    rationale, answer = split_cot_output(texts[ex.id])
    steps[ex.id] = rationale
    correct += int(answer == ex.outputs[0])
  write_rationales(demo.rationales, steps)
  stats = {"n": len(examples), "answer_correct": correct,
           "answer_accuracy": round(100.0 * correct / max(len(examples), 1), 2),
           "tokens_per_s": round(report.tokens_per_s, 1)}
  stats_path.write_text(json.dumps(stats, indent=2) + "\n")
  print(f"    {len(examples)} rationales; the teacher's own answer is right in "
        f"{stats['answer_accuracy']:.1f}% of them ({report.tokens_per_s:.0f} tok/s)")
  return stats


# --------------------------------------------------------------------------------------------
# 5. evaluation
# --------------------------------------------------------------------------------------------


def evaluate_model(demo: Demo, name: str, model_dir: Path, prompt: str) -> dict[str, Any]:
  """Exact match (%) of greedy generations on the test split; writes eval/<name>/."""
  examples = read_examples("arith", "test", source=demo.data_dir)
  template = get_template(arith.TEMPLATE)
  prompt_fn = template.cot if prompt == "cot" else template.plain
  new_tokens = COT_NEW_TOKENS if prompt == "cot" else PLAIN_NEW_TOKENS
  model, tok = from_pretrained(str(model_dir)), load_tokenizer(str(model_dir))
  report = evaluate_sets(model, tok, {"arith/test": examples}, seeds=(TEST_SEED,),
                         workdir=demo.workdir / "eval" / name, settings=_settings(new_tokens),
                         batch_size=64, prompt_fn=prompt_fn,
                         meta={"model": str(model_dir), "prompt": prompt})
  result = report.results[0]
  return {"name": name, "prompt": prompt, "accuracy": round(result.mean, 2), "n": result.n,
          "generations": str(demo.workdir / "eval" / name / "generations" /
                             f"arith_test_seed{TEST_SEED}.jsonl")}


def recount_accuracy(generations: str | Path, test_file: str | Path) -> float:
  """Exact match (%) recomputed from a generations file and the test split's answers."""
  golds = [json.loads(l)["output"] for l in Path(test_file).read_text().splitlines() if l]
  preds = [json.loads(l) for l in Path(generations).read_text().splitlines() if l]
  by_id = {p["id"]: p["prediction"] for p in preds}
  hits = sum(extract_answer(by_id[f"arith/test/{i}"]) == g for i, g in enumerate(golds))
  return 100.0 * hits / max(len(golds), 1)


# --------------------------------------------------------------------------------------------
# 6. report
# --------------------------------------------------------------------------------------------


def results_table(rows: Sequence[dict[str, Any]]) -> str:
  lines = ["| model | tokenizer | params | trained with | test prompt | exact match (%) | "
           "train time (s) |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['tokenizer']} | {r['params'] / 1e3:.0f}k | "
                 f"{r['trained_with']} | {r['prompt']} | {r['accuracy']:.1f} | "
                 f"{r['train_seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def _trained_with(method: str) -> str:
  """The "trained with" column of a student row, from what its method declares."""
  m = get_method(method)
  if not m.needs_teacher:
    return "SFT, answers only"
  kd = "KD + OT" if m.ot else "KD from the teacher"
  return f"{kd}, {'teacher CoT records' if m.uses_rationales else 'answers'}"


def _stopped(demo: Demo, stage: str, t_all: float) -> dict[str, Any]:
  _total(demo, t_all)
  print(f"\nstopped after {stage} (--stop_after); rerun without it to continue")
  return {"size": demo.size, "seed": demo.seed, "methods": list(demo.methods),
          "stopped_after": stage, "timings_s": demo.timings}


def run(demo: Demo, stop_after: str | None = None) -> dict[str, Any]:
  """Runs the stages (skipping finished ones) and returns the demo_results.json payload; with
  `stop_after` (one of STAGES) returns {"stopped_after", "timings_s", ...} after that stage
  (stop_after="rationales" writes the rationales whatever the methods)."""
  if stop_after is not None and stop_after not in STAGES:
    raise DemoError(f"unknown --stop_after {stop_after!r}; stages: {', '.join(STAGES)}")
  t_all = time.perf_counter()
  t = _stage("data", 1, "problems, two tokenizers, initial models")
  info = stage_data(demo)
  _done(demo, "data", t)
  if stop_after == "data":
    return _stopped(demo, "data", t_all)

  t = _stage("teacher", 2, f"SFT from scratch, {demo.config('teacher').train.steps} steps "
             "(plain + worked-step records)")
  teacher_run = _train(demo, "teacher")
  _done(demo, "teacher", t)
  if stop_after == "teacher":
    return _stopped(demo, "teacher", t_all)

  t = _stage("rationales", 3, "the teacher writes a rationale for every train problem")
  rationale_stats = None
  if demo.wants_rationales() or stop_after == "rationales":
    rationale_stats = stage_rationales(demo)
  else:
    print("    (skipped: no student trains on CoT records)")
  _done(demo, "rationales", t)
  if stop_after == "rationales":
    return _stopped(demo, "rationales", t_all)

  student_runs = {}
  for i, method in enumerate(demo.methods):
    t = _stage("students", 4, f"{method} ({i + 1}/{len(demo.methods)}), "
               f"{demo.config(method).train.steps} steps")
    student_runs[method] = _train(demo, method)
    _done(demo, f"student/{method}", t)
  if stop_after == "students":
    return _stopped(demo, "students", t_all)

  t = _stage("evaluate", 5, "greedy decoding on the test split, exact match")
  teacher_export = demo.run_dir("teacher") / "export"
  evals = {"teacher/cot": evaluate_model(demo, "teacher_cot", teacher_export, "cot"),
           "teacher/plain": evaluate_model(demo, "teacher_plain", teacher_export, "plain")}
  for method in demo.methods:
    evals[method] = evaluate_model(demo, method, demo.run_dir(method) / "export", "plain")
  _done(demo, "evaluate", t)
  if stop_after == "evaluate":
    return _stopped(demo, "evaluate", t_all)

  t = _stage("report", 6, "table, JSON and plots")
  rows = []
  for key, ev in evals.items():
    is_teacher = key.startswith("teacher")
    side = info["teacher" if is_teacher else "student"]
    run_info = teacher_run if is_teacher else student_runs[key]
    rows.append({"model": "teacher" if is_teacher else f"student ({key})",
                 "method": "teacher" if is_teacher else key,
                 "tokenizer": ("byte BPE" if is_teacher else "Metaspace BPE") +
                              f" {side['vocab']}",
                 "params": side["params"],
                 "trained_with": ("SFT, gold worked steps" if is_teacher else
                                  _trained_with(key)),
                 "prompt": ev["prompt"], "accuracy": ev["accuracy"], "n": ev["n"],
                 "train_seconds": run_info["seconds"], "steps": run_info["steps"],
                 "generations": ev["generations"]})
  plot_dir = demo.workdir / "plots"
  plot_dir.mkdir(parents=True, exist_ok=True)
  paths = {"training_curves": plots.plot_training_curves(
               {m: demo.run_dir(m) / "metrics.jsonl" for m in ("teacher",) + demo.methods},
               plot_dir / "training_curves.png"),
           "accuracy": plots.plot_accuracy(rows, plot_dir / "accuracy.png")}
  with_ot = [m for m in demo.methods if get_method(m).ot]
  if with_ot:
    paths["ot_plan"] = plots.plot_ot_plan(
        plots.ot_plan_example(demo.config(with_ot[0]), demo.run_dir(with_ot[0]), demo.data_dir),
        plot_dir / "ot_plan.png")
  _done(demo, "report", t)
  _total(demo, t_all)

  table = results_table(rows)
  best = max((r for r in rows if r["method"] != "teacher"), key=lambda r: r["accuracy"],
             default=None)
  payload = {"size": demo.size, "seed": demo.seed, "methods": list(demo.methods),
             "task": {"sizes": info["sizes"], "sample": info["sample"]},
             "models": {"teacher": info["teacher"], "student": info["student"]},
             "rationales": rationale_stats, "results": rows,
             "best_student": best["method"] if best else None,
             "timings_s": demo.timings, "plots": {k: str(v) for k, v in paths.items()}}
  (demo.workdir / "demo_results.json").write_text(json.dumps(payload, indent=2) + "\n")
  md = ["# cot2align_jax demo results", "",
        f"Multi-step arithmetic word problems, {info['sizes']['test']} test problems, greedy "
        f"decoding, exact match of the final number. Size `{demo.size}`, seed {demo.seed}, "
        f"total {demo.timings['total']:.0f} s" + (
            f" ({demo.timings['this_run']:.0f} s in the last run, the other stages kept from "
            "earlier runs)." if demo.kept else "."), "", table]
  if rationale_stats:
    md.append(f"Teacher rationales: {rationale_stats['n']} written, its own final answer right "
              f"in {rationale_stats['answer_accuracy']:.1f}% of them.\n")
  md.append("Plots: " + ", ".join(f"[{k}](plots/{Path(v).name})" for k, v in paths.items()))
  (demo.workdir / "demo_results.md").write_text("\n".join(md) + "\n")
  print("\n" + table)
  print(f"wrote {demo.workdir / 'demo_results.md'}, {demo.workdir / 'demo_results.json'} and "
        f"{', '.join(str(p) for p in paths.values())}")
  print(f"total {demo.timings['total']:.0f} s" + (
      f" (this run {demo.timings['this_run']:.0f} s; kept stages as they ran)" if demo.kept
      else ""))
  return payload


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def make_demo(workdir: str, size: str, methods: str, seed: int, config: str,
              force: bool = False) -> Demo:
  """A checked Demo: every flag is validated before anything in the workdir changes; with
  `force` the demo's outputs there are deleted; a workdir made with another size or seed is
  refused (DemoError, one line)."""
  names = tuple(m.strip() for m in methods.split(",") if m.strip())
  if not names:
    raise DemoError("--methods is empty")
  unknown = [m for m in names if m not in METHODS]
  if unknown:
    raise DemoError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
  one_vocab = [m for m in names if get_method(m).same_vocab]
  if one_vocab:
    raise DemoError(f"{', '.join(one_vocab)} needs one vocabulary; the demo's models have two")
  config_file = Path(config)
  if not config_file.is_file():
    raise DemoError(f"config file not found: {config}")
  root = Path(workdir).expanduser().resolve()
  if root.exists() and not root.is_dir():
    raise DemoError(f"--workdir {root} exists and is not a directory")
  demo = Demo(root, size, names, int(seed), config_file.resolve())
  try:
    demo.sizes()
  except KeyError:
    raise DemoError(f"unknown --size {size!r}; {config_file} has no such size") from None
  if force and root.is_dir():
    for name in OUTPUTS:
      p = root / name
      if p.is_dir():
        shutil.rmtree(p)
      elif p.exists():
        p.unlink()
  root.mkdir(parents=True, exist_ok=True)
  settings = {"size": size, "seed": int(seed)}
  marker = root / SETTINGS_FILE
  if marker.is_file():
    before = json.loads(marker.read_text())
    if before != settings:
      raise DemoError(f"--workdir {root} holds a demo made with --size={before['size']} "
                      f"--seed={before['seed']}; pass those, --force, or another --workdir")
  else:
    marker.write_text(json.dumps(settings) + "\n")
  return demo
