"""Examples, prompt templates, views and plain/CoT records (docs/method.md §2).

An `Example` is one row of an instruction set: instruction, input (may be ""), and one or
more reference outputs (training uses the first). `build_records` makes from each example

* always a **plain record**: main view = plain prompt + gold answer, no paired view;
* when the CoT rule selects the example *and* a rationale exists for its id, a **CoT record**:
  main view = CoT prompt + `rationale + "\nTherefore, the answer is: " + gold`, paired view =
  plain prompt + gold, and `has_pair=True`.

Rules (tests/data/test_records.py): "non-empty input" means `input != ""` (it also picks the
plain template with or without the Input section); an example whose first reference is blank
makes no record (listed in `BuildReport.empty_output`); a blank rationale counts as missing;
selected examples without a rationale keep their plain record (`missing_rationale`, a warning).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, Union

log = logging.getLogger(__name__)

# Byte-exact Alpaca-style templates (docs/method.md §2). The CoT template always has the Input
# section.
PLAIN_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PLAIN_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
COT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response with reasoning step by step "
    "that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\nLet's think step by step.\n")
COT_ANSWER_JOINER = "\nTherefore, the answer is: "
# The short question/answer template of the synthetic sets (data/arith.py): the response
# starts with a space (" 6") so that the prompt never ends in whitespace.
QA_PLAIN_TEMPLATE = "Q: {input}\nA:"
QA_COT_TEMPLATE = "Q: {input}\nA: Let's think step by step."

RecordKind = Literal["plain", "cot"]
CotRule = Union[Literal["nonempty_input", "all", "none"], Callable[["Example"], bool]]


class DataError(ValueError):
  """Bad input data: a malformed line, a missing field, an unknown id, a missing file."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One row of an instruction set.

  `id` is stable across runs: the row's own "id" field when it has one, else
  "{dataset}/{split}/{row index}" (0-based line number in the source file). `messages`: the
  (role, content) turns before the response when the row was a chat (data/files.py), else ().
  """

  id: str
  instruction: str
  input: str
  outputs: tuple[str, ...]
  dataset: str
  split: str
  messages: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    if not isinstance(self.outputs, tuple) or not self.outputs:
      raise DataError(f"example {self.id!r}: outputs must be a non-empty tuple of str")
    for field in ("id", "instruction", "input", "dataset", "split"):
      if not isinstance(getattr(self, field), str):
        raise DataError(f"example {self.id!r}: {field} must be a str")
    if not all(isinstance(o, str) for o in self.outputs):
      raise DataError(f"example {self.id!r}: every output must be a str")

  @property
  def output(self) -> str:
    """The reference used for training (the first one)."""
    return self.outputs[0]


def has_input(example: Example) -> bool:
  """Whether the example has a non-empty input (exact test, no stripping)."""
  return example.input != ""


def plain_prompt(example: Example) -> str:
  """The plain Alpaca prompt: with the Input section iff the input is non-empty."""
  if has_input(example):
    return PLAIN_TEMPLATE_WITH_INPUT.format(instruction=example.instruction, input=example.input)
  return PLAIN_TEMPLATE_NO_INPUT.format(instruction=example.instruction)


def cot_prompt(example: Example) -> str:
  """The CoT prompt (always with the Input section, possibly empty)."""
  return COT_TEMPLATE.format(instruction=example.instruction, input=example.input)


def cot_response(rationale: str, answer: str) -> str:
  """The CoT target: rationale, then "\\nTherefore, the answer is: ", then the answer."""
  return rationale + COT_ANSWER_JOINER + answer


# --------------------------------------------------------------------------------------------
# The "chat" template: each tokenizer renders the prompt with its own chat template
# --------------------------------------------------------------------------------------------

CHAT_COT_CUE = "Let's think step by step.\n"   # the CoT view's assistant turn starts with it
CHAT_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def transcript(turns: Iterable[tuple[str, str]]) -> str:
  """Turns as plain text: "User: ...\n\nAssistant: ..." (role names of CHAT_ROLE_NAMES)."""
  return "\n\n".join(f"{CHAT_ROLE_NAMES[r]}: {c}" for r, c in turns)


class ChatPrompt(str):
  """A prompt that each tokenizer renders with its own chat template when it tokenizes it
  (`render_prompt`): the teacher's view gets the teacher's template, the student's the
  student's. As a str it is the turns' transcript (logs, generation files). `.turns`: the
  (role, content) turns before the answer; `.cot`: the assistant turn starts with
  CHAT_COT_CUE, the reasoning follows in the response."""

  turns: tuple[tuple[str, str], ...]
  cot: bool

  def __new__(cls, turns: Iterable[tuple[str, str]], cot: bool = False):
    turns = tuple((str(r), str(c)) for r, c in turns)
    obj = super().__new__(cls, transcript(turns) + "\n\nAssistant:" +
                          (" " + CHAT_COT_CUE if cot else ""))
    obj.turns, obj.cot = turns, bool(cot)
    return obj

  def __reduce__(self):
    return (ChatPrompt, (self.turns, self.cot))


def render_prompt(prompt: str, tokenizer) -> str:
  """The text a tokenizer sees for `prompt`: a ChatPrompt rendered by the tokenizer's chat
  template (with the generation prompt, then the CoT cue for a CoT view); any other str as is.
  DataError (one line) when the tokenizer has no chat template."""
  if not isinstance(prompt, ChatPrompt):
    return prompt
  if not getattr(tokenizer, "chat_template", None):
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise DataError(f"tokenizer {name} has no chat template; data.template=chat needs one on "
                    "both sides (use data.template=alpaca)")
  text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in prompt.turns],
                                       add_generation_prompt=True, tokenize=False)
  return text + (CHAT_COT_CUE if prompt.cot else "")


def chat_turns(example: Example) -> tuple[tuple[str, str], ...]:
  """The turns before the answer: a chat row's own, else one user turn (instruction, then the
  input after a blank line when there is one)."""
  if example.messages:
    return tuple(example.messages)
  text = example.instruction + (f"\n\n{example.input}" if has_input(example) else "")
  return (("user", text),)


def chat_plain_prompt(example: Example) -> ChatPrompt:
  return ChatPrompt(chat_turns(example))


def chat_cot_prompt(example: Example) -> ChatPrompt:
  return ChatPrompt(chat_turns(example), cot=True)


def qa_plain_prompt(example: Example) -> str:
  """The "qa" template's plain prompt: "Q: <input>\\nA:"."""
  return QA_PLAIN_TEMPLATE.format(input=example.input)


