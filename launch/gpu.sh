#!/usr/bin/env bash
# Trains dense_ssl on one GPU node. A single process sees all the local GPUs, and the script
# runs the trainer again whenever it exits with 75 (preempted, checkpoint saved). See
# launch/README.md.
#
#   launch/gpu.sh --config=configs/densecl.py --workdir=runs/densecl --data_dir=/data/tfds
#
# --dry-run (or DRY_RUN=1) prints every command as "+ ..." and runs none of them.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh [options] [-- trainer flags...]

Runs `python -m dense_ssl.main` on this node, in one process that sees every local GPU (or those
chosen with --gpus). When the trainer exits with 75 (SIGTERM: checkpoint saved, see
dense_ssl.train.PREEMPTED_EXIT_CODE) it is started again and resumes from --workdir. When this
script itself receives SIGTERM or SIGINT, it passes the signal on, waits for the checkpoint and
exits with the trainer's code, without a restart.

  --config=FILE[:VARIANT]  e.g. configs/densecl.py; required
  --workdir=DIR            checkpoints and TensorBoard logs (local path or gs://); required

The trainer runs in the repository root. Relative paths are taken from the current directory,
except a --config that exists relative to the repository root.
  --data_dir=DIR           TFDS data directory, passed as --config.data.data_dir
  --gpus=LIST              e.g. 0,1,2,3: sets CUDA_VISIBLE_DEVICES; default: all GPUs
  --mem_fraction=F         XLA_PYTHON_CLIENT_MEM_FRACTION, the share of each GPU's memory that
                           JAX preallocates; default 0.90
  --python=PYTHON          default: .venv/bin/python in the repository if it exists,
                           else python3
  --install                first install dense_ssl from this checkout into .venv:
                           pip install -e ".[cuda12,torch]" at requirements.lock's versions
                           (the Fashion-MNIST probes also need the Debian package
                           dataset-fashion-mnist)
  --cuda=EXTRA             dense_ssl extra for --install: cuda12 or cuda13 (jax[cuda12|13]);
                           default cuda12
  --max_restarts=N         give up after N restarts on exit code 75; default 20
  --dry-run                print the commands ("+ ..." on stdout) without running them; also
                           DRY_RUN=1. DRY_RUN_EXIT_CODES lists simulated trainer exit codes
                           in order (default 0)
  -h, --help               this help
  -- FLAGS...              further trainer flags, e.g. -- --config.batch_size=512

Environment set for the trainer (an existing value wins): XLA_PYTHON_CLIENT_MEM_FRACTION,
TF_FORCE_GPU_ALLOW_GROWTH=true, TF_CPP_MIN_LOG_LEVEL=2, NCCL_DEBUG=WARN.
EOF
}

log() { echo "[gpu] $*" >&2; }
die() { echo "gpu.sh: error: $*" >&2; exit 2; }
dry() { [[ "${DRY_RUN:-0}" != 0 ]]; }

# Prints one shell word, quoted only where needed (--flag='va lue' keeps the flag readable).
quote_word() {
  local w=$1 safe='^[A-Za-z0-9_./:=@,+%-]+$'
  if [[ $w =~ $safe ]]; then
    printf '%s' "$w"
  elif [[ $w =~ ^(--?[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote_word "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${w//\'/\'\\\'\'}"
  fi
}

print_cmd() {
  local w
  printf '+'
  for w in "$@"; do
    printf ' '
    quote_word "$w"
  done
  printf '\n'
}

# Runs a command, or prints it in dry-run mode.
run() {
  if dry; then
    print_cmd "$@"
  else
    print_cmd "$@" >&2
    "$@"
  fi
}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG=""
WORKDIR=""
DATA_DIR=""
GPUS=""
MEM_FRACTION=""
PYTHON=""
INSTALL=0
CUDA=cuda12
MAX_RESTARTS=20
EXTRA=()

# Reads --flag=value or --flag value; sets VALUE and SHIFT.
flag_value() {
  if [[ $1 == *=* ]]; then
    VALUE=${1#*=}
    SHIFT=1
  else
    (($# >= 2)) || die "$1 needs a value"
    VALUE=$2
    SHIFT=2
  fi
}

while (($# > 0)); do
  SHIFT=1
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run | --dry_run) DRY_RUN=1 ;;
    --config | --config=*) flag_value "$@"; CONFIG=$VALUE ;;
    --workdir | --workdir=*) flag_value "$@"; WORKDIR=$VALUE ;;
    --data[-_]dir | --data[-_]dir=*) flag_value "$@"; DATA_DIR=$VALUE ;;
    --gpus | --gpus=*) flag_value "$@"; GPUS=$VALUE ;;
    --mem[-_]fraction | --mem[-_]fraction=*) flag_value "$@"; MEM_FRACTION=$VALUE ;;
    --python | --python=*) flag_value "$@"; PYTHON=$VALUE ;;
    --install) INSTALL=1 ;;
    --cuda | --cuda=*) flag_value "$@"; CUDA=$VALUE ;;
    --max[-_]restarts | --max[-_]restarts=*) flag_value "$@"; MAX_RESTARTS=$VALUE ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown flag $1 (see --help; trainer flags go after --)" ;;
  esac
  shift "$SHIFT"
