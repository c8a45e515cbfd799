"""One line instead of a C++ crash dump when a peer process of a multi-process job dies.

When a process of a `jax.distributed` job dies (SIGKILL, OOM, a lost host), jax's coordination
service notices it (the coordinator at once; the other processes after
`heartbeat_timeout_seconds` without heartbeats) and terminates every survivor from a C++
thread: an `F...] Terminating process because the JAX distributed service detected fatal
errors` log line, a stack trace, SIGABRT. No Python code runs in between, so the survivor's
own code cannot print anything. `training/mesh.py` therefore routes a multi-process run's
stderr (file descriptor 2) through this relay, a small separate process started before
`jax.distributed.initialize`:

    python -m cot2align_jax.training.peer_loss PROCESS_ID NUM_PROCESSES   # stdin: the pipe

It copies everything to the real stderr unchanged until it sees jax's coordination-service
error lines; from there it holds the output back, and if the fatal line follows it drops the
dump and, once the dying process has closed the pipe, prints one line

    error: process 0 of 2: lost peer process 1 (jax.distributed: ...); restart all 2 ...

(held-back lines that turn out not to be fatal are released after a few seconds). The
survivor's exit status is jax's (SIGABRT: 134 in a shell, -6 from subprocess), never 0.
Standard library only: the relay starts in milliseconds and holds no jax state.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys
import time

# jax's coordination-service lines (absl log prefix "E1203 14:55:10.055 ... file.cc:123] ").
_COORD_LOG = re.compile(rb"^[EF]\d{4} [\d:.]+\s+\d+ (coordination_service\w*|client)\.(cc|h):\d+\]")
_FATAL = re.compile(rb"^F\d{4} .*(detected fatal errors|Terminating process)")
_UNHEALTHY = re.compile(rb"unhealthy \(stopped sending heartbeats\):\s*([\d,\s]+?)\s*\n"
                        rb"|task:(\d+)")
HOLD_SECONDS = 5.0   # held-back coordination lines not followed by a fatal one are released


def peer_loss_line(process_id: int, num_processes: int, held: bytes) -> str:
  """The one error line for a survivor whose dump `held` (bytes of jax's log lines) jax
  produced: which peers were lost, when jax's text says so."""
  lost = []
  for m in _UNHEALTHY.finditer(held):
    for group in m.groups():
      if group:
        lost += [int(t) for t in re.findall(rb"\d+", group) if int(t) != process_id]
  who = (f"lost peer process {', '.join(str(t) for t in sorted(set(lost)))}" if lost
         else "lost a peer process or the coordinator (process 0)")
  return (f"error: process {process_id} of {num_processes}: {who} (jax.distributed stopped "
          f"this process); restart all {num_processes} processes to resume from the last "
          "checkpoint")


def relay(src: int, dst: int, process_id: int, num_processes: int) -> int:
  """Copies `src` to `dst` until EOF (see the module doc); returns 0."""
  held, pending, fatal, held_since = b"", b"", False, None
  while True:
    timeout = None if held_since is None or fatal else max(
        0.0, HOLD_SECONDS - (time.monotonic() - held_since))
    ready, _, _ = select.select([src], [], [], timeout)
    if not ready:  # coordination lines without a fatal one: release them
      os.write(dst, held)
      held, held_since = b"", None
      continue
    chunk = os.read(src, 65536)
    if not chunk:
      break
    lines = (pending + chunk).split(b"\n")
    pending = lines.pop()
    out = b""
    for line in lines:
      line += b"\n"
      if fatal:
        continue
      if _FATAL.match(line):
        fatal = True
      elif _COORD_LOG.match(line) or held_since is not None:
        held += line
        held_since = held_since or time.monotonic()
      else:
        out += line
    if fatal and held_since is None:
      held_since = time.monotonic()
    if not fatal and held_since is None and pending and not _COORD_LOG.match(pending):
      out, pending = out + pending, b""  # progress bars (\r) and prompts without a newline
    if held and not fatal and time.monotonic() - held_since > HOLD_SECONDS:
      out, held, held_since = out + held, b"", None
    if out:
      os.write(dst, out)
  if fatal:
    os.write(dst, (peer_loss_line(process_id, num_processes, held) + "\n").encode())
  else:
    os.write(dst, held + pending)
  return 0


def main(argv: list[str]) -> int:
  # Ctrl-C and SIGTERM reach the whole process group: the relay keeps copying until the
  # process it serves has closed the pipe.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  process_id, num_processes = int(argv[1]), int(argv[2])
  return relay(sys.stdin.fileno(), sys.stdout.fileno(), process_id, num_processes)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
