#!/usr/bin/env bash
# GPU launcher for cot2align_jax: one host with any number of GPUs (all visible GPUs form the
# device mesh), or several hosts (run this script once per host with the JAX_* variables
# below). See launch/README.md.
#
#   bash launch/gpu.sh install                      # venv + requirements + jax[cuda12]
#   bash launch/gpu.sh run --config.train.steps=100 # train on every visible GPU
#   DRY_RUN=1 bash launch/gpu.sh run                # print the command instead
#   bash launch/gpu.sh rehearse                     # 2 local CPU processes x 2 devices: the
#                                                   # multi-host path, before a pod/cluster run
set -euo pipefail

SELF="gpu.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# ---- settings (environment variables) ------------------------------------------------------
PYTHON="${PYTHON:-python3}"         # interpreter that creates the venv (>= 3.11)
VENV="${VENV:-$REPO_ROOT/.venv}"    # used when it exists; else `python` on PATH runs
CUDA="${CUDA:-12}"                  # install: jax[cuda12] or jax[cuda13]
CONFIG="${CONFIG:-configs/tiny.py:cot2align}"
WORKDIR="${WORKDIR:-runs/tiny}"
MESH_DATA="${MESH_DATA:--1}"        # --config.mesh.data (-1: every device); empty: config's own
GPUS="${GPUS:-}"                    # CUDA_VISIBLE_DEVICES, e.g. 0,1 (empty: all GPUs)
MEM_FRACTION="${MEM_FRACTION:-}"    # XLA_PYTHON_CLIENT_MEM_FRACTION (JAX's default: 0.75)
PREALLOCATE="${PREALLOCATE:-}"      # XLA_PYTHON_CLIENT_PREALLOCATE=false: allocate on demand
DEMO_DIR="${DEMO_DIR:-runs/demo}"
DEMO_SIZE="${DEMO_SIZE:-full}"
DRY_RUN="${DRY_RUN:-0}"
REHEARSE_PROCESSES="${REHEARSE_PROCESSES:-2}"  # rehearse: local CPU processes
REHEARSE_DEVICES="${REHEARSE_DEVICES:-2}"      # rehearse: CPU devices per process
REHEARSE_PORT="${REHEARSE_PORT:-12355}"        # rehearse: coordinator port on 127.0.0.1
# Multi-host: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID;
# COT2ALIGN_HEARTBEAT_TIMEOUT (s, default 100): a silent peer counts as dead and the survivors
# exit with one error line; COT2ALIGN_INIT_TIMEOUT (s, default 300): waiting for all to join.

usage() {
  cat <<EOF
usage: bash launch/$SELF SUBCOMMAND [ARGS...]

Subcommands (run on the GPU machine, from any directory):
  install                venv \$VENV with requirements.txt, jax[cuda\$CUDA] and pip install -e .
  run [OVERRIDES]        train on every visible GPU:
                           python -m cot2align_jax.train --config=\$CONFIG --workdir=\$WORKDIR \\
                             --config.mesh.data=\$MESH_DATA [--config.train.steps=N ...]
  resume [OVERRIDES]     the same command: training restores the latest checkpoint in
                         \$WORKDIR/checkpoints (pass the same overrides as the first run)
  evaluate [EVAL_FLAGS]  python -m cot2align_jax.evaluate --config=\$CONFIG --workdir=\$WORKDIR
  demo [DEMO_FLAGS]      python -m cot2align_jax.demo --workdir=\$DEMO_DIR --size=\$DEMO_SIZE
  rehearse [OVERRIDES]   the multi-host path on this machine, on CPU: \$REHEARSE_PROCESSES
                         processes x \$REHEARSE_DEVICES devices of one job (coordinator
                         127.0.0.1:\$REHEARSE_PORT), each running the 'run' command
  devices                print what JAX sees (processes, local and global devices)
  help                   this text

Settings (environment variables, with defaults):
  PYTHON=$PYTHON  VENV=$VENV  CUDA=$CUDA
  CONFIG=$CONFIG  WORKDIR=$WORKDIR  MESH_DATA=$MESH_DATA
  GPUS=${GPUS:-<all>}  MEM_FRACTION=${MEM_FRACTION:-<jax default>}  PREALLOCATE=${PREALLOCATE:-<jax default>}
  DEMO_DIR=$DEMO_DIR  DEMO_SIZE=$DEMO_SIZE  DRY_RUN=$DRY_RUN
  REHEARSE_PROCESSES=$REHEARSE_PROCESSES  REHEARSE_DEVICES=$REHEARSE_DEVICES  REHEARSE_PORT=$REHEARSE_PORT

Several hosts: start the same subcommand on every host, each with
  JAX_COORDINATOR_ADDRESS=<host 0>:<port>  JAX_NUM_PROCESSES=<hosts>  JAX_PROCESS_ID=<0..hosts-1>
(one process per host drives all its GPUs; WORKDIR must be one shared directory). Under
Slurm, use srun with one task per GPU instead: JAX reads the Slurm variables itself.
EOF
}

