"""The evaluation protocol (docs/method.md §5): prompts -> batched sampling -> texts -> scores.

    settings = SamplingSettings()                      # T=1, top-p 1, top-k off, ngram 6, 512/256
    gen = TextGenerator(model, tokenizer, settings, batch_size=16)
    texts = gen.generate(prompts, seed=10)             # decoded, cut at EOS, stripped
    sets = {"dolly/valid": read_examples("dolly", "valid")}
    results = evaluate_sets(model, tokenizer, sets, seeds=(10, 20, 30, 40, 50), workdir="run/eval")
    best = dev_rouge_l(model, tokenizer, dev_examples)  # for best-checkpoint selection

* Prompts: tokenized with no special tokens added; one longer than `max_prompt_length` keeps its
  **last** tokens (`truncate_side="left"`, default) or its first (`"right"`); then the BOS is
  put first when `special_tokens` says so (data/tokenize.py `bos_ids`: "convention" = iff the
  tokenizer adds one itself; "reference" = never), not counted in `max_prompt_length`. Rows are
  left-padded with the tokenizer's pad id (else its EOS, else the model config's); the batch
  width is the longest prompt rounded up to `prompt_bucket`, and a short last batch is filled
  with copies of its last prompt whose outputs are dropped.
* Generation: `max_new_tokens` (default max_length - max_prompt_length) tokens, stopping at any
  EOS id of the model config or the tokenizer. Text = the tokens before the first EOS id,
  decoded with special tokens kept, cut at the first EOS string, stripped.
* Seeds: batch k of a call with seed s uses `batch_seed(s, k)` = (s * 1000003 + k) mod 2**31.
* Metrics: ROUGE-L F x100 (rouge.py), GSM8K exact match x100 (gsm8k.py); over the seeds the
  mean and the population std (ddof=0).
* Sharding: with `mesh=`, prompt arrays are placed on `P(data_axis)` and parameters replicated;
  every process runs the same global batches (the same prompts and seeds), gathers the
  generated rows in global order (a mesh over several processes holds each process's rows
  only) and only process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from cot2align_jax.data.records import Example, plain_prompt, render_prompt
from cot2align_jax.data.sources import DATASETS
from cot2align_jax.data.tokenize import bos_ids, check_special_tokens, starts_with_bos
from cot2align_jax.evaluation import gsm8k as gsm8k_metric
from cot2align_jax.evaluation.rouge import rouge_l
from cot2align_jax.models import generation as G
from cot2align_jax.models.generation import GenerationConfig

log = logging.getLogger(__name__)

DEFAULT_SEEDS = (10, 20, 30, 40, 50)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """How prompts are cut and tokens drawn (defaults: docs/method.md §2 and §5)."""

  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  no_repeat_ngram_size: int = 6
  greedy: bool = False
  max_length: int = 512
  max_prompt_length: int = 256
  max_new_tokens: int | None = None       # None: max_length - max_prompt_length
  truncate_side: Literal["left", "right"] = "left"   # left: keep the prompt's last tokens
  prompt_bucket: int = 64
  special_tokens: str = "convention"     # BOS before the prompt: data/tokenize.py bos_ids

  def __post_init__(self):
    check_special_tokens(self.special_tokens)
    if self.truncate_side not in ("left", "right"):
      raise ValueError(f"truncate_side must be 'left' or 'right', got {self.truncate_side!r}")
    if self.max_prompt_length < 1 or self.prompt_bucket < 1:
      raise ValueError("max_prompt_length and prompt_bucket must be >= 1")
    if self.new_tokens < 1:
      raise ValueError(f"no room to generate: max_length={self.max_length}, "
                       f"max_prompt_length={self.max_prompt_length}, "
                       f"max_new_tokens={self.max_new_tokens}")

  @property
  def new_tokens(self) -> int:
    if self.max_new_tokens is not None:
      return int(self.max_new_tokens)
    return self.max_length - self.max_prompt_length

  def generation_config(self, eos_ids: Sequence[int], pad_id: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=self.new_tokens, temperature=self.temperature,
                            greedy=self.greedy, top_k=self.top_k, top_p=self.top_p,
                            no_repeat_ngram_size=self.no_repeat_ngram_size,
                            eos_token_ids=tuple(eos_ids), pad_token_id=int(pad_id))


def to_host(x) -> np.ndarray:
  """A (possibly multi-process) array as numpy on this host, rows in global order."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def batch_seed(seed: int, batch_index: int) -> int:
  """The generation seed of batch `batch_index` of a call with `seed`."""
  return (int(seed) * 1000003 + int(batch_index)) % (2 ** 31)


