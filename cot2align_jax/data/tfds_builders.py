"""TFDS builders (array_record, no TensorFlow) for the instruction sets, GSM8K and CoT sets.

Three `GeneratorBasedBuilder`s, one BuilderConfig per data set:

* `Cot2alignInstructions` ("cot2align_instructions/<dataset>"): id, index, instruction, input,
  outputs (list of references) for every split of an instruction set in `sources.DATASETS`.
* `Cot2alignGsm8k` ("cot2align_gsm8k/default"): id, index, question, answer, final_answer.
* `Cot2alignCot` ("cot2align_cot/<dataset>"): the instruction-set fields plus `rationale`, read
  from a rationale JSONL keyed by example id (`sources.import_rationales`: an id that matches
  no example is an error). Examples without a rationale get rationale "".

Prepared sets are read with `tfds.data_source` (random access, what grain uses; no TensorFlow
needed, tests/data/test_tfds_builders.py checks it without TF). Records keep source-file order,
so `index` = row position. Decoded Text comes back as `bytes`: use `example_from_row`.

Source directory, in order: the config's `source_dir`; the download config's `manual_dir` when
it exists and is non-empty (`tfds.download.DownloadConfig(manual_dir=...)`); shared/data.
`max_examples` (config) keeps the first rows of each split, for tests and smoke runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from cot2align_jax.data.records import DataError, Example
from cot2align_jax.data.sources import (DATASETS, data_dir, gsm8k_final_answer,
                                        import_rationales, read_examples)

INSTRUCTION_SETS = tuple(name for name, spec in DATASETS.items()
                         if spec.layout == "alpaca" and spec.shared)
_MANUAL_INSTRUCTIONS = ("Point manual_dir (or the config's source_dir) at a directory laid out "
                        "like shared/data (see shared/data/README.md).")


def config_name(dataset: str) -> str:
  """A TFDS-safe config name for a data set name ("self-inst" -> "self_inst")."""
  return dataset.replace("-", "_")


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
  """Which data set to build, from where, and how many rows per split (None: all)."""

  dataset: str = ""
  source_dir: str | None = None
  max_examples: int | None = None


@dataclasses.dataclass(eq=False)
class CotConfig(SourceConfig):
  """A CoT-augmented set: the data set's `splits` joined with a rationale JSONL file."""

  rationale_path: str | None = None
  splits: tuple[str, ...] = ("train",)


def _text_features(extra: Mapping[str, Any] | None = None) -> tfds.features.FeaturesDict:
  """The instruction-set features (plus `extra`)."""
  features = {
      "id": tfds.features.Text(),
      "index": tfds.features.Scalar(dtype=np.int32),
      "instruction": tfds.features.Text(),
      "input": tfds.features.Text(),
      "outputs": tfds.features.Sequence(tfds.features.Text()),
  }
  features.update(extra or {})
  return tfds.features.FeaturesDict(features)


def example_features(example: Example) -> dict[str, Any]:
  """The feature dict of one example (index = row position parsed from the id when possible)."""
  return {"id": example.id, "index": _row_index(example), "instruction": example.instruction,
          "input": example.input, "outputs": list(example.outputs)}


def _row_index(example: Example) -> int:
  """The row index in "{dataset}/{split}/{index}" ids, else -1."""
  tail = example.id.rsplit("/", 1)[-1]
  return int(tail) if tail.isdigit() else -1


def _decode(value: Any) -> str:
  """A decoded Text value (bytes or str) as str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def example_from_row(row: Mapping[str, Any], *, dataset: str, split: str) -> Example:
  """An `Example` from a record read back from any of these builders."""
  if "question" in row:
    instruction, inp, outputs = row["question"], b"", [row["answer"]]
  else:
    instruction, inp, outputs = row["instruction"], row["input"], row["outputs"]
  return Example(id=_decode(row["id"]), instruction=_decode(instruction), input=_decode(inp),
                 outputs=tuple(_decode(o) for o in outputs), dataset=dataset, split=split)


class _SourceBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared plumbing: array_record by default, source directory resolution."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS

  def __init__(self, *, file_format: str | None = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _source_dir(self, dl_manager) -> Path:
    """The config's source_dir, else a non-empty manual_dir, else shared/data."""
    if self.builder_config.source_dir:
      return data_dir(self.builder_config.source_dir)
    try:
      return data_dir(Path(dl_manager.manual_dir))
    except (AssertionError, ValueError):
      return data_dir(None)

  def _make_info(self, features: tfds.features.FeaturesDict, description: str):
    """DatasetInfo built directly (no metadata files needed), source order kept."""
    return tfds.core.DatasetInfo(builder=self, description=description, features=features,
                                 disable_shuffling=True)

  def _examples(self, dl_manager, split: str, *, truncate: bool = True) -> list[Example]:
    """The examples of one split of the config's data set (first max_examples if truncate)."""
    cfg = self.builder_config
    return read_examples(cfg.dataset, split, source=self._source_dir(dl_manager),
                         max_examples=cfg.max_examples if truncate else None)