die() {
  echo "$SELF: $*" >&2
  exit 2
}

python_bin() {
  if [[ -x "$VENV/bin/python" ]]; then
    echo "$VENV/bin/python"
  elif command -v python >/dev/null 2>&1; then
    echo "python"
  else
    echo "python3"
  fi
}

# Exports the GPU and JAX_* settings; sets PY to the interpreter. With JAX_NUM_PROCESSES > 1
# the package (training/mesh.py:maybe_initialize_distributed) calls jax.distributed.initialize()
# with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, so all three must be set.
prepare() {
  cd "$REPO_ROOT"
  if [[ -n "$GPUS" ]]; then
    export CUDA_VISIBLE_DEVICES="$GPUS"
  fi
  if [[ -n "$MEM_FRACTION" ]]; then
    export XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION"
  fi
  if [[ -n "$PREALLOCATE" ]]; then
    export XLA_PYTHON_CLIENT_PREALLOCATE="$PREALLOCATE"
  fi
  if [[ "${JAX_NUM_PROCESSES:-1}" -gt 1 ]]; then
    [[ -n "${JAX_COORDINATOR_ADDRESS:-}" ]] || die "JAX_NUM_PROCESSES>1 needs JAX_COORDINATOR_ADDRESS"
    [[ -n "${JAX_PROCESS_ID:-}" ]] || die "JAX_NUM_PROCESSES>1 needs JAX_PROCESS_ID"
  fi
  local v
  for v in JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID COT2ALIGN_HEARTBEAT_TIMEOUT \
    COT2ALIGN_INIT_TIMEOUT; do
    if [[ -n "${!v:-}" ]]; then
      export "${v?}"
    fi
  done
  PY="$(python_bin)"
}

# run_py ARGS...: runs the interpreter on ARGS (DRY_RUN=1: prints the exports and the command).
run_py() {
  prepare
  if [[ "$DRY_RUN" == 1 ]]; then
    local v
    for v in CUDA_VISIBLE_DEVICES XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE \
      JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID; do
      if [[ -n "${!v:-}" ]]; then
        printf '+ export %s=%q\n' "$v" "${!v}"
      fi
    done
    printf '+ %s' "$PY"
    printf ' %q' "$@"
    printf '\n'
    return 0
  fi
  exec "$PY" "$@"
}

mesh_args() {
  MESH=()
  if [[ -n "$MESH_DATA" ]]; then
    MESH=(--config.mesh.data="$MESH_DATA")
  fi
}

