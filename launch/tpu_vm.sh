#!/usr/bin/env bash
# Cloud TPU VM launcher for cot2align_jax: create a TPU VM (single host or pod slice), install
# the project on every worker, run training on all workers at once, follow its logs, resume
# after preemption, delete. Everything goes through `gcloud compute tpus tpu-vm ...`.
#
#   bash launch/tpu_vm.sh help          # subcommands and settings
#   DRY_RUN=1 bash launch/tpu_vm.sh run # print the gcloud commands instead of running them
#
# See launch/README.md for the walk-through.
set -euo pipefail

SELF="tpu_vm.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# ---- settings (environment variables) ------------------------------------------------------
TPU_NAME="${TPU_NAME:-cot2align}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
VERSION="${VERSION:-}"              # TPU software version; empty: chosen from ACCELERATOR
PROJECT="${PROJECT:-}"              # empty: gcloud's configured project
SPOT="${SPOT:-0}"                   # 1: create a Spot TPU VM (can be preempted at any time)
PREEMPTIBLE="${PREEMPTIBLE:-0}"     # 1: create a (legacy) preemptible TPU VM
REPO_URL="${REPO_URL:-}"            # empty: copy this checkout; else git clone it on each worker
REPO_REF="${REPO_REF:-}"            # branch / tag / commit to check out after cloning
REMOTE_DIR="${REMOTE_DIR:-cot2align_jax}"  # project directory on each worker (relative to ~)
PYTHON="${PYTHON:-python3.11}"      # interpreter for the venv on the workers (>= 3.11)
CONFIG="${CONFIG:-configs/tiny.py:cot2align}"
WORKDIR="${WORKDIR:-runs/tiny}"     # relative to REMOTE_DIR, or absolute; see launch/README.md
MESH_DATA="${MESH_DATA:--1}"        # --config.mesh.data (-1: every device); empty: config's own
LOGDIR="${LOGDIR:-launch_logs}"     # per-worker log directory (relative to REMOTE_DIR)
PRE_RUN="${PRE_RUN:-}"              # shell command each worker runs before training (mounts...)
REMOTE_ENV="${REMOTE_ENV:-}"        # extra "VAR=value ..." exported for training on the workers
DEMO_DIR="${DEMO_DIR:-runs/demo}"
DEMO_SIZE="${DEMO_SIZE:-full}"
WORKER="${WORKER:-0}"               # worker for logs / ssh / demo / fetch
FOREGROUND="${FOREGROUND:-0}"       # 1: run training attached to this terminal
POLL_SECONDS="${POLL_SECONDS:-120}" # watch: seconds between checks
NUM_WORKERS="${NUM_WORKERS:-}"      # hosts in the slice; empty: asked from gcloud describe
DRY_RUN="${DRY_RUN:-0}"

