"""core/cli.py: flags defined once, one-line errors with their exit codes, the --config check."""

from __future__ import annotations

import pytest
from absl import flags

from cot2align_jax.core import cli


def test_one_line_keeps_the_first_line_collapsed():
  assert cli.one_line("bad  value\n  details\nmore") == "bad value"
  assert cli.one_line(KeyError("no such key")) == "no such key"   # not "'no such key'"


def test_fail_prints_one_line_and_exits_2(capsys):
  with pytest.raises(SystemExit) as e:
    cli.fail(ValueError("config file not found: x.py\ntraceback-like detail"))
  assert e.value.code == cli.EXIT_USAGE == 2
  assert capsys.readouterr().err == "error: config file not found: x.py\n"


def test_guarded_turns_listed_errors_into_exit_2(capsys):
  assert cli.guarded(lambda: 7, (ValueError,)) == 7
  with pytest.raises(SystemExit) as e:
    cli.guarded(lambda: int("x"), (ValueError,))
  assert e.value.code == 2 and capsys.readouterr().err.startswith("error: invalid literal")
  with pytest.raises(ZeroDivisionError):   # not a listed kind: a real bug keeps its traceback
    cli.guarded(lambda: 1 / 0, (ValueError,))


def test_guarded_interrupt_exits_130_only_when_asked(capsys):
  def interrupted():
    raise KeyboardInterrupt("at step 3")
  with pytest.raises(KeyboardInterrupt):
    cli.guarded(interrupted, (ValueError,))
  with pytest.raises(SystemExit) as e:
    cli.guarded(interrupted, (ValueError,), interruptible=True)
  assert e.value.code == cli.EXIT_STOPPED == 130
  assert "stopped: at step 3; rerun the same command to continue" in capsys.readouterr().err


def test_no_arguments(capsys):
  cli.no_arguments(["prog"])
  with pytest.raises(SystemExit) as e:
    cli.no_arguments(["prog", "a", "b"])
  assert e.value.code == 2 and capsys.readouterr().err == "error: unexpected arguments: a b\n"


def test_define_once_shares_a_flag_and_refuses_another_kind():
  fv = flags.FlagValues()
  first = cli.define_once(flags.DEFINE_string, "workdir", None, "first help", flag_values=fv)
  again = cli.define_once(flags.DEFINE_string, "workdir", None, "other help", flag_values=fv)
  fv(["prog", "--workdir=/tmp/w"])
  assert first.value == again.value == "/tmp/w"
  assert fv["workdir"].help == "first help"
  with pytest.raises(flags.DuplicateFlagError):
    cli.define_once(flags.DEFINE_integer, "workdir", None, "an int", flag_values=fv)
  with pytest.raises(flags.DuplicateFlagError):
    cli.define_once(flags.DEFINE_string, "workdir", "runs/x", "another default", flag_values=fv)


def test_config_argument_scanning():
  args = ["--config=configs/tiny.py:sft", "--config.train.steps=3", "--noconfig.data.flag",
          "--workdir=w"]
  assert cli.config_spec(args) == "configs/tiny.py:sft"
  assert cli.config_spec(["--config", "a.py"]) == "a.py" and cli.config_spec(["--x=1"]) is None
  assert cli.override_keys(args) == ["train.steps", "data.flag"]


def _parser(checked, **kw):
  fv = flags.FlagValues()
  flags.DEFINE_string("config", None, "config file", flag_values=fv)
  flags.DEFINE_string("workdir", None, "run dir", flag_values=fv)

  def check(spec, keys):
    checked.append((spec, keys))
    if "bad" in spec:
      raise ValueError(f"config file not found: {spec}")

  return cli.config_flags_parser(check, flag_values=fv, **kw), fv


def test_config_flags_parser(capsys):
  checked = []
  parse, fv = _parser(checked, config_required=True, required={"workdir": "dir"})
  assert parse(["prog", "--config=a.py", "--workdir=w"]) == ["prog"]
  assert checked == [("a.py", [])] and fv.workdir == "w"
  for argv, message in [(["prog", "--workdir=w"], "--config=<file.py[:arg]> is required"),
                        (["prog", "--config=bad.py", "--workdir=w"],
                         "config file not found: bad.py"),
                        (["prog", "--config=a.py"], "--workdir=<dir> is required"),
                        (["prog", "--config=a.py", "--nope=1"], "Unknown command line flag")]:
    fv.unparse_flags()
    with pytest.raises(SystemExit) as e:
      parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
  optional, _ = _parser([], config_required=False)
  assert optional(["prog"]) == ["prog"]
