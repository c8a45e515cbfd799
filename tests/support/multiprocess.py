"""Running the package's commands as a local multi-process JAX job on CPU (test helper).

    procs = launch("cot2align_jax.train", args, env, processes=2, devices=2)
    results = wait_all(procs, timeout=300)          # [(returncode, stdout, stderr), ...]

Each process gets the variables launch/gpu.sh passes to a multi-node job
(JAX_COORDINATOR_ADDRESS on 127.0.0.1 with a free port, JAX_NUM_PROCESSES, JAX_PROCESS_ID) and
`devices` fake CPU devices (XLA_FLAGS); `processes=1` starts one plain process with all
`devices` (the one-process reference run).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return int(s.getsockname()[1])


def process_env(base: Mapping[str, str], *, devices: int, process_id: int | None = None,
                processes: int = 1, port: int | None = None) -> dict[str, str]:
  """`base` with `devices` CPU devices and, for processes > 1, the JAX_* job variables."""
  env = {k: v for k, v in base.items() if not k.startswith("JAX_COORDINATOR")
         and k not in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
               JAX_PROCESS_ID=str(process_id))
  return env


def launch(module: str, args: Sequence[str], env: Mapping[str, str], *, processes: int,
           devices: int) -> list[subprocess.Popen]:
  """Starts `python -m module args` as `processes` processes of one job (see the module doc)."""
  port = free_port() if processes > 1 else None
  procs = []
  for i in range(processes):
    e = process_env(env, devices=devices, process_id=i, processes=processes, port=port)
    procs.append(subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=e,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


def wait_all(procs: Sequence[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
  """(returncode, stdout, stderr) of every process; kills them all when `timeout` passes."""
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=timeout)
      out.append((p.returncode, stdout, stderr))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return out