usage() {
  cat <<EOF
usage: bash launch/$SELF SUBCOMMAND [ARGS...]

Subcommands (run from your workstation; gcloud must be authenticated):
  create [GCLOUD_FLAGS]  create the TPU VM \$TPU_NAME (\$ACCELERATOR, software \$VERSION)
  install                put the project on every worker (git clone \$REPO_URL, or copy this
                         checkout), make a venv with requirements.txt + jax[tpu], pip install -e .
  run [OVERRIDES]        start training on ALL workers at once (detached; logs in \$LOGDIR):
                           python -m cot2align_jax.train --config=\$CONFIG --workdir=\$WORKDIR \\
                             --config.mesh.data=\$MESH_DATA [--config.train.steps=N ...]
  resume [OVERRIDES]     the same command again: training restores the latest checkpoint in
                         \$WORKDIR/checkpoints (pass the same overrides as the first run)
  watch [OVERRIDES]      for Spot/preemptible TPUs: loop until training has finished, recreating,
                         reinstalling and relaunching the VM after each preemption
  stop                   SIGTERM to training on every worker (it saves a checkpoint, exits 0)
  status                 TPU state and, per worker, RUNNING / DONE / STOPPED / FAILED / IDLE
  logs [LINES]           tail the training log of worker \$WORKER (FOLLOW=1 to follow it)
  demo [DEMO_FLAGS]      on worker \$WORKER: python -m cot2align_jax.demo --workdir=\$DEMO_DIR \\
                           --size=\$DEMO_SIZE (best on a single-host slice such as v4-8)
  evaluate [EVAL_FLAGS]  on all workers: python -m cot2align_jax.evaluate --config=\$CONFIG \\
                           --workdir=\$WORKDIR (its results land in \$WORKDIR/eval)
  copy SRC DEST          scp a local file/folder to DEST (relative to ~) on every worker
  fetch SRC [DEST]       scp SRC (relative to ~) from worker \$WORKER to DEST (default: .)
  ssh [SSH_ARGS]         interactive shell on worker \$WORKER
  delete                 delete the TPU VM
  help                   this text

Settings (environment variables, with defaults):
  TPU_NAME=$TPU_NAME  ZONE=$ZONE  ACCELERATOR=$ACCELERATOR  PROJECT=${PROJECT:-<gcloud default>}
  VERSION=${VERSION:-<from ACCELERATOR>}  SPOT=$SPOT  PREEMPTIBLE=$PREEMPTIBLE
  REPO_URL=${REPO_URL:-<copy this checkout>}  REPO_REF=${REPO_REF:-<default branch>}
  REMOTE_DIR=$REMOTE_DIR  PYTHON=$PYTHON
  CONFIG=$CONFIG  WORKDIR=$WORKDIR  MESH_DATA=$MESH_DATA
  LOGDIR=$LOGDIR  PRE_RUN=${PRE_RUN:-<none>}  REMOTE_ENV=${REMOTE_ENV:-<none>}
  DEMO_DIR=$DEMO_DIR  DEMO_SIZE=$DEMO_SIZE  WORKER=$WORKER  FOREGROUND=$FOREGROUND
  POLL_SECONDS=$POLL_SECONDS  NUM_WORKERS=${NUM_WORKERS:-<from gcloud>}  DRY_RUN=$DRY_RUN

On a pod slice (more than one host) every worker runs the same command; the script exports
JAX_NUM_PROCESSES, so the package calls jax.distributed.initialize() with that process count
and JAX reads the coordinator and the host's index from the TPU metadata. WORKDIR must then be
one directory shared by all workers (NFS / Filestore mounted at the same path, e.g. via
PRE_RUN); gs:// URLs are not accepted.
EOF
}

die() {
  echo "$SELF: $*" >&2
  exit 2
}

log() {
  echo "[$SELF $(date -u +%H:%M:%S)] $*" >&2
}

q() {
  printf '%q' "$1"
}

# Each argument shell-quoted, each preceded by a space.
qargs() {
  local out="" a
  for a in "$@"; do
    out+=" $(q "$a")"
  done
  printf '%s' "$out"
}

# Runs gcloud, or prints the command with DRY_RUN=1.
gc() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ gcloud %s\n' "$*"
    return 0
  fi
  command -v gcloud >/dev/null 2>&1 || die "gcloud not found: install the Google Cloud CLI"
  gcloud "$@"
}

location_flags() {
  LOC=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then
    LOC+=(--project="$PROJECT")
  fi
}

default_version() {
  case "$ACCELERATOR" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}

# ssh WORKERS SCRIPT [EXTRA_GCLOUD_FLAGS]: runs SCRIPT with bash on the given workers.
remote() {
  local workers="$1" script="$2"
  shift 2
  location_flags
  gc compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}" --worker="$workers" \
    --command="bash -c $(q "$script")" "$@"
}

# The TPU's state (READY, CREATING, PREEMPTED, ...) or NOT_FOUND.
tpu_state() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "READY"
    return 0
  fi
  location_flags
  gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOC[@]}" --format="value(state)" \
    2>/dev/null || echo "NOT_FOUND"
}

