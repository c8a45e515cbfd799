"""Teacher rationales for CoT records, or an import of rationales made elsewhere (METHOD.md §2).

    python -m cot2align_jax.generate_cot --model=teacher_dir --dataset=dolly --split=train \
        --out=work/dolly_rationales.jsonl --batch_size=16          # resumable: rerun to continue
    python -m cot2align_jax.generate_cot --dataset=dolly --out=work/dolly_rationales.jsonl \
        --import_from=gpt4_rationales.jsonl                         # any LLM, keyed by example id

Sampling defaults: temperature 1, top-p 1, top-k off, no-repeat-ngram 6, 512 total / 256
prompt tokens, seed 10. The output is appended to (JSONL {"id", "rationale"}, flushed per batch);
ids already there are skipped. `--cot_rule` picks the examples (nonempty_input: those that get
a CoT record under the default record rule; all: every example, e.g. GSM8K). Imports refuse ids
that match no example (their count is printed) unless --drop_unknown. Bad input: one line on
stderr, exit 2.
"""

from __future__ import annotations

import sys

from absl import app, flags

from cot2align_jax.evaluate import (UsageError, data_mesh, define_common_flags,
                                    load_model_and_tokenizer, run_cli, sampling_settings)

FLAGS = flags.FLAGS

define_common_flags()
flags.DEFINE_string("out", None, "rationale JSONL file (appended to)")
flags.DEFINE_integer("seed", 10, "sampling seed")
flags.DEFINE_enum("cot_rule", "nonempty_input", ["nonempty_input", "all"],
                  "which examples get a rationale")
flags.DEFINE_string("import_from", None, "import this rationale file instead of generating")
flags.DEFINE_bool("drop_unknown", False, "with --import_from: drop ids matching no example")

# --dataset and --split come from cot2align_jax.evaluate (here: one name, split default train).


def _generate_cot() -> None:
  from cot2align_jax.data.sources import read_examples
  from cot2align_jax.evaluation.rationales import generate_rationales, import_rationale_file
  if not FLAGS.out:
    raise UsageError("--out is required")
  if "," in FLAGS.dataset or "/" in FLAGS.dataset:
    raise UsageError(f"--dataset takes one data set name, got {FLAGS.dataset!r}")
  split = FLAGS.split or "train"
  examples = read_examples(FLAGS.dataset, split, source=FLAGS.data_dir)
  if FLAGS.import_from:
    report = import_rationale_file(FLAGS.import_from, examples, FLAGS.out,
                                   on_unknown="drop" if FLAGS.drop_unknown else "raise")
    dropped = f", dropped {len(report.unknown_ids)} unknown ids" if report.unknown_ids else ""
    print(f"imported {report.added} rationales into {report.path} "
          f"({report.already_present} already there{dropped})")
    return
  settings = sampling_settings()
  mesh = data_mesh()
  model, tokenizer = load_model_and_tokenizer()
  report = generate_rationales(model, tokenizer, examples, FLAGS.out, settings=settings,
                               seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                               cot_rule=FLAGS.cot_rule, max_examples=FLAGS.max_examples,
                               mesh=mesh)
  print(f"{report.path}: {report.already_done + report.generated}/{report.selected} done "
        f"({report.generated} new, {report.already_done} before); "
        f"{report.tokens} tokens in {report.seconds:.1f} s = {report.tokens_per_s:.0f} tok/s")


def main(argv) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  run_cli(_generate_cot)


if __name__ == "__main__":
  app.run(main)
