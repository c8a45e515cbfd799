"""Building a training problem from its config, checked against the method (docs/architecture.md
§11): tokenizers and models, records, the vocabulary checks, the MinED map and the pipelines.

    problem = build_problem(config, method.needs_teacher, kd_cfg)   # tiny or HF checkpoints
    check_vocabularies(kd_cfg, problem.student_tok, problem.teacher_tok, problem.student,
                       problem.teacher)
    vocab_map = mined_vocab_map(method, problem)                    # None unless needed
    pipeline, dev_pipeline = build_pipelines(problem, pipe_cfg, vocab_map, with_dev=True)

Errors a user can fix are ConfigError / ModelError in one line, raised before anything heavy
loads where possible.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import ml_collections
import numpy as np
from flax import nnx

from cot2align_jax.alignment.mined import build_mined_vocab_map
from cot2align_jax.data import arith, files, sources
from cot2align_jax.data import records as R
from cot2align_jax.data.pipeline import Pipeline, PipelineConfig
from cot2align_jax.data.teacher_cache import TeacherCache
from cot2align_jax.losses.methods import METHODS, KDConfig, Method
from cot2align_jax.models import gguf, hf
from cot2align_jax.models.config import ModelConfig, ModelError
from cot2align_jax.models.toy import tiny_student_config, tiny_teacher_config
from cot2align_jax.training import config as C

log = logging.getLogger(__name__)

TINY_COT_FRACTION = 0.5   # tiny runs without data.rationales: gold CoT for about half the problems


@dataclasses.dataclass
class Problem:
  """Everything the loop needs from the outside world (the models until the state holds them)."""
  student_tok: Any
  teacher_tok: Any
  student: nnx.Module
  teacher: nnx.Module | None
  train_records: Sequence[Any]
  dev_records: Sequence[Any]
  dev_examples: Sequence[Any]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _model_overrides(spec_: C.ModelSpec, tokenizer) -> dict:
  """ModelConfig fields a ModelSpec sets (dtypes, remat, LoRA, valid_vocab_size)."""
  out = {"dtype": spec_.dtype, "param_dtype": spec_.param_dtype}
  if spec_.remat:
    out["remat"] = True
  out.update(C.lora_overrides(spec_))
  if spec_.valid_vocab_size > 0:
    out["valid_vocab_size"] = spec_.valid_vocab_size
  elif spec_.valid_vocab_size < 0 and tokenizer is not None:
    out["valid_vocab_size"] = len(tokenizer)
  return out


def _load_hf_model(spec_: C.ModelSpec, tokenizer, seed: int):
  overrides = _model_overrides(spec_, tokenizer)
  if spec_.init == "random":
    directory = hf.resolve_checkpoint(spec_.path)
    raw = json.loads((Path(directory) / "config.json").read_text())
    return hf.create_model(hf.config_from_hf(raw, **overrides), seed=seed)
  return hf.from_pretrained(spec_.path, seed=seed, **overrides)


def hf_config_json(path: str, table: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> dict[str, Any]:
  """The config.json dict of a model path without reading any weights: a `gguf:<name>` or
  `.gguf` file (its header), a local checkpoint directory (its config.json), or a name found in
  `table` ({Hub id: config.json dict}, for planning offline). ModelError (one line) otherwise."""
  if path.startswith(hf.GGUF_PREFIX):
    return gguf.read_gguf_config(path[len(hf.GGUF_PREFIX):])
  if path.endswith(".gguf"):
    if not Path(path).expanduser().is_file():
      raise ModelError(f"checkpoint not found: {path} does not exist")
    return gguf.read_gguf_config(Path(path).expanduser())
  p = Path(path).expanduser()
  if (p / "config.json").is_file():
    return json.loads((p / "config.json").read_text())
  if table is not None and path in table:
    return dict(table[path])
  known = f"; known without files: {', '.join(sorted(table))}" if table else ""
  raise ModelError(f"no config.json for {path!r}: not a local checkpoint directory or GGUF "
                   f"model{known}")


def abstract_model_config(config: ml_collections.ConfigDict, side: str,
                          table: Mapping[str, Mapping[str, Any]] | None = None) -> ModelConfig:
  """The ModelConfig of `side` ("student" / "teacher") as training would build it (dtypes,
  remat, LoRA, valid_vocab_size > 0 applied), from config.json alone (`hf_config_json`) or the
  tiny spec; nothing is loaded. valid_vocab_size = -1 (the tokenizer's length) is left out: it
  masks logits and changes no shape."""
  spec_ = C.model_spec(config, side)
  if spec_.tiny:
    tiny = tiny_models(config)
    base = tiny.student_cfg if side == "student" else tiny.teacher_cfg
  else:
    if not spec_.path:
      raise C.ConfigError(f"{side}.path is empty: set --config.{side}.path=<HF dir | org/name | "
                          f"gguf:name> (or {side}.tiny for the tiny problem)")
    base = hf.config_from_hf(hf_config_json(spec_.path, table))
  return base.replace(**_model_overrides(spec_, None))


def check_paths(student: C.ModelSpec, teacher: C.ModelSpec, needs_teacher: bool) -> None:
  """One-line errors for missing model paths (before anything heavy is loaded)."""
  for side, s, needed in (("student", student, True), ("teacher", teacher, needs_teacher)):
    if not needed or s.tiny:
      continue
    if not s.path:
      raise C.ConfigError(f"{side}.path is empty: set --config.{side}.path=<HF dir | org/name | "
                          f"gguf:name> (or {side}.tiny for the tiny problem)")
    name = s.path
    if name.startswith("gguf:") or name.endswith(".gguf"):
      continue
    p = Path(name).expanduser()
    looks_like_hub = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not p.exists() and (not looks_like_hub or offline):
      hint = " (HF_HUB_OFFLINE is set, so Hub names are not downloaded)" if looks_like_hub else ""
      raise ModelError(f"{side}.path: checkpoint not found: {name} does not exist{hint}")


def check_vocabularies(kd_cfg: KDConfig, student_tok, teacher_tok, student=None,
                       teacher=None) -> None:
  """A Method.same_vocab method (plain KD) compares the two distributions token by token: it
  needs one vocabulary (checked on the tokenizers before the models load, and on the models'
  rows when given)."""
  if not C.method_of(kd_cfg).same_vocab:
    return
  sizes = [(len(student_tok), len(teacher_tok), "tokens")]
  if student is not None and teacher is not None:
    sizes.append((student.config.vocab_size, teacher.config.vocab_size, "embedding rows"))
  for vs, vt, what in sizes:
    if vs != vt:
      others = ", ".join(n for n, m in METHODS.items() if m.kd is not None and not m.same_vocab)
      raise C.ConfigError(f"kd (plain KD) needs the same vocabulary, but the student has {vs} "
                          f"{what} and the teacher {vt}; use a cross-tokenizer method ({others}) "
                          "or kd.base=one of them")


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def _rationales(path: str, examples) -> dict:
  if not Path(path).is_file():
    raise C.ConfigError(f"data.rationales: file not found: {path}")
  return sources.import_rationales(path, examples, on_unknown="drop")


def data_template(config: ml_collections.ConfigDict | None, name: str) -> R.Template:
  """The prompt template of data set `name`: data.template when set, else the set's own."""
  given = C.data_config(config).template if config is not None else ""
  try:
    return R.get_template(given or sources.dataset_spec(name).template)
  except (KeyError, ValueError) as e:
    raise C.ConfigError(f"data.template: {e.args[0] if e.args else e}") from None


def split_examples(config: ml_collections.ConfigDict | None, name: str, split: str,
                   max_examples: int | None = None, *, source: str | None = None) -> list:
  """The Examples of one split of data set `name`: the tiny set (drawn in memory, seed
  data.seed), a user's files (data.<split>_file, data.fields, data.on_error: bad rows are
  counted and skipped with a warning) or a registered set (under `source`, else data.source).
  Errors a user can fix are one-line ConfigErrors."""
  d = C.data_config(config) if config is not None else C.DataConfig()
  if name == "tiny":
    seed = C.pipeline_config(config).seed if config is not None else 0
    return arith.tiny_examples(split, max_examples, seed=seed)
  try:
    if name in sources.FILE_DATASETS:
      key = sources.FILE_SPLITS.get(split)
      if key is None:
        raise C.ConfigError(f"data set {name!r} has the splits {', '.join(sources.FILE_SPLITS)}"
                            f", not {split!r}")
      path = getattr(d, key)
      if not path:
        raise C.ConfigError(f"data.dataset={name}: set --config.data.{key}=<file> for the "
                            f"{split} split")
      read = files.read_file(path, split=split, fields=d.fields, on_error=d.on_error,
                             max_examples=max_examples, name=name)
      if read.bad:
        log.warning("%s", files.summarize_bad(read.bad, path))
      if not read.examples:
        raise C.ConfigError(f"{path}: no usable rows" + (
            f" ({files.summarize_bad(read.bad, path)})" if read.bad else ""))
      return read.examples
    return sources.read_examples(name, split, source=source or d.source or None,
                                 max_examples=max_examples)
  except KeyError as e:
    raise C.ConfigError(f"data: {e.args[0] if e.args else e}") from None
  except R.DataError as e:
    raise C.ConfigError(str(e)) from None


def read_records(config: ml_collections.ConfigDict):
  """(train records, dev records, dev examples) of the data set (data.*); a method that uses
  rationales without data.rationales is a ConfigError unless data.cot_rule=none."""
  d = C.data_config(config)
  examples = split_examples(config, d.dataset, d.split, d.max_examples or None)
  rationales = {}
  if d.rationales:
    rationales = _rationales(d.rationales, examples)
  else:
    kd_cfg = C.kd_config(config)
    if C.method_of(kd_cfg).uses_rationales and d.cot_rule != "none":
      raise C.ConfigError(f"kd.method={kd_cfg.method} needs CoT rationales: set "
                          "--config.data.rationales=<JSONL of {id, rationale}> (python -m "
                          "cot2align_jax.generate_cot writes one), or "
                          "--config.data.cot_rule=none to train without CoT records")
  template = data_template(config, d.dataset).name
  train_records = R.build_records(examples, rationales, cot_rule=d.cot_rule, template=template)
  dev_examples, dev_records = [], []
  if d.dev_split:
    dev_examples = split_examples(config, d.dataset, d.dev_split, d.dev_max_examples or None)
    dev_records = R.build_records(dev_examples, None, cot_rule="none", template=template)
  return train_records, dev_records, dev_examples


def drop_long_prompts(records: Sequence[Any], toks: Sequence[Any], max_prompt: int,
                      on_error: str, where: str) -> list:
  """Own data: the records whose main-view prompt fits in `max_prompt` tokens of every
  tokenizer; the others are counted and skipped (warning with the first ids) or, with
  on_error="raise", a ConfigError naming the first."""
  prompts = [r.prompt for r in records]
  if not prompts:
    return []
  too_long = np.zeros(len(prompts), bool)
  for tok in toks:
    rendered = [R.render_prompt(p, tok) for p in prompts]     # chat prompts: each side's own
    lengths = np.asarray([len(ids) for ids in tok(rendered, add_special_tokens=False)["input_ids"]])
    too_long |= lengths > max_prompt
  if not too_long.any():
    return list(records)
  ids = [records[i].example_id for i in np.flatnonzero(too_long)]
  if on_error == "raise":
    raise C.ConfigError(f"{where}: the prompt of {ids[0]!r} is longer than data.max_prompt="
                        f"{max_prompt} tokens ({len(ids)} such records; data.on_error=skip "
                        "skips them)")
  log.warning("%s: skipped %d records whose prompt is longer than data.max_prompt=%d tokens "
              "(first: %s)", where, len(ids), max_prompt, ", ".join(ids[:3]))
  return [r for r, long_ in zip(records, too_long) if not long_]


# --------------------------------------------------------------------------------------------
# The problem
# --------------------------------------------------------------------------------------------


def tiny_dims(text: str, side: str) -> dict[str, int]:
  """"d=32,layers=2" (or any label without "=", e.g. "default") → {"d": 32, "layers": 2}."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    if "=" not in part:
      continue
    k, v = part.split("=", 1)
    if k.strip() not in ("d", "layers"):
      raise C.ConfigError(f"{side}.tiny: unknown field {k.strip()!r} in {text!r}; "
                          "use d=<width>,layers=<n>")
    out[k.strip()] = int(v)
  return out


class TinyModels(NamedTuple):
  """The tokenizers and model configs of a `*.tiny` run."""
  student_tok: Any
  teacher_tok: Any
  student_cfg: ModelConfig
  teacher_cfg: ModelConfig


def tiny_models(config: ml_collections.ConfigDict) -> TinyModels:
  """The tiny problem's tokenizers (trained on the task) and toy model configs, from
  student.tiny / teacher.tiny ("d=<width>,layers=<n>"; both sides need the same layer count)."""
  s_dims = tiny_dims(C.model_spec(config, "student").tiny, "student")
  t_dims = tiny_dims(C.model_spec(config, "teacher").tiny, "teacher")
  layers = s_dims.get("layers", 2)
  if layers != t_dims.get("layers", layers):
    raise C.ConfigError("student.tiny and teacher.tiny must have the same number of layers")
  s_tok, t_tok = arith.tiny_tokenizers()
  return TinyModels(s_tok, t_tok, tiny_student_config(len(s_tok), s_dims.get("d", 32), layers),
                    tiny_teacher_config(len(t_tok), t_dims.get("d", 48), layers))


def _tiny_problem(config: ml_collections.ConfigDict, needs_teacher: bool,
                  kd_cfg: KDConfig | None) -> Problem:
  """The tiny size of the arithmetic task (data/arith.py) with toy models (models/toy.py).

  data.max_examples / data.dev_max_examples: problems of the train / dev splits (seed
  data.seed); CoT records from data.rationales when set, else from the gold worked steps of
  about half of the train problems; the dev records are the plain ones.
  """
  student_spec, teacher_spec = C.model_spec(config, "student"), C.model_spec(config, "teacher")
  d = C.data_config(config)
  tiny = tiny_models(config)
  seed = C.pipeline_config(config).seed
  student_tok, teacher_tok = tiny.student_tok, tiny.teacher_tok
  if kd_cfg is not None and needs_teacher:
    check_vocabularies(kd_cfg, student_tok, teacher_tok)
  n_train = d.max_examples or arith.TINY_SIZES["train"]
  examples = arith.tiny_examples("train", n_train, seed)
  if d.rationales:  # CoT records from a rationale file (generate_cot) instead
    rationales = _rationales(d.rationales, examples)
  else:
    rationales = arith.tiny_rationales("train", n_train, seed, fraction=TINY_COT_FRACTION)
  train_records = arith.tiny_records(examples, rationales)
  dev_records, dev_examples = [], []
  if d.dev_split:
    dev_examples = arith.tiny_examples("dev", d.dev_max_examples or None, seed)
    dev_records = arith.tiny_records(dev_examples)
  model_seed = C.train_config(config).seed
  student = hf.create_model(tiny.student_cfg.replace(**_model_overrides(student_spec, None)),
                            seed=model_seed)
  teacher = None
  if needs_teacher:
    teacher = hf.create_model(tiny.teacher_cfg.replace(**_model_overrides(teacher_spec, None)),
                              seed=model_seed + 1)
  return Problem(student_tok, teacher_tok, student, teacher, train_records, dev_records,
                 dev_examples)


def build_problem(config: ml_collections.ConfigDict, needs_teacher: bool,
                  kd_cfg: KDConfig | None = None) -> Problem:
  """Tokenizers, models and records for a config (tiny problem or HF checkpoints + data).
  With `kd_cfg`, a vocabulary mismatch for plain KD is reported before the models load."""
  student_spec, teacher_spec = C.model_spec(config, "student"), C.model_spec(config, "teacher")
  if student_spec.tiny:
    return _tiny_problem(config, needs_teacher, kd_cfg)
  check_paths(student_spec, teacher_spec, needs_teacher)
  student_tok = hf.load_tokenizer(student_spec.path)
  teacher_tok = hf.load_tokenizer(teacher_spec.path) if teacher_spec.path else student_tok
  if kd_cfg is not None and needs_teacher:
    check_vocabularies(kd_cfg, student_tok, teacher_tok)
  student = _load_hf_model(student_spec, student_tok, C.train_config(config).seed)
  teacher = None
  if needs_teacher:
    teacher = hf.from_pretrained(teacher_spec.path,
                                 **_model_overrides(teacher_spec, teacher_tok))
  train_records, dev_records, dev_examples = read_records(config)
  d = C.data_config(config)
  if d.dataset in sources.FILE_DATASETS:
    toks = (student_tok, teacher_tok)
    max_prompt = C.pipeline_config(config).max_prompt
    train_records = drop_long_prompts(train_records, toks, max_prompt, d.on_error, d.train_file)
    dev_records = drop_long_prompts(dev_records, toks, max_prompt, d.on_error, d.dev_file)
  return Problem(student_tok, teacher_tok, student, teacher, train_records, dev_records,
                 dev_examples)


# --------------------------------------------------------------------------------------------
# Vocabulary map and pipelines
# --------------------------------------------------------------------------------------------


def mined_vocab_map(method: Method, problem: Problem) -> np.ndarray | None:
  """The MinED teacher→student map [Vt] int32 when the method needs it (else None); Vt is the
  teacher's LM-head rows."""
  if not method.needs_vocab_map:
    return None
  return build_mined_vocab_map(problem.teacher_tok, problem.student_tok,
                               teacher_vocab_size=problem.teacher.config.vocab_size)


def build_pipelines(problem: Problem, pipe_cfg: PipelineConfig, vocab_map: np.ndarray | None,
                    *, with_dev: bool, teacher_cache: TeacherCache | None = None
                    ) -> tuple[Pipeline, Pipeline | None]:
  """The training pipeline (`pipe_cfg`: this host's batch and epochs; its rows carry the
  teacher's cached states with `teacher_cache`) and, with `with_dev` and dev records, the dev
  pipeline (one unshuffled pass, last batch padded, in-process, no cache: the dev loss runs the
  teacher)."""
  pipeline = Pipeline(problem.train_records, problem.student_tok, problem.teacher_tok,
                      pipe_cfg, mined_vocab_map=vocab_map, teacher_cache=teacher_cache)
  dev_pipeline = None
  if problem.dev_records and with_dev:
    dev_cfg = dataclasses.replace(pipe_cfg, shuffle=False, num_epochs=1, drop_remainder=False,
                                  worker_count=0)
    dev_pipeline = Pipeline(problem.dev_records, problem.student_tok, problem.teacher_tok,
                            dev_cfg, mined_vocab_map=vocab_map)
  return pipeline, dev_pipeline