num_workers() {
  if [[ -n "$NUM_WORKERS" ]]; then
    echo "$NUM_WORKERS"
  elif [[ "$DRY_RUN" == 1 ]]; then
    echo 1
  else
    location_flags
    local n
    n="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOC[@]}" \
      --format="value(networkEndpoints.len())")" || die "cannot describe TPU $TPU_NAME"
    echo "${n:-1}"
  fi
}

# Shell lines that enter the project directory and set up the training environment.
remote_prelude() {
  local n="$1"
  printf 'set -euo pipefail; cd %s; ' "$(q "$REMOTE_DIR")"
  if [[ -n "$PRE_RUN" ]]; then
    printf '%s; ' "$PRE_RUN"
  fi
  # JAX_NUM_PROCESSES > 1 makes the package (training/mesh.py:maybe_initialize_distributed)
  # call jax.distributed.initialize(num_processes=N); JAX reads the coordinator address and this
  # host's index from the TPU metadata server.
  printf 'export JAX_NUM_PROCESSES=%s; ' "$(q "$n")"
  if [[ -n "$REMOTE_ENV" ]]; then
    printf 'export %s; ' "$REMOTE_ENV"
  fi
}

mesh_args() {
  if [[ -n "$MESH_DATA" ]]; then
    printf ' --config.mesh.data=%s' "$(q "$MESH_DATA")"
  fi
}

cmd_create() {
  location_flags
  local version="${VERSION:-$(default_version)}"
  local args=(compute tpus tpu-vm create "$TPU_NAME" "${LOC[@]}"
    --accelerator-type="$ACCELERATOR" --version="$version")
  if [[ "$SPOT" == 1 ]]; then
    args+=(--spot)
  fi
  if [[ "$PREEMPTIBLE" == 1 ]]; then
    args+=(--preemptible)
  fi
  gc "${args[@]}" "$@"
}

# Tarball of this checkout's tracked and untracked-but-not-ignored files.
make_tarball() {
  local out="$1"
  command -v git >/dev/null 2>&1 || die "git not found (needed to list the files to copy)"
  git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "$REPO_ROOT is not a git checkout: set REPO_URL instead"
  (
    cd "$REPO_ROOT"
    git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        if [[ -f "$f" ]]; then
          printf '%s\0' "$f"
        fi
      done | tar --null -T - -czf "$out"
  )
}

cmd_install() {
  local jax_version
  jax_version="$(sed -n 's/^jax==//p' "$REPO_ROOT/requirements.txt")"
  [[ -n "$jax_version" ]] || die "no jax==VERSION pin in requirements.txt"
  local fetch
  if [[ -n "$REPO_URL" ]]; then
    fetch="if [ -d $(q "$REMOTE_DIR")/.git ]; then git -C $(q "$REMOTE_DIR") fetch --all --tags; \
else git clone $(q "$REPO_URL") $(q "$REMOTE_DIR"); fi; "
    if [[ -n "$REPO_REF" ]]; then
      fetch+="git -C $(q "$REMOTE_DIR") checkout $(q "$REPO_REF"); "
    else
      fetch+="git -C $(q "$REMOTE_DIR") pull --ff-only || true; "
    fi
  else
    local tarball=/tmp/cot2align_src.tar.gz
    if [[ "$DRY_RUN" != 1 ]]; then
      tarball="$(mktemp "${TMPDIR:-/tmp}/cot2align_src.XXXXXX")"
      # shellcheck disable=SC2064  # expand now: the local variable is gone at exit
      trap "rm -f $(q "$tarball")" EXIT
      make_tarball "$tarball"
    fi
    location_flags
    gc compute tpus tpu-vm scp "$tarball" "$TPU_NAME":cot2align_src.tar.gz "${LOC[@]}" \
      --worker=all
    fetch="mkdir -p $(q "$REMOTE_DIR"); tar -xzf cot2align_src.tar.gz -C $(q "$REMOTE_DIR"); "
  fi
  local script
  script="set -euo pipefail; \
if ! command -v $(q "$PYTHON") >/dev/null; then sudo apt-get update -qq; \
sudo apt-get install -y -qq $(q "$PYTHON") $(q "$PYTHON")-venv; fi; \
${fetch}cd $(q "$REMOTE_DIR"); \
$(q "$PYTHON") -m venv .venv; \
.venv/bin/python -m pip install -q --upgrade pip; \
.venv/bin/python -m pip install -q -r requirements.txt; \
.venv/bin/python -m pip install -q $(q "jax[tpu]==$jax_version"); \
.venv/bin/python -m pip install -q --no-deps -e .; \
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)'"
  # All workers at once: on a pod slice the final device check needs every host up together.
  remote all "$script"
}