done

[[ -n "$CONFIG" ]] || die "--config is required, e.g. --config=configs/densecl.py"
[[ -n "$WORKDIR" ]] || die "--workdir is required"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max_restarts must be a number"
[[ $CUDA =~ ^cuda1[0-9]$ ]] || die "--cuda must be cuda12 or cuda13 (got $CUDA)"

# The trainer runs in the repository root; paths given relative to the current directory are
# made absolute first (a --config found relative to the repository root stays as it is).
absolute() {
  if [[ -z $1 || $1 == /* || $1 == *://* ]]; then
    echo "$1"
  else
    echo "$PWD/$1"
  fi
}
WORKDIR=$(absolute "$WORKDIR")
DATA_DIR=$(absolute "$DATA_DIR")
[[ $PYTHON == */* ]] && PYTHON=$(absolute "$PYTHON")
if [[ ! -e "$REPO_ROOT/${CONFIG%%:*}" && -e "${CONFIG%%:*}" ]]; then
  CONFIG=$(absolute "$CONFIG")
fi
cd "$REPO_ROOT"

# The package from this checkout, at the lock's versions (constraints: nothing else is
# installed); torch, for the .pth export only, is the lock's CPU build from PyTorch's CPU index.
if ((INSTALL)); then
  if [[ ! -x .venv/bin/python ]]; then
    VENV_PYTHON=$(command -v python3.11 || command -v python3) || die "no python3 to create .venv"
    run "$VENV_PYTHON" -m venv .venv
  fi
  run .venv/bin/pip install -q -c requirements.lock -e ".[$CUDA,torch]" \
    --extra-index-url https://download.pytorch.org/whl/cpu
fi
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]] || ((INSTALL)); then
    PYTHON=.venv/bin/python
  else
    PYTHON=python3
  fi
fi

# Environment: set only what the caller has not set.
setenv() {
  local name=$1 value=$2
  if [[ -z "${!name:-}" ]]; then
    run export "$name=$value"
    dry || export "$name=$value"
  fi
}
[[ -n "$GPUS" ]] && { run export "CUDA_VISIBLE_DEVICES=$GPUS"; dry || export CUDA_VISIBLE_DEVICES="$GPUS"; }
if [[ -n "$MEM_FRACTION" ]]; then
  run export "XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION"
  dry || export XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION"
else
  setenv XLA_PYTHON_CLIENT_MEM_FRACTION 0.90
fi
setenv TF_FORCE_GPU_ALLOW_GROWTH true
setenv TF_CPP_MIN_LOG_LEVEL 2
setenv NCCL_DEBUG WARN

if ! dry && command -v nvidia-smi >/dev/null; then
  log "GPUs: $(nvidia-smi -L | wc -l) on $(hostname)${GPUS:+ (using $GPUS)}"
fi

CMD=("$PYTHON" -m dense_ssl.main --config="$CONFIG" --workdir="$WORKDIR")
[[ -n "$DATA_DIR" ]] && CMD+=(--config.data.data_dir="$DATA_DIR")
CMD+=("${EXTRA[@]}")

# A SIGTERM/SIGINT for this script goes on to the trainer, which saves a checkpoint and exits
# with 75; then this script exits instead of restarting it.
STOPPING=0
SIGNALLED=0
CHILD=""
on_signal() {
  STOPPING=1
  SIGNALLED=1
  log "received $1: passing it on to the trainer"
  if [[ -n "$CHILD" ]]; then
    kill -"$1" "$CHILD" 2>/dev/null || true
  fi
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

# Runs the trainer once; sets RC to its exit code.
train_once() {
  if dry; then
    print_cmd "${CMD[@]}"
    local -a codes
    read -r -a codes <<<"${DRY_RUN_EXIT_CODES:-0}"
    RC=${codes[$attempt]:-${codes[-1]}}
    log "(simulated) exit code $RC"
    return
  fi
  print_cmd "${CMD[@]}" >&2
  "${CMD[@]}" &
  CHILD=$!
  # A trapped signal makes `wait` return early; then wait again for the trainer's exit code.
  while true; do
    SIGNALLED=0
    wait "$CHILD" && RC=0 || RC=$?
    ((SIGNALLED)) || break
  done
  CHILD=""
}

attempt=0
while true; do
  train_once
  if ((RC == 75 && !STOPPING)); then
    attempt=$((attempt + 1))
    ((attempt <= MAX_RESTARTS)) || die "gave up after $MAX_RESTARTS restarts"
    log "the trainer exited with 75 (preempted); restart $attempt of at most $MAX_RESTARTS"
    continue
  fi
  log "the trainer exited with $RC"
  exit "$RC"
done
