"""Evaluation: batching/padding/truncation, EOS cutting, seeds, scores and the written report;
the two absl entry points in-process (one-line errors)."""

import json

import numpy as np
import pytest
from absl import flags
from rouge_score import rouge_scorer

# Entry modules define their absl flags on import; the flags they share (--config, --workdir,
# the sampling set) are defined once per process (core/cli.py define_once).
from cot2align_jax import evaluate as ev_cli
from cot2align_jax import generate_cot as cot_cli
from cot2align_jax import train as train_cli
from cot2align_jax.data.records import Example, plain_prompt
from cot2align_jax.data.sources import read_examples
from cot2align_jax.evaluation.protocol import (SamplingSettings, TextGenerator, cut_at_eos,
                                               dev_rouge_l, evaluate_sets, metric_for,
                                               score_texts)
from cot2align_jax.models import save_pretrained
from tests.evaluation import TINY_SETTINGS, gpt2_tokenizer, tiny_model

B = 2


@pytest.fixture(scope="module")
def env(shared):
  model, tok = tiny_model(), gpt2_tokenizer(str(shared))
  return model, tok, TextGenerator(model, tok, TINY_SETTINGS, batch_size=B)


def test_defaults_follow_method():
  s = SamplingSettings()
  assert (s.temperature, s.top_p, s.top_k, s.no_repeat_ngram_size) == (1.0, 1.0, 0, 6)
  assert (s.max_length, s.max_prompt_length, s.new_tokens) == (512, 256, 256)
  g = s.generation_config((7,), 7)
  assert (g.max_new_tokens, g.top_k, g.no_repeat_ngram_size, g.greedy) == (256, 0, 6, False)


def test_truncation_side_and_no_special_tokens(env):
  model, tok, gen = env
  text = " ".join(f"w{i}" for i in range(80)) + "\n\n### Response:\n"
  full = tok(text, add_special_tokens=False)["input_ids"]
  assert gen.encode(text) == full[-32:]                     # default: keep the last tokens
  right = TextGenerator(model, tok, SamplingSettings(max_length=38, max_prompt_length=32,
                                                     truncate_side="right"), batch_size=B)
  assert right.encode(text) == full[:32]


def test_pad_batch_left_pads_and_fills(env):
  _, tok, gen = env
  ids, mask = gen.pad_batch([[5, 6, 7]])
  assert ids.shape == mask.shape == (B, 32)
  assert mask[0].tolist() == [0] * 29 + [1, 1, 1] and ids[0, -3:].tolist() == [5, 6, 7]
  assert (ids[0, :29] == tok.eos_token_id).all()             # GPT-2: pad = EOS
  assert (ids[1] == ids[0]).all()                            # filler row


def test_decode_cuts_at_eos_id_and_string(env):
  _, tok, gen = env
  hello, world = tok.encode("Hello"), tok.encode(" world")
  eos = tok.eos_token_id
  assert gen.decode(hello + world + [eos] + hello) == ("Hello world", hello + world)
  literal = tok.encode("Hi<|endoftext|> there")        # the EOS string inside decoded text
  assert gen.decode(literal)[0] == "Hi"
  assert cut_at_eos("a</s>b<|endoftext|>", ["<|endoftext|>", "</s>"]) == "a"
  assert cut_at_eos("abc", []) == "abc"


def test_fixed_seed_identical_other_seed_differs(env):
  _, _, gen = env
  prompts = [f"Write number {i}." for i in range(3)]          # 2 batches (last one filled)
  a, b, c = gen.generate(prompts, 10), gen.generate(prompts, 10), gen.generate(prompts, 20)
  assert a == b and len(a) == 3
  assert a != c


def test_scores_metrics():
  gsm = Example("g/0", "q", "", ("work\n#### 1,200",), "gsm8k", "test")
  dolly = Example("d/0", "q", "", ("the cat sat",), "dolly", "valid")
  sni = Example("s/0", "q", "x", ("no match", "a cat sat"), "sinst", "valid")
  assert metric_for([gsm]) == "exact_match" and metric_for([dolly]) == "rougeL"
  assert score_texts([gsm, gsm], ["the answer is 1200", "1201"]) == [100.0, 0.0]
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  got = score_texts([dolly, sni], ["cats sat", "cats sat"])
  want = [100 * scorer.score("the cat sat", "cats sat")["rougeL"].fmeasure,
          100 * scorer.score("a cat sat", "cats sat")["rougeL"].fmeasure]
  assert got == want


