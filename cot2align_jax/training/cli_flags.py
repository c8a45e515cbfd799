"""Command-line pieces of the entry modules that read a training config: the --config check
(train, evaluate, generate_cot) and the model / sampling / data flags that evaluate and
generate_cot share, with the inputs they build from them (flags beat the config's values)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import numpy as np
from absl import flags

from cot2align_jax.core import cli
from cot2align_jax.core.cli import UsageError
from cot2align_jax.data.records import Example
from cot2align_jax.data.tokenize import SPECIAL_TOKENS
from cot2align_jax.evaluation.protocol import SamplingSettings
from cot2align_jax.models import from_pretrained, load_tokenizer
from cot2align_jax.training import config as C
from cot2align_jax.training import setup
from cot2align_jax.training.mesh import maybe_initialize_distributed

FLAGS = flags.FLAGS
flags.disclaim_key_flags()  # define_generation_flags' flags are key flags of the entry module

# Bad input of evaluate / generate_cot: ValueError covers UsageError, ConfigError, DataError,
# ModelError and RestoreError; OSError a missing or unreadable file.
INPUT_ERRORS = (ValueError, KeyError, OSError)


def check_config_arg(spec: str, override_keys: list[str]) -> None:
  """UsageError (one line) unless --config=`spec` loads and every --config.<key> exists."""
  path, arg = C.split_config_arg(spec)
  if not Path(path).is_file():
    raise UsageError(f"config file not found: {path}")
  try:
    cfg = C.load_config(path, arg)
    for key in override_keys:
      C.check_key(cfg, key)
  except C.ConfigError as e:
    raise UsageError(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except  (any error of the user's config file)
    raise UsageError(f"config file {spec}: {type(e).__name__}: {e}") from None


def config_parser(*, config_required: bool, required: dict[str, str] | None = None):
  """app.run's flags_parser: --config checked by check_config_arg (cli.config_flags_parser)."""
  return cli.config_flags_parser(check_config_arg, config_required=config_required,
                                 required=required)


def define_generation_flags() -> None:
  """The flags evaluate and generate_cot share (each defined once per process)."""
  cli.define_config_flag("training config file (configs/*.py[:arg]); see the module doc")
  once = cli.define_once
  once(flags.DEFINE_string, "model", None, "HF checkpoint directory, .gguf file or gguf:<name>")
  once(flags.DEFINE_string, "tokenizer", None, "tokenizer path (default: --model)")
  once(flags.DEFINE_string, "data_dir", None, "data directory (default: ../shared/data)")
  once(flags.DEFINE_string, "dtype", "float32", "compute dtype: float32 or bfloat16")
  once(flags.DEFINE_integer, "batch_size", 8, "prompts per generation batch")
  once(flags.DEFINE_integer, "max_examples", None, "keep the first N examples of each set")
  once(flags.DEFINE_float, "temperature", 1.0, "sampling temperature (0 = greedy)")
  once(flags.DEFINE_float, "top_p", 1.0, "nucleus p (1 = off)")
  once(flags.DEFINE_integer, "top_k", 0, "top-k (0 = off)")
  once(flags.DEFINE_integer, "no_repeat_ngram", 6, "no-repeat-ngram size (0 = off)")
  once(flags.DEFINE_integer, "max_length", 512, "prompt + generated token budget")
  once(flags.DEFINE_integer, "max_prompt_length", 256, "prompt tokens kept")
  once(flags.DEFINE_integer, "max_new_tokens", None, "default: max_length - max_prompt_length")
  once(flags.DEFINE_enum, "truncate_side", "left", ["left", "right"],
       "left: keep a long prompt's last tokens; right: its first")
  once(flags.DEFINE_enum, "special_tokens", None, list(SPECIAL_TOKENS),
       "BOS before each prompt: convention = iff the tokenizer adds one, reference = never "
       "(default: the config's data.special_tokens, else convention)")
  once(flags.DEFINE_bool, "shard", True, "shard batches over all devices (mesh axis 'data')")


def run_guarded(body: Callable[[], None]) -> None:
  """Joins a multi-host job when this is one of its processes, then runs body(); bad input
  (INPUT_ERRORS) becomes one line on stderr and exit status 2."""
  def joined() -> None:
    maybe_initialize_distributed()
    body()
  cli.guarded(joined, INPUT_ERRORS)


def sampling_settings(config=None) -> SamplingSettings:
  """SamplingSettings of the flags; with a config, max_length / max_prompt_length /
  special_tokens not given on the command line come from data.max_len / data.max_prompt /
  data.special_tokens."""
  max_length, max_prompt = FLAGS.max_length, FLAGS.max_prompt_length
  special_tokens = FLAGS.special_tokens or "convention"
  if config is not None:
    pipe = C.pipeline_config(config)
    if not FLAGS["max_length"].present:
      max_length = pipe.max_len
    if not FLAGS["max_prompt_length"].present:
      max_prompt = pipe.max_prompt
    if FLAGS.special_tokens is None:
      special_tokens = pipe.special_tokens
  return SamplingSettings(temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
                          no_repeat_ngram_size=FLAGS.no_repeat_ngram,
                          max_length=max_length,
                          max_prompt_length=max_prompt,
                          max_new_tokens=FLAGS.max_new_tokens,
                          truncate_side=FLAGS.truncate_side,
                          special_tokens=special_tokens)


def cli_config():
  """The --config ConfigDict (validated), or None when not given."""
  config = FLAGS.config
  if config is None:
    return None
  try:
    C.validate(config)
  except C.ConfigError as e:
    raise UsageError(str(e)) from None
  return config


def config_examples(config, name: str, split: str, max_examples: int | None) -> list[Example]:
  """Examples of one set (setup.split_examples; a registered set under --data_dir, else the
  config's data.source)."""
  return setup.split_examples(config, name, split, max_examples, source=FLAGS.data_dir or None)


def prompt_fns(config, name: str):
  """(plain prompt fn, CoT prompt fn) of a set: its template's (data.template, else the set's
  own) for every template but Alpaca, else (None, None) = the Alpaca templates of
  data.records."""
  template = setup.data_template(config, name)
  if template.name != "alpaca":
    return template.plain, template.cot
  return None, None


def load_model_and_tokenizer():
  """(model, tokenizer) from --model / --tokenizer / --dtype."""
  if not FLAGS.model:
    raise UsageError("--model is required")
  if FLAGS.dtype not in ("float32", "bfloat16"):
    raise UsageError(f"--dtype must be float32 or bfloat16, got {FLAGS.dtype!r}")
  model = from_pretrained(FLAGS.model, dtype=FLAGS.dtype)
  return model, load_tokenizer(FLAGS.tokenizer or FLAGS.model)


def data_mesh(config=None) -> jax.sharding.Mesh | None:
  """A 1-D mesh ('data',) over all devices when --shard and there is more than one, else None.
  With a config: over mesh.data × mesh.fsdp devices (all when mesh.data is -1)."""
  devices = jax.devices()
  mesh_cfg = C.mesh_config(config) if config is not None else None
  if mesh_cfg is not None and mesh_cfg.data > 0:
    devices = devices[:mesh_cfg.data * max(mesh_cfg.fsdp, 1)]
  if not FLAGS.shard or len(devices) < 2:
    return None
  if FLAGS.batch_size % len(devices):
    raise UsageError(f"--batch_size={FLAGS.batch_size} must be a multiple of the "
                     f"{len(devices)} devices (or pass --noshard)")
  return jax.sharding.Mesh(np.asarray(devices), ("data",))
