"""TFDS builders: array_record files written and read back by random access, no TensorFlow."""

import subprocess
import sys

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from cot2align_jax.data import sources, tfds_builders as tb  # noqa: E402
from cot2align_jax.data.records import DataError  # noqa: E402

N_ROWS = 50


@pytest.fixture(scope="module")
def small_src(shared, tmp_path_factory):
  """A temp copy of the first N_ROWS lines of every Dolly split and of GSM8K."""
  root = tmp_path_factory.mktemp("src")
  for name in ("dolly", "gsm8k"):
    spec = sources.DATASETS[name]
    (root / spec.folder).mkdir(parents=True)
    for split in spec.splits:
      with spec.path(shared / "data", split).open(encoding="utf-8") as f:
        head = [next(f) for _ in range(N_ROWS)]
      spec.path(root, split).write_text("".join(head), encoding="utf-8")
  return root


def read_all(builder, dataset, split):
  rows = tb.read_back(builder, split)
  return [tb.example_from_row(r, dataset=dataset, split=split) for r in rows]


def array_record_files(builder):
  return sorted(p.name for p in builder.data_path.iterdir() if ".array_record-" in p.name)


def test_tensorflow_is_not_installed():
  proc = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True)
  assert proc.returncode != 0 and b"No module named 'tensorflow'" in proc.stderr


def test_instruction_set_round_trip(small_src, tmp_path):
  cfg = tb.SourceConfig(name="dolly_small", dataset="dolly", source_dir=str(small_src))
  builder = tb.prepare(tb.Cot2alignInstructions, cfg, data_dir_out=tmp_path)
  assert array_record_files(builder) == [
      f"cot2align_instructions-{s}.array_record-00000-of-00001" for s in ("dev", "train", "valid")]
  for split in ("train", "dev", "valid"):
    want = sources.read_examples("dolly", split, source=small_src)
    assert len(want) == N_ROWS and read_all(builder, "dolly", split) == want
  source = builder.as_data_source("train")
  assert source[7]["index"] == 7 and source[7]["id"] == b"dolly/train/7"
  assert "tensorflow" not in sys.modules
  # Reading needs no builder code: the directory describes itself.
  reread = tfds.builder_from_directory(str(builder.data_path))
  assert read_all(reread, "dolly", "valid") == sources.read_examples("dolly", "valid",
                                                                     source=small_src)


def test_manual_dir_and_max_examples(small_src, tmp_path):
  cfg = tb.SourceConfig(name="dolly_manual", dataset="dolly", max_examples=5)
  builder = tb.prepare(tb.Cot2alignInstructions, cfg, data_dir_out=tmp_path,
                       manual_dir=small_src)
  assert builder.info.splits["train"].num_examples == 5
  got = read_all(builder, "dolly", "dev")
  assert got == sources.read_examples("dolly", "dev", source=small_src, max_examples=5)


def test_data_source_by_registered_name(tmp_path):
  """A registered config (self_inst here) is found by name through tfds.data_source."""
  folder = tmp_path / "src" / "self-inst"
  folder.mkdir(parents=True)
  (folder / "valid.jsonl").write_text(
      '{"instruction": "I", "input": "x", "output": "y"}\n'
      '{"instruction": "J", "input": "", "output": "z"}\n', encoding="utf-8")
  tb.prepare(tb.Cot2alignInstructions, "self_inst", data_dir_out=tmp_path,
             manual_dir=tmp_path / "src")
  source = tfds.data_source("cot2align_instructions/self_inst", split="valid",
                            data_dir=str(tmp_path))
  assert [source[i]["instruction"] for i in range(len(source))] == [b"I", b"J"]


def test_gsm8k_round_trip(small_src, tmp_path):
  cfg = tb.SourceConfig(name="small", dataset="gsm8k", source_dir=str(small_src), max_examples=20)
  builder = tb.prepare(tb.Cot2alignGsm8k, cfg, data_dir_out=tmp_path)
  rows = list(tb.read_back(builder, "test"))
  want = sources.read_examples("gsm8k", "test", source=small_src, max_examples=20)
  assert [tb.example_from_row(r, dataset="gsm8k", split="test") for r in rows] == want
  assert [r["final_answer"].decode() for r in rows] == [
      sources.gsm8k_final_answer(e.output) for e in want]


def test_cot_augmented_round_trip(small_src, tmp_path):
  examples = sources.read_examples("dolly", "train", source=small_src)
  rationales = {e.id: f"Reasoning for {e.id}:\n1. é ok" for e in examples if e.input}
  path = tmp_path / "rationales.jsonl"
  sources.write_rationales(path, rationales)
  cfg = tb.CotConfig(name="dolly_cot", dataset="dolly", source_dir=str(small_src),
                     rationale_path=str(path), max_examples=30)
  builder = tb.prepare(tb.Cot2alignCot, cfg, data_dir_out=tmp_path / "out")
  rows = list(tb.read_back(builder, "train"))
  assert [tb.example_from_row(r, dataset="dolly", split="train") for r in rows] == examples[:30]
  assert {r["id"].decode(): r["rationale"].decode() for r in rows} == {
      e.id: rationales.get(e.id, "") for e in examples[:30]}


def test_cot_builder_rejects_unknown_rationale_ids(small_src, tmp_path):
  path = tmp_path / "bad.jsonl"
  sources.write_rationales(path, {"dolly/train/0": "r", "dolly/train/999999": "?"})
  cfg = tb.CotConfig(name="dolly_bad", dataset="dolly", source_dir=str(small_src),
                     rationale_path=str(path))
  with pytest.raises(DataError, match="1 of 2 rationale ids match no example"):
    tb.prepare(tb.Cot2alignCot, cfg, data_dir_out=tmp_path / "out")