cmd_install() {
  cd "$REPO_ROOT"
  local jax_version
  jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
  [[ -n "$jax_version" ]] || die "no jax==VERSION pin in requirements.txt"
  case "$CUDA" in
    12 | 13) ;;
    *) die "CUDA must be 12 or 13, got '$CUDA'" ;;
  esac
  local cmds=(
    "$PYTHON -m venv $VENV"
    "$VENV/bin/python -m pip install --upgrade pip"
    "$VENV/bin/python -m pip install -r requirements.txt"
    "$VENV/bin/python -m pip install jax[cuda$CUDA]==$jax_version"
    "$VENV/bin/python -m pip install --no-deps -e ."
  )
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "${cmds[@]}"
    return 0
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --upgrade pip
  "$VENV/bin/python" -m pip install -r requirements.txt
  "$VENV/bin/python" -m pip install "jax[cuda$CUDA]==$jax_version"
  "$VENV/bin/python" -m pip install --no-deps -e .
  "$VENV/bin/python" -c 'import jax; print(jax.devices())'
}

cmd_run() {
  mesh_args
  run_py -m cot2align_jax.train --config="$CONFIG" --workdir="$WORKDIR" "${MESH[@]}" "$@"
}

cmd_evaluate() {
  run_py -m cot2align_jax.evaluate --config="$CONFIG" --workdir="$WORKDIR" "$@"
}

# The step before a multi-host run: the same training command as REHEARSE_PROCESSES processes
# of one JAX job on this machine's CPU (gloo collectives), each with REHEARSE_DEVICES devices.
# Exits with the first non-zero status of the processes (0 when all finish).
cmd_rehearse() {
  [[ "${JAX_NUM_PROCESSES:-1}" -le 1 ]] || die "rehearse starts its own processes: unset JAX_NUM_PROCESSES"
  [[ "$REHEARSE_PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "REHEARSE_PROCESSES must be >= 1"
  [[ "$REHEARSE_DEVICES" =~ ^[1-9][0-9]*$ ]] || die "REHEARSE_DEVICES must be >= 1"
  mesh_args
  cd "$REPO_ROOT"
  PY="$(python_bin)"
  local i status=0 pids=()
  for ((i = 0; i < REHEARSE_PROCESSES; i++)); do
    local vars=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$REHEARSE_DEVICES"
      "JAX_COORDINATOR_ADDRESS=127.0.0.1:$REHEARSE_PORT" "JAX_NUM_PROCESSES=$REHEARSE_PROCESSES"
      "JAX_PROCESS_ID=$i")
    local argv=("$PY" -m cot2align_jax.train --config="$CONFIG" --workdir="$WORKDIR" "${MESH[@]}" "$@")
    if [[ "$DRY_RUN" == 1 ]]; then
      printf '+ env'
      printf ' %q' "${vars[@]}" "${argv[@]}"
      printf ' &\n'
      continue
    fi
    env "${vars[@]}" "${argv[@]}" &
    pids+=("$!")
  done
  for i in "${pids[@]}"; do
    wait "$i" || { local rc=$?; [[ "$status" != 0 ]] || status=$rc; }
  done
  return "$status"
}

cmd_demo() {
  run_py -m cot2align_jax.demo --workdir="$DEMO_DIR" --size="$DEMO_SIZE" "$@"
}

cmd_devices() {
  run_py -c 'import jax
from cot2align_jax.training.mesh import maybe_initialize_distributed
maybe_initialize_distributed()  # several processes (JAX_*, Slurm, ...): join the job first
print(f"process {jax.process_index()} of {jax.process_count()}: "
      f"{jax.local_device_count()} local / {jax.device_count()} global devices")
print(jax.local_devices())'
}

main() {
  local sub="${1:-}"
  case "$sub" in
    help | -h | --help)
      usage
      exit 0
      ;;
    "")
      usage >&2
      exit 2
      ;;
  esac
  shift
  case "$sub" in
    install) cmd_install "$@" ;;
    run | resume) cmd_run "$@" ;;
    evaluate) cmd_evaluate "$@" ;;
    demo) cmd_demo "$@" ;;
    rehearse) cmd_rehearse "$@" ;;
    devices) cmd_devices "$@" ;;
    *)
      echo "$SELF: unknown subcommand '$sub' (see: bash launch/$SELF help)" >&2
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
