"""A tiny cross-tokenizer distillation problem, built in a second with no downloads.

    prob = tiny_problem()                        # tokenizers, model configs, records
    batches = prob.batches(batch_size=8, n=4)    # numpy batches (data/spec.py), one bucket
    student, teacher = prob.student(seed=0), prob.teacher(seed=1)

* Corpus: arithmetic word problems ("Ann has 3 apples. She buys 5 more. How many apples does
  she have now?") with a worked step as the rationale ("Ann has 3 apples and gets 5 more, so
  3 + 5 = 8.") and the number as the output.
* Two different tokenizers trained on that corpus with `tokenizers`: the student's is a
  byte-level BPE (GPT-2 style, "Ġ" space marker, 384 entries), the teacher's a BPE over the
  SentencePiece "▁" Metaspace (Llama style, 200 entries), so tokens split differently. Both are wrapped
  as Hugging Face fast tokenizers (EOS "</s>", pad "<pad>") so the data pipeline and the
  alignment code treat them like real ones.
* Models: a 2-layer Qwen2-like student (d 32, q/k/v biases, so the weight-decay mask has biases
  to exclude) and a 2-layer Llama-like teacher (d 48), vocabularies rounded up to a multiple of 8.
* Records (pipeline dicts): every example gives a plain record (no pair); a fraction
  (`cot_fraction`) also gives a CoT record (CoT prompt + rationale + "Therefore, the answer is:
  N", paired with the plain view), so batches mix rows with and without pairs.
  `tiny_examples` returns records.Example objects and rationales for `records.build_records`
  (the Alpaca templates; longer sequences) instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from cot2align_jax.models.config import ModelConfig

NAMES = ("Ann", "Ben", "Cat", "Dan", "Eve", "Fay", "Gus", "Hal")
PRONOUNS = {"Ann": "she", "Ben": "he", "Cat": "she", "Dan": "he", "Eve": "she", "Fay": "she",
            "Gus": "he", "Hal": "he"}
OBJECTS = ("apples", "pens", "books", "coins", "eggs", "cards")
PLAIN_PROMPT = "Q: {question}\nA:"
COT_PROMPT = "Q: {question}\nA: Let's think step by step."
ANSWER_JOINER = " Therefore, the answer is:"


def make_problem_text(rng: np.random.RandomState) -> dict[str, str]:
  """One problem: {"question", "rationale", "answer"}."""
  name = NAMES[rng.randint(len(NAMES))]
  obj = OBJECTS[rng.randint(len(OBJECTS))]
  pron = PRONOUNS[name]
  a, b = int(rng.randint(1, 10)), int(rng.randint(1, 10))
  if rng.rand() < 0.5:
    q = (f"{name} has {a} {obj}. {pron.capitalize()} buys {b} more. "
         f"How many {obj} does {pron} have now?")
    r = f"{name} has {a} {obj} and gets {b} more, so {a} + {b} = {a + b}."
    ans = a + b
  else:
    a, b = max(a, b), min(a, b)
    q = (f"{name} has {a} {obj}. {pron.capitalize()} gives away {b}. "
         f"How many {obj} does {pron} have now?")
    r = f"{name} has {a} {obj} and gives away {b}, so {a} - {b} = {a - b}."
    ans = a - b
  return {"question": q, "rationale": r, "answer": str(ans)}


def make_corpus(n: int, seed: int = 0) -> list[dict[str, str]]:
  rng = np.random.RandomState(seed)
  return [make_problem_text(rng) for _ in range(n)]


def _texts(problems) -> list[str]:
  out = []
  for p in problems:
    out.append(PLAIN_PROMPT.format(question=p["question"]) + " " + p["answer"])
    out.append(COT_PROMPT.format(question=p["question"]) + " " + p["rationale"] +
               ANSWER_JOINER + " " + p["answer"])
  return out


@functools.lru_cache(maxsize=4)
def train_tokenizers(student_vocab: int = 384, teacher_vocab: int = 200, seed: int = 0,
                     n_corpus: int = 2000):
  """(student byte-level BPE "Ġ", teacher SentencePiece-style BPE "▁") HF fast tokenizers
  trained on the corpus (the teacher's has no byte fallback; the corpus is ASCII)."""
  from cot2align_jax.data import toy_tokenizers as tt  # pylint: disable=g-import-not-at-top
  texts = _texts(make_corpus(n_corpus, seed))
  return (tt.train_byte_bpe(texts, student_vocab, name="tiny-student-bpe"),
          tt.train_metaspace_bpe(texts, teacher_vocab, name="tiny-teacher-metaspace-bpe"))


def _round8(n: int) -> int:
  return (n + 7) // 8 * 8


def student_config(vocab_size: int, d: int = 32, layers: int = 2) -> ModelConfig:
  """A Qwen2-like student: RMSNorm, SwiGLU, RoPE, q/k/v biases, tied embeddings."""
  return ModelConfig(family="llama", model_type="qwen2", vocab_size=_round8(vocab_size),
                     hidden_size=d, num_layers=layers, num_heads=2, num_kv_heads=2,
                     head_dim=d // 2, intermediate_size=2 * d, max_position_embeddings=256,
                     qkv_bias=True, tie_word_embeddings=True, eos_token_id=1, pad_token_id=0)


def teacher_config(vocab_size: int, d: int = 48, layers: int = 2) -> ModelConfig:
  """A Llama-like teacher: 4 query heads over 2 KV heads, untied LM head."""
  return ModelConfig(family="llama", model_type="llama", vocab_size=_round8(vocab_size),
                     hidden_size=d, num_layers=layers, num_heads=4, num_kv_heads=2,
                     head_dim=d // 4, intermediate_size=2 * d, max_position_embeddings=256,
                     tie_word_embeddings=False, eos_token_id=1, pad_token_id=0)


@dataclasses.dataclass
class TinyProblem:
  student_tok: Any
  teacher_tok: Any
  student_cfg: ModelConfig
  teacher_cfg: ModelConfig
  records: list[dict[str, Any]]
  bucket: int = 64

  def student(self, seed: int = 0):
    from cot2align_jax.models import create_model  # pylint: disable=g-import-not-at-top
    return create_model(self.student_cfg, seed)

  def teacher(self, seed: int = 1):
    from cot2align_jax.models import create_model  # pylint: disable=g-import-not-at-top
    return create_model(self.teacher_cfg, seed)

  def pipeline(self, batch_size: int = 8, *, seed: int = 0, shuffle: bool = True,
               num_epochs: int | None = None, alignment: tuple[str, ...] = (), records=None):
    """The project's grain pipeline over the records, every batch padded to one bucket."""
    from cot2align_jax.data.pipeline import Pipeline, PipelineConfig  # pylint: disable=g-import-not-at-top
    cfg = PipelineConfig(batch_size=batch_size, seed=seed, shuffle=shuffle,
                         num_epochs=num_epochs, buckets=(self.bucket,), max_prompt=self.bucket // 2,
                         max_len=self.bucket + 1, drop_remainder=True, alignment=alignment,
                         shard_index=0, shard_count=1)
    return Pipeline(self.records if records is None else records, self.student_tok,
                    self.teacher_tok, cfg)

  def batches(self, batch_size: int = 8, n: int = 4, *, seed: int = 0,
              alignment: tuple[str, ...] = (), records=None) -> list[dict[str, np.ndarray]]:
    """The first `n` batches of the pipeline (numpy dicts, data/spec.py)."""
    it = iter(self.pipeline(batch_size, seed=seed, alignment=alignment, records=records))
    return [next(it) for _ in range(n)]


def make_records(problems, cot_fraction: float = 0.5, seed: int = 0) -> list[dict[str, Any]]:
  """Plain records for all problems plus CoT records (has_pair) for a `cot_fraction` of them."""
  rng = np.random.RandomState(seed + 1)
  out = []
  for i, p in enumerate(problems):
    plain = PLAIN_PROMPT.format(question=p["question"])
    answer = " " + p["answer"]
    out.append({"prompt": plain, "response": answer, "pair_prompt": "", "pair_response": "",
                "has_pair": False, "example_index": i})
    if rng.rand() < cot_fraction:
      out.append({"prompt": COT_PROMPT.format(question=p["question"]),
                  "response": " " + p["rationale"] + ANSWER_JOINER + answer,
                  "pair_prompt": plain, "pair_response": answer, "has_pair": True,
                  "example_index": i})
  return out


def tiny_problem(n_examples: int = 64, *, cot_fraction: float = 0.5, seed: int = 0,
                 student_d: int = 32, teacher_d: int = 48, layers: int = 2,
                 bucket: int = 64) -> TinyProblem:
  """The tiny problem (see the module doc). Tokenizers are trained once per process."""
  s_tok, t_tok = train_tokenizers(seed=0)
  problems = make_corpus(n_examples, seed=1000 + seed)
  return TinyProblem(student_tok=s_tok, teacher_tok=t_tok,
                     student_cfg=student_config(len(s_tok), student_d, layers),
                     teacher_cfg=teacher_config(len(t_tok), teacher_d, layers),
                     records=make_records(problems, cot_fraction, seed), bucket=bucket)


def tiny_examples(n: int = 32, seed: int = 0):
  """(list of records.Example, {id: rationale}) for records.build_records (Alpaca templates;
  the arithmetic question is the input, so the default CoT rule selects every example)."""
  from cot2align_jax.data.records import Example  # pylint: disable=g-import-not-at-top
  examples, rationales = [], {}
  for i, p in enumerate(make_corpus(n, seed=1000 + seed)):
    ex = Example(id=f"tiny/train/{i}", instruction="Solve the arithmetic word problem.",
                 input=p["question"], outputs=(p["answer"],), dataset="tiny", split="train")
    examples.append(ex)
    rationales[ex.id] = p["rationale"]
  return examples, rationales


@dataclasses.dataclass
class TinySetup:
  """Everything a train step on the tiny problem needs."""
  method: Any
  kd_cfg: Any
  opt_cfg: Any
  optimizer: Any
  state: Any
  student_graphdef: Any
  teacher_graphdef: Any
  proj_graphdef: Any
  teacher_params: Any

  def train_step(self, **kw):
    from cot2align_jax.training.steps import make_train_step  # pylint: disable=g-import-not-at-top
    kw.setdefault("accumulate", self.opt_cfg.accumulate)
    return make_train_step(self.student_graphdef, self.teacher_graphdef, self.proj_graphdef,
                           self.method, self.kd_cfg, self.optimizer, **kw)

  def eval_step(self, **kw):
    from cot2align_jax.training.steps import make_eval_step  # pylint: disable=g-import-not-at-top
    return make_eval_step(self.student_graphdef, self.teacher_graphdef, self.proj_graphdef,
                          self.method, self.kd_cfg, **kw)


def make_setup(prob: TinyProblem, kd_cfg, opt_cfg, *, student=None, teacher=None,
               seed: int = 0) -> TinySetup:
  """Method, projectors, optimizer, train state and teacher params for `kd_cfg` on `prob`.
  `student` / `teacher`: modules to reuse (their parameters are copied, never donated)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from cot2align_jax.losses.methods import build_projectors, method_from_config  # pylint: disable=g-import-not-at-top
  from cot2align_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  method = method_from_config(kd_cfg)
  student = student if student is not None else prob.student(seed)
  teacher = teacher if teacher is not None else prob.teacher(seed + 1)
  projectors = build_projectors(method, prob.student_cfg.hidden_size,
                                prob.teacher_cfg.hidden_size, rngs=nnx.Rngs(seed + 2))
  optimizer = state_lib.make_optimizer(opt_cfg)
  state, (s_gd, p_gd) = state_lib.init_state(student, projectors, opt_cfg, seed,
                                             optimizer=optimizer)
  state = jax.tree.map(jnp.copy, state)
  t_gd, t_params = state_lib.split_params(teacher)
  return TinySetup(method, kd_cfg, opt_cfg, optimizer, state, s_gd, t_gd, p_gd,
                   jax.tree.map(jnp.copy, t_params))


# --------------------------------------------------------------------------------------------
# The tiny problem as a data set (generate_cot / evaluate --config=configs/tiny.py)
# --------------------------------------------------------------------------------------------

TINY_SPLITS = ("train", "dev", "test")
TINY_INSTRUCTION = "Solve the arithmetic word problem."
TINY_DEFAULT_SIZES = {"train": 64, "dev": 16, "test": 32}


def tiny_split_examples(split: str, n: int | None = None, seed: int = 0):
  """records.Example objects of one split of the tiny problem (ids "tiny/<split>/<i>").

  The problems are those of the training loop's tiny problem: train = `tiny_problem(n, seed=s)`
  (corpus seed 1000 + s), dev = the loop's dev problems (1000 + s + 1), test = 1000 + s + 2.
  The question is the example's input; the answer its single output. Prompts: tiny_plain_prompt /
  tiny_cot_prompt (short, unlike the Alpaca templates of data.records)."""
  from cot2align_jax.data.records import Example  # pylint: disable=g-import-not-at-top
  if split not in TINY_SPLITS:
    raise KeyError(f"tiny: unknown split {split!r}; known: {', '.join(TINY_SPLITS)}")
  n = int(n or TINY_DEFAULT_SIZES[split])
  problems = make_corpus(n, seed=1000 + seed + TINY_SPLITS.index(split))
  return [Example(id=f"tiny/{split}/{i}", instruction=TINY_INSTRUCTION, input=p["question"],
                  outputs=(p["answer"],), dataset="tiny", split=split)
          for i, p in enumerate(problems)]


def tiny_plain_prompt(example) -> str:
  """The tiny problem's plain prompt of an Example ("Q: <question>\\nA:")."""
  return PLAIN_PROMPT.format(question=example.input)


def tiny_cot_prompt(example) -> str:
  """The tiny problem's CoT prompt of an Example ("... A: Let's think step by step.")."""
  return COT_PROMPT.format(question=example.input)


def tiny_records(examples, rationales=None) -> list[dict[str, Any]]:
  """Pipeline records like `make_records`, but with CoT records exactly for the examples that
  have a rationale in `rationales` ({id: text}, e.g. the JSONL generate_cot writes)."""
  rationales = rationales or {}
  out = []
  for i, ex in enumerate(examples):
    plain = tiny_plain_prompt(ex)
    answer = " " + ex.outputs[0]
    out.append({"prompt": plain, "response": answer, "pair_prompt": "", "pair_response": "",
                "has_pair": False, "example_index": i})
    text = rationales.get(ex.id)
    if text is not None:
      out.append({"prompt": tiny_cot_prompt(ex),
                  "response": " " + text.strip() + ANSWER_JOINER + answer,
                  "pair_prompt": plain, "pair_response": answer, "has_pair": True,
                  "example_index": i})
  return out