class Cot2alignInstructions(_SourceBuilder):
  """The MiniLLM/DSKD-layout instruction sets, one config per data set."""

  BUILDER_CONFIGS = [SourceConfig(name=config_name(n), dataset=n,
                                  description=f"{n}: {', '.join(DATASETS[n].splits)}")
                     for n in INSTRUCTION_SETS]

  def _info(self):
    return self._make_info(_text_features(), "Instruction sets in the MiniLLM/DSKD layout.")

  def _split_generators(self, dl_manager):
    splits = DATASETS[self.builder_config.dataset].splits
    return {s: self._generate_examples(self._examples(dl_manager, s)) for s in splits}

  def _generate_examples(self, examples):
    for position, example in enumerate(examples):
      yield position, example_features(example)


class Cot2alignGsm8k(_SourceBuilder):
  """GSM8K (train/test) with the final answer after "####" split out."""

  BUILDER_CONFIGS = [SourceConfig(name="default", dataset="gsm8k",
                                  description="GSM8K grade-school math")]

  def _info(self):
    features = tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "index": tfds.features.Scalar(dtype=np.int32),
        "question": tfds.features.Text(),
        "answer": tfds.features.Text(),
        "final_answer": tfds.features.Text(),
    })
    return self._make_info(features, "GSM8K: question, worked answer, final answer.")

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(self._examples(dl_manager, s))
            for s in DATASETS["gsm8k"].splits}

  def _generate_examples(self, examples):
    for position, ex in enumerate(examples):
      yield position, {"id": ex.id, "index": _row_index(ex), "question": ex.instruction,
                       "answer": ex.output, "final_answer": gsm8k_final_answer(ex.output) or ""}


class Cot2alignCot(_SourceBuilder):
  """An instruction set joined with teacher (or external) rationales keyed by example id."""

  BUILDER_CONFIGS = [CotConfig(name="dolly", dataset="dolly", splits=("train",),
                               description="Dolly train + rationales (set rationale_path)")]

  def _info(self):
    return self._make_info(_text_features({"rationale": tfds.features.Text()}),
                           "Instruction set with CoT rationales ('' where none).")

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if not cfg.rationale_path:
      raise DataError(f"{self.name}/{cfg.name}: the CoT config needs a rationale_path")
    # Ids are checked against the whole splits; max_examples truncates afterwards.
    per_split = {s: self._examples(dl_manager, s, truncate=False) for s in cfg.splits}
    everything = [ex for exs in per_split.values() for ex in exs]
    rationales = import_rationales(cfg.rationale_path, everything)
    keep = slice(None, cfg.max_examples)
    return {s: self._generate_examples(exs[keep], rationales) for s, exs in per_split.items()}

  def _generate_examples(self, examples, rationales):
    for position, example in enumerate(examples):
      yield position, {**example_features(example), "rationale": rationales.get(example.id, "")}


def prepare(builder_cls: type[_SourceBuilder], config: str | tfds.core.BuilderConfig, *,
            data_dir_out: str | Path, manual_dir: str | Path | None = None) -> _SourceBuilder:
  """Build (if needed) and return a builder; `manual_dir` sets the source directory."""
  builder = builder_cls(config=config, data_dir=str(data_dir_out))
  download_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
  builder.download_and_prepare(download_config=download_config)
  return builder


def read_back(builder: tfds.core.DatasetBuilder, split: str) -> Iterator[dict[str, Any]]:
  """All records of a split through the random-access data source, in order."""
  source = builder.as_data_source(split)
  for i in range(len(source)):
    yield source[i]