cmd_run() {
  local n script
  n="$(num_workers)"
  local launch
  launch=".venv/bin/python -m cot2align_jax.train --config=$(q "$CONFIG") --workdir=$(q "$WORKDIR")$(mesh_args)$(qargs "$@")"
  local logf
  logf="$(q "$LOGDIR")/train.log"
  script="$(remote_prelude "$n")mkdir -p $(q "$LOGDIR"); rm -f $(q "$LOGDIR")/train.exit $(q "$LOGDIR")/train.pid; "
  script+="echo \"=== \$(date -u +%FT%TZ) \$(hostname): $(q "$CONFIG") -> $(q "$WORKDIR")\" >> $logf; "
  if [[ "$FOREGROUND" == 1 ]]; then
    script+="$launch 2>&1 | tee -a $logf"
  else
    # Detached (survives the ssh session); the pid file lets `stop` signal only the trainer,
    # and train.exit records its exit status for `status` / `watch`.
    local inner
    inner="$launch & echo \$! > $(q "$LOGDIR")/train.pid; wait \$!; echo \$? > $(q "$LOGDIR")/train.exit"
    script+="setsid nohup bash -c $(q "$inner") >> $logf 2>&1 < /dev/null & "
    script+="echo \"\$(hostname): started; logs in $(q "$REMOTE_DIR")/$logf\""
  fi
  log "training on $n worker(s) of $TPU_NAME: $CONFIG -> $WORKDIR"
  remote all "$script"
}

cmd_evaluate() {
  local n
  n="$(num_workers)"
  local script
  script="$(remote_prelude "$n").venv/bin/python -m cot2align_jax.evaluate --config=$(q "$CONFIG") --workdir=$(q "$WORKDIR")$(qargs "$@")"
  remote all "$script"
}

cmd_demo() {
  local script
  script="set -euo pipefail; cd $(q "$REMOTE_DIR"); ${REMOTE_ENV:+export $REMOTE_ENV; }"
  script+=".venv/bin/python -m cot2align_jax.demo --workdir=$(q "$DEMO_DIR") --size=$(q "$DEMO_SIZE")$(qargs "$@")"
  remote "$WORKER" "$script"
  log "results on worker $WORKER in ~/$REMOTE_DIR/$DEMO_DIR; copy them here with:"
  log "  bash launch/$SELF fetch $REMOTE_DIR/$DEMO_DIR ."
}

# Prints "HOST STATUS"; STATUS: RUNNING, DONE, STOPPED (ended by SIGTERM after saving a
# checkpoint), FAILED <exit code> or IDLE (never started here).
status_script() {
  local d
  d="$(q "$REMOTE_DIR")/$(q "$LOGDIR")"
  printf '%s' "d=$d; \
if [ -f \$d/train.pid ] && kill -0 \"\$(cat \$d/train.pid)\" 2>/dev/null; then s=RUNNING; \
elif [ -f \$d/train.exit ]; then c=\$(cat \$d/train.exit); \
if [ \"\$c\" != 0 ]; then s=\"FAILED \$c\"; \
elif tail -n 50 \$d/train.log | grep -q '\"preempted\": true'; then s=STOPPED; \
else s=DONE; fi; \
else s=IDLE; fi; echo \"\$(hostname) \$s\""
}

cmd_status() {
  location_flags
  gc compute tpus tpu-vm describe "$TPU_NAME" "${LOC[@]}" \
    --format="table(name.basename(),state,acceleratorType,health)"
  remote all "$(status_script)"
}