def test_evaluate_sets_writes_table_json_plot(env, shared, tmp_path):
  model, tok, _ = env
  sets = {"dolly/valid": read_examples("dolly", "valid", source=shared / "data"),
          "gsm8k/test": read_examples("gsm8k", "test", source=shared / "data", max_examples=3)}
  seeds = (10, 20)
  report = evaluate_sets(model, tok, sets, seeds, workdir=tmp_path, settings=TINY_SETTINGS,
                         batch_size=B, max_examples=3)
  assert [r.name for r in report.results] == ["dolly/valid", "gsm8k/test"]
  data = json.loads(report.json_path.read_text())
  assert data["meta"]["seeds"] == [10, 20] and data["meta"]["max_examples"] == 3
  for r, row in zip(report.results, data["results"]):
    assert r.n == row["n"] == 3 and row["seeds"] == [10, 20]
    assert row["mean"] == pytest.approx(np.mean(row["scores"]))
    assert row["std"] == pytest.approx(np.std(row["scores"]))            # ddof = 0
    for seed, corpus in zip(seeds, row["scores"]):
      gen_file = tmp_path / "generations" / f"{r.name.replace('/', '_')}_seed{seed}.jsonl"
      lines = [json.loads(x) for x in gen_file.read_text().splitlines()]
      examples = sets[r.name][:3]
      assert [x["id"] for x in lines] == [ex.id for ex in examples]
      rescored = score_texts(examples, [x["prediction"] for x in lines])
      assert np.mean(rescored) == pytest.approx(corpus)
  md = report.markdown_path.read_text()
  assert "| dolly/valid | rougeL | 3 |" in md and "±" in md
  assert report.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert data["results"][1]["metric"] == "exact_match"


def test_evaluation_prompt_is_plain(env, shared):
  _, tok, gen = env
  ex = read_examples("dolly", "valid", source=shared / "data", max_examples=1)[0]
  want = tok(plain_prompt(ex), add_special_tokens=False)["input_ids"][-32:]
  assert gen.encode(plain_prompt(ex)) == want


def test_dev_rouge_l(env, shared):
  model, tok, _ = env
  dev = read_examples("dolly", "dev", source=shared / "data", max_examples=2)
  score = dev_rouge_l(model, tok, dev, settings=TINY_SETTINGS, batch_size=B)
  assert isinstance(score, float) and 0.0 <= score <= 100.0


def test_budget_checked_against_model(env):
  model, tok, _ = env
  with pytest.raises(ValueError, match="max_position_embeddings"):
    TextGenerator(model, tok, SamplingSettings(), batch_size=B)   # 256 + 256 > 64


# ---------------------------------------------------------------------------------------------
# Entry points, in-process


@pytest.fixture
def cli(shared, env, tmp_path_factory):
  model, tok, _ = env
  ckpt = tmp_path_factory.mktemp("ckpt") / "tiny"
  save_pretrained(model, ckpt, tokenizer=tok)

  def run(module, *args):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog", f"--model={ckpt}", f"--data_dir={shared / 'data'}",
                 "--max_prompt_length=32", "--max_new_tokens=6", "--batch_size=2", "--noshard",
                 *args])
    try:
      (ev_cli if module == "evaluate" else cot_cli).main(["prog"])
      return 0
    except SystemExit as e:
      return e.code
    finally:
      flags.FLAGS.unparse_flags()

  return run


def test_cli_entry_modules_share_their_common_flags():
  """train, evaluate and generate_cot imported in one process: one --config (a config file
  flag) and one --workdir, each module's own flags beside them."""
  assert type(flags.FLAGS["config"]).__name__ == "_ConfigFlag"
  assert train_cli._WORKDIR.name == "workdir" and flags.FLAGS["workdir"].default is None
  assert {"seeds", "out", "cot_rule", "model"} <= set(flags.FLAGS)


def test_cli_evaluate_and_generate_cot(cli, tmp_path, capsys):
  assert cli("evaluate", f"--workdir={tmp_path / 'e'}", "--dataset=vicuna,gsm8k/test",
             "--max_examples=2", "--seeds=10") == 0
  out = capsys.readouterr().out
  assert "| vicuna/valid | rougeL | 2 |" in out and "| gsm8k/test | exact_match | 2 |" in out
  assert (tmp_path / "e" / "eval_results.png").exists()
  out_file = tmp_path / "r.jsonl"
  assert cli("generate_cot", "--dataset=dolly", f"--out={out_file}", "--max_examples=8",
             "--cot_rule=all") == 0
  assert len(out_file.read_text().splitlines()) == 8
  assert "8/8 done (8 new" in capsys.readouterr().out
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": "dolly/train/0", "rationale": "r"}\n{"id": "x", "rationale": "r"}\n')
  assert cli("generate_cot", "--dataset=dolly", f"--out={out_file}",
             f"--import_from={bad}") == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and "1 of 2 rationale ids match no example" in err
  assert "\n" not in err


def test_cli_one_line_errors(cli, tmp_path, capsys):
  assert cli("evaluate", f"--workdir={tmp_path}", "--dataset=nope") == 2
  assert capsys.readouterr().err.strip() == (
      "error: unknown dataset 'nope'; known: dolly, self-inst, vicuna, sinst, uinst, alpaca, "
      "dialogsum, sni_selfinstruct, gsm8k, arith, tiny, file, jsonl")
  assert cli("evaluate", f"--workdir={tmp_path}", "--seeds=a,b") == 2
  assert "--seeds must be comma-separated integers" in capsys.readouterr().err
  assert cli("generate_cot", "--dataset=dolly") == 2
  assert capsys.readouterr().err.strip() == "error: --out is required"
