"""Rationale generation: resume after interruption without duplicates or losses, fixed-seed
determinism, imports of external files with unknown ids refused with a count."""

import json

import jax
import numpy as np
import pytest

from cot2align_jax.data.records import DataError, Example
from cot2align_jax.data.sources import read_examples, read_rationales
from cot2align_jax.evaluation.protocol import TextGenerator
from cot2align_jax.evaluation.rationales import (generate_rationales, import_rationale_file)
from tests.evaluation import TINY_SETTINGS, gpt2_tokenizer, tiny_model

B = 2


@pytest.fixture(scope="module")
def setup(shared):
  examples = read_examples("dolly", "train", source=shared / "data", max_examples=5)
  return tiny_model(), gpt2_tokenizer(str(shared)), examples


def _run(setup, path, **kw):
  model, tok, examples = setup
  kw.setdefault("seed", 10)
  return generate_rationales(model, tok, examples, path, settings=TINY_SETTINGS, batch_size=B,
                             cot_rule="all", **kw)


def _lines(path):
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
  """An uninterrupted run: 5 examples, batches of 2 -> 3 batches."""
  path = tmp_path_factory.mktemp("ref") / "rationales.jsonl"
  report = _run(setup, path)
  assert (report.generated, report.batches_run, report.selected) == (5, 3, 5)
  assert report.tokens > 0 and report.tokens_per_s > 0
  return path


def test_uninterrupted_run_writes_every_id_once(setup, reference):
  rows = _lines(reference)
  assert [r["id"] for r in rows] == [ex.id for ex in setup[2]]
  assert all(isinstance(r["rationale"], str) and r["rationale"] for r in rows)


def test_rerun_of_complete_file_does_nothing(setup, reference, tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_bytes(reference.read_bytes())
  report = _run(setup, path)
  assert (report.generated, report.batches_run, report.batches_skipped) == (0, 0, 3)
  assert path.read_bytes() == reference.read_bytes()


def test_resume_after_interruption(setup, reference, tmp_path):
  path = tmp_path / "r.jsonl"
  first = _run(setup, path, max_batches=1)           # "crash" after the first batch
  assert first.generated == 2 and len(_lines(path)) == 2
  with path.open("a", encoding="utf-8") as f:        # a torn write of batch 2
    f.write('{"id": "dolly/train/2", "rationa')
  second = _run(setup, path)
  assert (second.already_done, second.generated, second.batches_skipped) == (2, 3, 1)
  rows = _lines(path)
  ids = [r["id"] for r in rows]
  assert len(ids) == len(set(ids)) == 5               # nothing duplicated, nothing lost
  assert read_rationales(path) == read_rationales(reference)   # same texts as uninterrupted


def test_partly_written_batch_is_completed_with_same_text(setup, reference, tmp_path):
  lines = reference.read_text(encoding="utf-8").splitlines(keepends=True)
  path = tmp_path / "r.jsonl"
  path.write_text("".join(lines[:3]), encoding="utf-8")   # batch 1 (ids 2, 3) half written
  report = _run(setup, path)
  assert (report.generated, report.batches_run) == (2, 2)
  assert path.read_text(encoding="utf-8").splitlines(keepends=True) == lines


def test_fixed_seed_identical_other_seed_differs(setup, reference, tmp_path):
  again = tmp_path / "again.jsonl"
  _run(setup, again)
  assert again.read_bytes() == reference.read_bytes()
  other = tmp_path / "other.jsonl"
  _run(setup, other, seed=11)
  assert read_rationales(other).keys() == read_rationales(reference).keys()
  assert read_rationales(other) != read_rationales(reference)


def test_cot_rule_selects_examples(setup, tmp_path):
  model, tok, examples = setup
  report = generate_rationales(model, tok, examples, tmp_path / "r.jsonl",
                               settings=TINY_SETTINGS, batch_size=B, max_batches=0)
  want = sum(ex.input != "" for ex in examples)
  assert report.selected == want and report.generated == 0


def test_import_refuses_unknown_ids_with_count(setup, tmp_path):
  examples = setup[2]
  src = tmp_path / "external.jsonl"
  rows = [{"id": examples[0].id, "rationale": "r0"}, {"id": examples[1].id, "rationale": "r1"},
          {"id": "nope/1", "rationale": "x"}, {"id": "nope/2", "rationale": "y"}]
  src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  out = tmp_path / "out.jsonl"
  with pytest.raises(DataError, match=r"2 of 4 rationale ids match no example"):
    import_rationale_file(src, examples, out)
  assert not out.exists() or out.read_text() == ""
  report = import_rationale_file(src, examples, out, on_unknown="drop")
  assert (report.added, sorted(report.unknown_ids)) == (2, ["nope/1", "nope/2"])
  assert read_rationales(out) == {examples[0].id: "r0", examples[1].id: "r1"}
  again = import_rationale_file(src, examples, out, on_unknown="drop")   # idempotent
  assert (again.added, again.already_present) == (0, 2)
  clash = tmp_path / "clash.jsonl"
  clash.write_text(json.dumps({"id": examples[0].id, "rationale": "other"}) + "\n")
  with pytest.raises(DataError, match="different rationale"):
    import_rationale_file(clash, examples, out)


def test_duplicate_example_ids_refused(setup, tmp_path):
  model, tok, examples = setup
  dup = [examples[0], Example(examples[0].id, "i", "x", ("o",), "d", "s")]
  with pytest.raises(DataError, match="duplicate ids"):
    generate_rationales(model, tok, dup, tmp_path / "r.jsonl", settings=TINY_SETTINGS)


def test_sharded_over_data_axis_matches_single_device(setup):
  model, tok, examples = setup
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices")
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
  plain = TextGenerator(model, tok, TINY_SETTINGS, batch_size=B)
  sharded = TextGenerator(model, tok, TINY_SETTINGS, batch_size=B, mesh=mesh)
  rows = [plain.encode(f"Question {i}: what is {i} + {i}?") for i in range(B)]
  a, b = plain.generate_ids(rows, 3), sharded.generate_ids(rows, 3)
  assert a.token_ids == b.token_ids and a.texts == b.texts
  with pytest.raises(ValueError, match="multiple"):
    TextGenerator(model, tok, TINY_SETTINGS, batch_size=3, mesh=mesh)