cmd_stop() {
  local d
  d="$(q "$REMOTE_DIR")/$(q "$LOGDIR")"
  remote all "if [ -f $d/train.pid ] && kill -TERM \"\$(cat $d/train.pid)\" 2>/dev/null; \
then echo \"\$(hostname): SIGTERM sent (checkpoint, then exit)\"; \
else echo \"\$(hostname): no training running\"; fi"
}

cmd_logs() {
  local lines="${1:-100}"
  local follow=""
  if [[ "${FOLLOW:-0}" == 1 ]]; then
    follow=" -f"
  fi
  remote "$WORKER" "tail -n $(q "$lines")$follow $(q "$REMOTE_DIR")/$(q "$LOGDIR")/train.log"
}

cmd_copy() {
  [[ $# -eq 2 ]] || die "usage: $SELF copy SRC DEST"
  location_flags
  gc compute tpus tpu-vm scp --recurse "$1" "$TPU_NAME":"$2" "${LOC[@]}" --worker=all
}

cmd_fetch() {
  [[ $# -ge 1 && $# -le 2 ]] || die "usage: $SELF fetch SRC [DEST]"
  location_flags
  gc compute tpus tpu-vm scp --recurse "$TPU_NAME":"$1" "${2:-.}" "${LOC[@]}" \
    --worker="$WORKER"
}

cmd_ssh() {
  location_flags
  gc compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}" --worker="$WORKER" "$@"
}

cmd_delete() {
  location_flags
  gc compute tpus tpu-vm delete "$TPU_NAME" "${LOC[@]}" "$@"
}

recreate_and_launch() {
  cmd_create && cmd_install && cmd_run "$@"
}

cmd_watch() {
  if [[ "$DRY_RUN" == 1 ]]; then
    log "watch: every ${POLL_SECONDS}s, check the TPU state; when it is gone or preempted:"
    cmd_delete --quiet
    recreate_and_launch "$@"
    return 0
  fi
  local state status
  while true; do
    state="$(tpu_state)"
    case "$state" in
      READY)
        status="$(remote 0 "$(status_script)" 2>/dev/null | tail -n 1 || true)"
        case "$status" in
          *" RUNNING") ;;
          *" DONE")
            log "training finished ($WORKDIR on $TPU_NAME)"
            return 0
            ;;
          *" FAILED"*)
            log "training failed (${status#* }); see: bash launch/$SELF logs"
            return 1
            ;;
          *" IDLE" | *" STOPPED")
            log "TPU is READY, training is not running (${status#* }): relaunching (resume)"
            cmd_run "$@" || log "launch failed; retrying in ${POLL_SECONDS}s"
            ;;
          *) log "cannot read the training status (${status:-no answer}); retrying" ;;
        esac
        ;;
      NOT_FOUND)
        log "TPU $TPU_NAME does not exist: creating, installing, launching"
        recreate_and_launch "$@" || log "(re)creation failed; retrying in ${POLL_SECONDS}s"
        ;;
      PREEMPTED | TERMINATED | STOPPED)
        log "TPU is $state: deleting it to recreate it"
        cmd_delete --quiet || true
        continue
        ;;
      *) log "TPU state is ${state:-unknown}; waiting" ;;
    esac
    sleep "$POLL_SECONDS"
  done
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
    create) cmd_create "$@" ;;
    install) cmd_install "$@" ;;
    run | resume) cmd_run "$@" ;;
    watch) cmd_watch "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    logs) cmd_logs "$@" ;;
    demo) cmd_demo "$@" ;;
    evaluate) cmd_evaluate "$@" ;;
    copy) cmd_copy "$@" ;;
    fetch) cmd_fetch "$@" ;;
    ssh) cmd_ssh "$@" ;;
    delete) cmd_delete "$@" ;;
    *)
      echo "$SELF: unknown subcommand '$sub' (see: bash launch/$SELF help)" >&2
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
