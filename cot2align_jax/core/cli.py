"""What every entry module shares: flags defined once per process, the --config file check,
quiet logs and the exit codes (0 done, 2 bad input with one line "error: ..." on stderr, 130
stopped by the user: rerun to continue).

    CONFIG = cli.define_config_flag("experiment config file (configs/*.py[:arg])")
    WORKDIR = cli.define_once(flags.DEFINE_string, "workdir", None, "run directory")

    def main(argv):
      cli.no_arguments(argv)
      result = cli.guarded(lambda: work(CONFIG.value), (ConfigError, FileNotFoundError))

    app.run(main, flags_parser=cli.config_flags_parser(check, config_required=True,
                                                       required={"workdir": "dir"}))
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Mapping, NoReturn, Sequence, TypeVar

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

EXIT_USAGE = 2     # bad flags, config, model or data path
EXIT_STOPPED = 130  # interrupted (Ctrl-C); rerunning continues

FLAGS = flags.FLAGS
HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "--helpxml")

T = TypeVar("T")

# Flags defined through define_once are key flags of its caller (the entry module), not of this
# module: --helpshort lists them under the entry point.
flags.disclaim_key_flags()


class UsageError(ValueError):
  """A bad command-line value (one line, exit EXIT_USAGE)."""


def one_line(message: object) -> str:
  """The first line of `message` with its whitespace runs collapsed; a KeyError gives its key
  text (str(KeyError) adds quotes)."""
  if isinstance(message, KeyError) and message.args:
    message = message.args[0]
  return " ".join(str(message).split("\n")[0].split())


def fail(message: object, code: int = EXIT_USAGE) -> NoReturn:
  """Prints "error: <one line>" on stderr and exits with `code` (no traceback)."""
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(code)


def stopped(reason: object = "") -> NoReturn:
  """Prints "stopped: ...; rerun the same command to continue" and exits EXIT_STOPPED."""
  print(f"\nstopped: {reason or 'interrupted'}; rerun the same command to continue",
        file=sys.stderr, flush=True)
  sys.exit(EXIT_STOPPED)


def no_arguments(argv: Sequence[str]) -> None:
  """fail() on positional arguments left after absl parsed the flags (argv[0]: the program)."""
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")


def guarded(body: Callable[[], T], errors: tuple[type[BaseException], ...], *,
            interruptible: bool = False) -> T:
  """body(); an exception of `errors` (the bad-input kinds of the caller) becomes fail(it); with
  `interruptible`, KeyboardInterrupt becomes stopped(it)."""
  try:
    return body()
  except errors as e:
    fail(e)
  except KeyboardInterrupt as e:
    if not interruptible:
      raise
    stopped(e)


def quiet_logging(keep: str = "cot2align_jax") -> None:
  """Unless --verbosity was given: absl and libraries (Orbax and grain log every file they
  write at INFO) from WARNING up, while the `keep` logger (this package: resume, stop lines)
  stays at INFO. Call after the flags are parsed."""
  if not FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger(keep).setLevel(logging.INFO)


def define_once(define: Callable[..., flags.FlagHolder], name: str, *args,
                flag_values: flags.FlagValues = FLAGS, **kwargs) -> flags.FlagHolder:
  """define(name, *args, **kwargs), or the holder of the flag of that name that an entry module
  imported earlier in this process defined (train, evaluate and generate_cot share --config
  and --workdir; tests import several). A same-named flag of another kind or default raises
  flags.DuplicateFlagError; the first definition's help text is kept."""
  if name not in flag_values:
    return define(name, *args, flag_values=flag_values, **kwargs)
  probe = flags.FlagValues()
  define(name, *args, flag_values=probe, **kwargs)
  new, old = probe[name], flag_values[name]
  if (type(new) is not type(old) or type(new.parser) is not type(old.parser)
      or new.default != old.default):
    raise flags.DuplicateFlagError.from_flag(name, flag_values)
  return flags.FlagHolder(flag_values, old)


def define_config_flag(help_string: str) -> flags.FlagHolder:
  """--config=FILE[:ARG], an ml_collections config file (locked) taking --config.<key>=value
  overrides; its value is the ConfigDict (None when not given)."""
  return define_once(config_flags.DEFINE_config_file, "config", None, help_string,
                     lock_config=True)


def config_spec(args: Sequence[str]) -> str | None:
  """The FILE[:ARG] of --config=FILE[:ARG] or --config FILE[:ARG] in `args`, else None."""
  for i, a in enumerate(args):
    if a.startswith("--config="):
      return a[len("--config="):]
    if a == "--config" and i + 1 < len(args):
      return args[i + 1]
  return None


def override_keys(args: Sequence[str]) -> list[str]:
  """The dotted keys of the --config.<key>=... (and --noconfig.<key>) overrides in `args`."""
  return [a.split("=", 1)[0].split("config.", 1)[1] for a in args
          if a.startswith("--config.") or a.startswith("--noconfig.")]


def config_flags_parser(check_config: Callable[[str, list[str]], None], *,
                        config_required: bool,
                        required: Mapping[str, str] | None = None,
                        flag_values: flags.FlagValues = FLAGS
                        ) -> Callable[[list[str]], list[str]]:
  """An absl `flags_parser` for app.run with one-line errors (exit EXIT_USAGE): first
  check_config(spec, override keys) on the --config argument (it raises ValueError on a missing
  file, an unknown key...), then absl's parse, then the `required` flags ({name: placeholder},
  e.g. {"workdir": "dir"}). --help and its kin go straight to absl."""
  def parse(argv: list[str]) -> list[str]:
    if any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
      return flag_values(argv)  # absl prints the usage and exits
    spec = config_spec(argv[1:])
    if spec is None and config_required:
      fail("--config=<file.py[:arg]> is required")
    if spec is not None:
      try:
        check_config(spec, override_keys(argv[1:]))
      except ValueError as e:
        fail(e)
    try:
      rest = flag_values(argv)
    except flags.Error as e:
      fail(e)
    except Exception as e:  # pylint: disable=broad-except
      fail(f"{type(e).__name__}: {e}")
    for name, placeholder in (required or {}).items():
      if not flag_values[name].value:
        fail(f"--{name}=<{placeholder}> is required")
    return rest

  return parse