def qa_cot_prompt(example: Example) -> str:
  """The "qa" template's CoT prompt: "Q: <input>\\nA: Let's think step by step."."""
  return QA_COT_TEMPLATE.format(input=example.input)


@dataclasses.dataclass(frozen=True)
class Template:
  """How an example becomes prompts and responses.

  plain / cot: the plain and CoT prompt of an example; response_prefix: put before the plain
  answer and before the CoT response (" " for "qa", whose prompts end in "A:" / "step.").
  """

  name: str
  plain: Callable[[Example], str]
  cot: Callable[[Example], str]
  response_prefix: str = ""


TEMPLATES: dict[str, Template] = {
    "alpaca": Template("alpaca", plain_prompt, cot_prompt),
    "qa": Template("qa", qa_plain_prompt, qa_cot_prompt, response_prefix=" "),
    "chat": Template("chat", chat_plain_prompt, chat_cot_prompt),
}


def get_template(name: str | Template) -> Template:
  """A Template by name ("alpaca", "qa", "chat"); ValueError naming the known ones."""
  if isinstance(name, Template):
    return name
  if name not in TEMPLATES:
    raise ValueError(f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}")
  return TEMPLATES[name]


@dataclasses.dataclass(frozen=True)
class Record:
  """One training record: a main view and, for CoT records, the paired plain view.

  `example_index` is the position of the source example in the sequence given to
  `build_records` (the integer `example_id` of the batch contract in spec.py).
  """

  example_id: str
  kind: RecordKind
  prompt: str
  response: str
  pair_prompt: str | None = None
  pair_response: str | None = None
  has_pair: bool = False
  example_index: int = -1

  def __post_init__(self):
    if self.kind not in ("plain", "cot"):
      raise ValueError(f"record kind must be 'plain' or 'cot', got {self.kind!r}")
    paired = self.pair_prompt is not None and self.pair_response is not None
    if paired != self.has_pair or (self.pair_prompt is None) != (self.pair_response is None):
      raise ValueError(f"record {self.example_id!r}: has_pair={self.has_pair} but pair view "
                       f"is {'set' if paired else 'missing'}")


