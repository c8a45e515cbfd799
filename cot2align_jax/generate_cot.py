"""Teacher rationales for the CoT records, or an import of ones made elsewhere (docs/method.md
§2).

    python -m cot2align_jax.generate_cot --model=teacher_dir --dataset=dolly --split=train \
        --out=work/dolly_rationales.jsonl --batch_size=16          # resumable: rerun to continue
    python -m cot2align_jax.generate_cot --dataset=dolly --out=work/dolly_rationales.jsonl \
        --import_from=gpt4_rationales.jsonl                         # any LLM, keyed by example id
    python -m cot2align_jax.generate_cot --config=configs/tiny.py:cot2align --workdir=/tmp/tiny \
        --config.data.rationales=/tmp/tiny/rationales.jsonl          # then train with the same

With `--config` (the training config, same file and --config.<key>=v overrides as
cot2align_jax.train) the teacher (teacher.path, or the tiny problem's teacher initialised as the
training loop does), the data set (data.dataset / data.split / data.max_examples / data.source),
the CoT rule (data.cot_rule) and the output (data.rationales, the file training reads; when
empty: workdir/rationales.jsonl) come from the config; explicit flags given on the command line
win. Prompt lengths default to data.max_prompt / data.max_len. Batches are sharded over all
devices of mesh.data × mesh.fsdp (all when mesh.data = -1) on the axis 'data'
(--noshard: one device).

Sampling defaults: temperature 1, top-p 1, top-k off, no-repeat-ngram 6, 512 total / 256
prompt tokens, seed 10. The output is appended to (JSONL {"id", "rationale"}, flushed per batch);
ids already there are skipped. `--cot_rule` picks the examples (nonempty_input: those that get
a CoT record under the default record rule; all: every example, e.g. GSM8K). Imports refuse ids
that match no example (their count is printed) unless --drop_unknown. Bad input: one line on
stderr, exit 2.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from cot2align_jax.core import cli
from cot2align_jax.core.cli import UsageError
from cot2align_jax.evaluation.rationales import generate_rationales, import_rationale_file
from cot2align_jax.training import cli_flags
from cot2align_jax.training import config as C
from cot2align_jax.training.mesh import exit_on_peer_loss
from cot2align_jax.training.restore import config_model

FLAGS = flags.FLAGS

cli_flags.define_generation_flags()
cli.define_once(flags.DEFINE_string, "dataset", "dolly", "the data set (one registry name)")
cli.define_once(flags.DEFINE_string, "split", None, "its split (default: train)")
cli.define_once(flags.DEFINE_string, "workdir", None,
                "with --config and no --out: write workdir/rationales.jsonl")
flags.DEFINE_string("out", None, "rationale JSONL file (appended to)")
flags.DEFINE_integer("seed", 10, "sampling seed")
flags.DEFINE_enum("cot_rule", "nonempty_input", ["nonempty_input", "all"],
                  "which examples get a rationale")
flags.DEFINE_string("import_from", None, "import this rationale file instead of generating")
flags.DEFINE_bool("drop_unknown", False, "with --import_from: drop ids matching no example")


def _generate_cot() -> None:
  config = cli_flags.cli_config()
  out, dataset, split = FLAGS.out, FLAGS.dataset, FLAGS.split or "train"
  max_examples, cot_rule = FLAGS.max_examples, FLAGS.cot_rule
  if config is not None:
    data = C.data_config(config)
    if not out:
      out = data.rationales or (str(Path(FLAGS.workdir) / "rationales.jsonl")
                                if FLAGS.workdir else None)
    if not FLAGS["dataset"].present:
      dataset = data.dataset
    if not FLAGS.split:
      split = data.split
    if max_examples is None:
      max_examples = data.max_examples or None
    if not FLAGS["cot_rule"].present and data.cot_rule in ("nonempty_input", "all"):
      cot_rule = data.cot_rule
  if not out:
    raise UsageError("--out is required" if config is None else
                     "--out is required (or config data.rationales, or --workdir)")
  if "," in dataset or "/" in dataset:
    raise UsageError(f"--dataset takes one data set name, got {dataset!r}")
  examples = cli_flags.config_examples(config, dataset, split,
                                       max_examples if dataset == "tiny" else None)
  if FLAGS.import_from:
    report = import_rationale_file(FLAGS.import_from, examples, out,
                                   on_unknown="drop" if FLAGS.drop_unknown else "raise")
    dropped = f", dropped {len(report.unknown_ids)} unknown ids" if report.unknown_ids else ""
    print(f"imported {report.added} rationales into {report.path} "
          f"({report.already_present} already there{dropped})")
    return
  settings = cli_flags.sampling_settings(config)
  mesh = cli_flags.data_mesh(config)
  if config is not None and not FLAGS.model:
    model, tokenizer, _ = config_model(config, "teacher")
  else:
    model, tokenizer = cli_flags.load_model_and_tokenizer()
  report = generate_rationales(model, tokenizer, examples, out, settings=settings,
                               seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                               cot_rule=cot_rule, max_examples=max_examples,
                               mesh=mesh, prompt_fn=cli_flags.prompt_fns(config, dataset)[1])
  print(f"{report.path}: {report.already_done + report.generated}/{report.selected} done "
        f"({report.generated} new, {report.already_done} before); "
        f"{report.tokens} tokens in {report.seconds:.1f} s = {report.tokens_per_s:.0f} tok/s")


def main(argv) -> None:
  cli.no_arguments(argv)
  cli_flags.run_guarded(lambda: exit_on_peer_loss(_generate_cot))


def run() -> None:
  app.run(main, flags_parser=cli_flags.config_parser(config_required=False))


if __name__ == "__main__":
  run()