def cut_at_eos(text: str, eos_strings: Sequence[str]) -> str:
  """`text` up to the first occurrence of any EOS string."""
  cut = len(text)
  for s in eos_strings:
    if s:
      i = text.find(s)
      if i >= 0:
        cut = min(cut, i)
  return text[:cut]


@dataclasses.dataclass
class BatchOutput:
  texts: list[str]          # one per real row
  token_ids: list[list[int]]  # generated ids before the first EOS
  n_tokens: int             # real generated tokens (EOS included), real rows only
  seconds: float


class TextGenerator:
  """Batched left-padded sampling of texts from string prompts with one model/tokenizer."""

  def __init__(self, model, tokenizer, settings: SamplingSettings | None = None, *,
               batch_size: int = 8, mesh: jax.sharding.Mesh | None = None,
               data_axis: str = "data"):
    self.model = model
    self.tokenizer = tokenizer
    self.settings = settings or SamplingSettings()
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.batch_size = int(batch_size)
    mcfg = model.config
    eos = list(mcfg.eos_ids)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None and tok_eos not in eos and 0 <= tok_eos < mcfg.vocab_size:
      eos.append(int(tok_eos))
    self.eos_ids = tuple(eos)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
      pad = tok_eos
    if pad is None:
      pad = mcfg.pad_token_id if mcfg.pad_token_id is not None else (eos[0] if eos else 0)
    self.pad_id = int(pad)
    self.eos_strings = tuple(s for s in {getattr(tokenizer, "eos_token", None)} |
                             {tokenizer.convert_ids_to_tokens(i) for i in self.eos_ids
                              if i < len(tokenizer)} if isinstance(s, str) and s)
    self.gen_cfg = self.settings.generation_config(self.eos_ids, self.pad_id)
    self.bos = bos_ids(tokenizer, self.settings.special_tokens)
    budget = len(self.bos) + self.settings.max_prompt_length + self.settings.new_tokens
    if budget > mcfg.max_position_embeddings:
      raise ValueError(f"{'BOS + ' if self.bos else ''}max_prompt_length="
                       f"{self.settings.max_prompt_length} + "
                       f"{self.settings.new_tokens} new tokens exceeds the model's "
                       f"max_position_embeddings={mcfg.max_position_embeddings}")
    self.mesh, self.data_axis = mesh, data_axis
    self._graphdef = self._state = None
    if mesh is not None:
      if data_axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {data_axis!r} (axes: {tuple(mesh.shape)})")
      if self.batch_size % mesh.shape[data_axis]:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the mesh's "
                         f"{data_axis!r} axis size {mesh.shape[data_axis]}")
      graphdef, state = nnx.split(model)
      mesh_devices = set(mesh.devices.flat)
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

      def place(x):
        on_mesh = isinstance(x, jax.Array) and set(x.sharding.device_set) == mesh_devices
        return x if on_mesh else jax.device_put(x, replicated)

      self._graphdef, self._state = graphdef, jax.tree.map(place, state)

  # -- tokens -------------------------------------------------------------------------------

  def encode(self, prompt: str) -> list[int]:
    """Prompt ids (no special tokens added by the tokenizer), truncated to max_prompt_length per
    `truncate_side`, then the BOS (`self.bos`, [] or one id) put first: ≤ max_prompt_length + 1
    ids."""
    prompt = render_prompt(prompt, self.tokenizer)     # a ChatPrompt: the model's template
    ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    n = self.settings.max_prompt_length
    if len(ids) > n:
      ids = ids[-n:] if self.settings.truncate_side == "left" else ids[:n]
    if not ids:
      raise ValueError(f"prompt {prompt[:40]!r} has no tokens")
    return ([] if starts_with_bos(prompt, self.tokenizer) else list(self.bos)) + ids

  def pad_batch(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids, mask [batch_size, width] (short batches filled with the last row)."""
    if not rows or len(rows) > self.batch_size:
      raise ValueError(f"need 1..{self.batch_size} rows, got {len(rows)}")
    rows = list(rows) + [rows[-1]] * (self.batch_size - len(rows))
    longest = max(len(r) for r in rows)
    bucket = self.settings.prompt_bucket
    width = min(max(self.settings.max_prompt_length, longest),
                int(math.ceil(longest / bucket) * bucket))
    ids = np.full((len(rows), width), self.pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
      ids[i, width - len(r):] = r
      mask[i, width - len(r):] = 1
    return ids, mask

  def decode(self, tokens: Sequence[int]) -> tuple[str, list[int]]:
    """(text cut at EOS and stripped, ids before the first EOS id)."""
    ids = []
    for t in tokens:
      if int(t) in self.eos_ids:
        break
      ids.append(int(t))
    text = self.tokenizer.decode(ids, skip_special_tokens=False)
    return cut_at_eos(text, self.eos_strings).strip(), ids

  # -- generation ---------------------------------------------------------------------------

  def _run(self, ids: np.ndarray, mask: np.ndarray, seed: int) -> G.GenerationOutput:
    if self.mesh is None:
      return G.generate(self.model, ids, mask, self.gen_cfg, seed=seed)
    ids, mask, cfg = G._check_inputs(self.model, ids, mask, self.gen_cfg)
    rows = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(self.data_axis))
    tokens, gen_mask, steps = G._generate_jit(
        self._graphdef, self._state, jax.device_put(ids, rows), jax.device_put(mask, rows),
        jax.random.key(seed), cfg=G._static(cfg))
    return G.GenerationOutput(tokens, gen_mask, gen_mask.sum(-1), steps)

  def generate_ids(self, rows: Sequence[Sequence[int]], seed: int) -> BatchOutput:
    """One batch (<= batch_size rows of prompt ids) with generation seed `seed`."""
    ids, mask = self.pad_batch(rows)
    start = time.perf_counter()
    out = self._run(ids, mask, seed)
    tokens, lengths = to_host(out.tokens), to_host(out.lengths)
    seconds = time.perf_counter() - start
    texts, kept = [], []
    for b in range(len(rows)):
      text, gen_ids = self.decode(tokens[b, :lengths[b]])
      texts.append(text)
      kept.append(gen_ids)
    return BatchOutput(texts, kept, int(lengths[:len(rows)].sum()), seconds)

  def generate(self, prompts: Sequence[str], seed: int, *,
               on_batch: Callable[[int, BatchOutput], None] | None = None) -> list[str]:
    """Texts for all prompts; batch k uses `batch_seed(seed, k)`."""
    encoded = [self.encode(p) for p in prompts]
    texts: list[str] = []
    for k, start in enumerate(range(0, len(encoded), self.batch_size)):
      out = self.generate_ids(encoded[start:start + self.batch_size], batch_seed(seed, k))
      texts.extend(out.texts)
      if on_batch is not None:
        on_batch(k, out)
    return texts


# ---------------------------------------------------------------------------------------------
# Scoring and reports
# ---------------------------------------------------------------------------------------------

def metric_for(examples: Sequence[Example]) -> str:
  """The registered metric of the examples' data set ("exact_match" for GSM8K and the
  synthetic arithmetic set), else "rougeL"."""
  spec = DATASETS.get(examples[0].dataset) if examples else None
  return spec.metric if spec is not None else "rougeL"


def score_texts(examples: Sequence[Example], texts: Sequence[str],
                metric: str | None = None) -> list[float]:
  """Per-example scores ×100 (ROUGE-L F max over references, or GSM8K exact match)."""
  if len(examples) != len(texts):
    raise ValueError(f"{len(examples)} examples but {len(texts)} texts")
  metric = metric or metric_for(examples)
  if metric == "exact_match":
    return [100.0 * gsm8k_metric.exact_match(t, ex.output) for ex, t in zip(examples, texts)]
  if metric == "rougeL":
    return [rouge_l(t, list(ex.outputs)) for ex, t in zip(examples, texts)]
  raise ValueError(f"unknown metric {metric!r}")


@dataclasses.dataclass
class SetResult:
  """One test set over all seeds."""

  name: str
  metric: str
  n: int
  seeds: list[int]
  scores: list[float]        # corpus score per seed (×100)
  mean: float
  std: float                 # population std over seeds (ddof=0)
  generated_tokens: int = 0
  seconds: float = 0.0

  @property
  def tokens_per_s(self) -> float:
    return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def _is_writer() -> bool:
  return jax.process_index() == 0


def evaluate_set(generator: TextGenerator, name: str, examples: Sequence[Example],
                 seeds: Sequence[int] = DEFAULT_SEEDS, *,
                 generations_dir: str | Path | None = None,
                 prompt_fn: Callable[[Example], str] | None = None) -> SetResult:
  """Generates on the plain prompt of every example for each seed and scores the texts.
  `prompt_fn(example)`: the prompt (default data.records.plain_prompt, the Alpaca template)."""
  if not examples:
    raise ValueError(f"{name}: no examples")
  if not seeds:
    raise ValueError("need at least one seed")
  metric = metric_for(examples)
  prompts = [(prompt_fn or plain_prompt)(ex) for ex in examples]
  per_seed, tokens, seconds = [], 0, 0.0
  for seed in seeds:
    stats = {"tokens": 0, "seconds": 0.0}

    def on_batch(_, out, stats=stats):
      stats["tokens"] += out.n_tokens
      stats["seconds"] += out.seconds

    texts = generator.generate(prompts, seed, on_batch=on_batch)
    scores = score_texts(examples, texts, metric)
    corpus = float(np.mean(scores))
    per_seed.append(corpus)
    tokens += stats["tokens"]
    seconds += stats["seconds"]
    log.info("%s seed %d: %s %.2f (%d examples, %.0f tok/s)", name, seed, metric, corpus,
             len(examples), stats["tokens"] / max(stats["seconds"], 1e-9))
    if generations_dir is not None and _is_writer():
      path = Path(generations_dir) / f"{name.replace('/', '_')}_seed{seed}.jsonl"
      path.parent.mkdir(parents=True, exist_ok=True)
      with path.open("w", encoding="utf-8") as f:
        for ex, text, score in zip(examples, texts, scores):
          f.write(json.dumps({"id": ex.id, "prediction": text, "score": score},
                             ensure_ascii=False) + "\n")
  return SetResult(name=name, metric=metric, n=len(examples), seeds=[int(s) for s in seeds],
                   scores=per_seed, mean=float(np.mean(per_seed)), std=float(np.std(per_seed)),
                   generated_tokens=tokens, seconds=seconds)


def results_markdown(results: Sequence[SetResult]) -> str:
  """A Markdown table: set, metric, n, mean ± std, per-seed scores."""
  lines = ["| test set | metric | n | mean ± std | per seed |", "|---|---|---|---|---|"]
  for r in results:
    per = ", ".join(f"{s}: {v:.2f}" for s, v in zip(r.seeds, r.scores))
    lines.append(f"| {r.name} | {r.metric} | {r.n} | {r.mean:.2f} ± {r.std:.2f} | {per} |")
  return "\n".join(lines) + "\n"


def plot_results(results: Sequence[SetResult], path: str | Path, title: str = "") -> Path:
  """Bar chart of the mean score per set with ±std error bars, written as PNG."""
  # matplotlib: optional and slow to import, needed only for this plot.
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after use("Agg"): no display needed
  names = [r.name for r in results]
  fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 1.5), 3.6))
  bars = ax.bar(range(len(names)), [r.mean for r in results], yerr=[r.std for r in results],
                capsize=4, color="#4c72b0")
  for bar, r in zip(bars, results):
    ax.annotate(f"{r.mean:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels([f"{r.name}\n({'EM' if r.metric == 'exact_match' else 'ROUGE-L'})"
                      for r in results], fontsize=8)
  ax.set_ylabel("score (×100), mean ± std over seeds")
  top = max([r.mean + r.std for r in results] + [1.0])
  ax.set_ylim(0, min(100.0, top * 1.15) if top < 100 else top * 1.05)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


@dataclasses.dataclass
class EvalReport:
  results: list[SetResult]
  json_path: Path | None
  markdown_path: Path | None
  plot_path: Path | None


def write_results(results: Sequence[SetResult], workdir: str | Path, *,
                  meta: Mapping[str, Any] | None = None, prefix: str = "eval"
                  ) -> tuple[Path, Path, Path]:
  """`{prefix}_results.json`, `{prefix}_results.md` and `{prefix}_results.png` in workdir."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  payload = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
             "meta": dict(meta or {}),
             "results": [dict(dataclasses.asdict(r), tokens_per_s=r.tokens_per_s)
                         for r in results]}
  jpath = workdir / f"{prefix}_results.json"
  jpath.write_text(json.dumps(payload, indent=2) + "\n")
  mpath = workdir / f"{prefix}_results.md"
  mpath.write_text(results_markdown(results))
  ppath = plot_results(results, workdir / f"{prefix}_results.png",
                       title=str((meta or {}).get("model", "")))
  return jpath, mpath, ppath