@dataclasses.dataclass
class BuildReport:
  """What `build_records` left out, by example id."""

  missing_rationale: list[str] = dataclasses.field(default_factory=list)
  empty_output: list[str] = dataclasses.field(default_factory=list)
  n_plain: int = 0
  n_cot: int = 0


class RecordList(list):
  """A plain list of `Record`s that also carries the `BuildReport` as `.report`."""

  report: BuildReport


def plain_record(example: Example, index: int = -1,
                 template: str | Template = "alpaca") -> Record:
  """The plain record of an example: plain prompt + first reference, no pair."""
  t = get_template(template)
  return Record(example_id=example.id, kind="plain", prompt=t.plain(example),
                response=t.response_prefix + example.output, example_index=index)


def cot_record(example: Example, rationale: str, index: int = -1,
               template: str | Template = "alpaca") -> Record:
  """The CoT record: CoT prompt + rationale/answer, paired with the plain view."""
  t = get_template(template)
  return Record(example_id=example.id, kind="cot", prompt=t.cot(example),
                response=t.response_prefix + cot_response(rationale, example.output),
                pair_prompt=t.plain(example), pair_response=t.response_prefix + example.output,
                has_pair=True, example_index=index)


def cot_selector(cot_rule: CotRule) -> Callable[[Example], bool]:
  """The predicate "this example should get a CoT record" for a rule name or callable."""
  if callable(cot_rule):
    return cot_rule
  rules = {"nonempty_input": has_input, "all": lambda ex: True, "none": lambda ex: False}
  if cot_rule not in rules:
    raise ValueError(f"unknown cot_rule {cot_rule!r}; use one of {sorted(rules)} or a callable")
  return rules[cot_rule]


def build_records(examples: Iterable[Example], rationales: Mapping[str, str] | None = None, *,
                  cot_rule: CotRule = "nonempty_input",
                  template: str | Template = "alpaca") -> RecordList:
  """Plain records for every example, CoT records where the rule and a rationale allow.

  `template`: "alpaca" (the instruction sets) or "qa" (the synthetic arithmetic set).

  Records come in example order, the plain record of an example before its CoT record. The
  returned list has a `.report` (`BuildReport`) of skipped empty outputs and missing rationales.
  """
  wants_cot = cot_selector(cot_rule)
  template = get_template(template)
  rationales = rationales or {}
  out, report = RecordList(), BuildReport()
  for index, example in enumerate(examples):
    if not example.output.strip():
      report.empty_output.append(example.id)
      continue
    out.append(plain_record(example, index, template))
    report.n_plain += 1
    if not wants_cot(example):
      continue
    rationale = rationales.get(example.id, "")
    if not rationale.strip():
      report.missing_rationale.append(example.id)
      continue
    out.append(cot_record(example, rationale, index, template))
    report.n_cot += 1
  _log_report(report)
  out.report = report
  return out


def _log_report(report: BuildReport) -> None:
  """Warn about examples left without a record or without their CoT record."""
  if report.empty_output:
    log.warning("build_records: skipped %d examples with an empty output (first: %s)",
                len(report.empty_output), report.empty_output[0])
  if report.missing_rationale:
    log.warning("build_records: %d examples selected for CoT have no rationale (first: %s)",
                len(report.missing_rationale), report.missing_rationale[0])