def evaluate_sets(model, tokenizer, sets: Mapping[str, Sequence[Example]],
                  seeds: Sequence[int] = DEFAULT_SEEDS, *, workdir: str | Path | None = None,
                  settings: SamplingSettings | None = None, batch_size: int = 8,
                  max_examples: int | None = None, mesh: jax.sharding.Mesh | None = None,
                  data_axis: str = "data", save_generations: bool = True,
                  meta: Mapping[str, Any] | None = None,
                  prompt_fn: Callable[[Example], str] | None = None) -> EvalReport:
  """Evaluates every set ({"dolly/valid": examples, ...}) for every seed.

  With a workdir, writes eval_results.{json,md,png} there (and per-seed generations under
  workdir/generations/ when save_generations). `max_examples` keeps each set's first rows.
  """
  generator = TextGenerator(model, tokenizer, settings, batch_size=batch_size, mesh=mesh,
                            data_axis=data_axis)
  gen_dir = Path(workdir) / "generations" if workdir is not None and save_generations else None
  results = []
  for name, examples in sets.items():
    examples = list(examples)[:max_examples] if max_examples else list(examples)
    results.append(evaluate_set(generator, name, examples, seeds, generations_dir=gen_dir,
                                prompt_fn=prompt_fn))
  paths = (None, None, None)
  if workdir is not None and _is_writer():
    info = {"seeds": [int(s) for s in seeds], "batch_size": batch_size,
            "max_examples": max_examples,
            "sampling": dataclasses.asdict(generator.settings), **dict(meta or {})}
    paths = write_results(results, workdir, meta=info)
  return EvalReport(results, *paths)


def dev_rouge_l(model, tokenizer, examples: Sequence[Example], *, seed: int = 10,
                settings: SamplingSettings | None = None, batch_size: int = 8,
                max_examples: int | None = None, mesh: jax.sharding.Mesh | None = None,
                data_axis: str = "data",
                prompt_fn: Callable[[Example], str] | None = None) -> float:
  """Corpus ROUGE-L (×100) of one sampled generation pass on the dev examples (seed 10, the
  reference's training seed): the score used to keep the best checkpoint."""
  generator = TextGenerator(model, tokenizer, settings, batch_size=batch_size, mesh=mesh,
                            data_axis=data_axis)
  examples = list(examples)[:max_examples] if max_examples else list(examples)
  result = evaluate_set(generator, "dev", examples, (seed,), prompt_fn=prompt_fn)
  return result.mean
