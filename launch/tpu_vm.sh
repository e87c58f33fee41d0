#!/usr/bin/env bash
# Trains dense_ssl on a Cloud TPU VM (v4, v5e, v5p or v6e; any slice size). The script creates
# or reuses the VM and copies the code to every worker, as a tarball of this checkout or as a
# git clone. It installs the package from that tree with jax[tpu] at the lock's versions and
# starts the trainer on all workers. With --watch it requeues the run after a preemption. See
# launch/README.md.
#
#   launch/tpu_vm.sh --zone=us-central2-b --accelerator=v4-32 --spot \
#       --config=configs/densecl.py --workdir=gs://BUCKET/runs/densecl \
#       --data_dir=gs://BUCKET/tfds --watch
#
# --dry-run (or DRY_RUN=1) prints every command as "+ ..." and runs none of them.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [options] [-- trainer flags...]
       launch/tpu_vm.sh --stop  --name=NAME --zone=ZONE     stop the trainer on all workers
       launch/tpu_vm.sh --delete --name=NAME --zone=ZONE    delete the TPU VM

Creates or reuses the TPU VM and copies the code to every worker. Installs dense_ssl from that
tree there (pip install -e ".[tpu,torch]", versions from requirements.lock), so jax[tpu] at the
locked jax version replaces the CPU jaxlib. Then runs
`python -m dense_ssl.main` on every worker (nohup, one log per worker in
~/REMOTE_DIR/logs/worker-N.log). Running it again resumes from the newest checkpoint in
--workdir.

TPU VM (flag, or the environment variable in brackets):
  --name=NAME           TPU VM name [TPU_NAME]; default dense-ssl
  --zone=ZONE           zone, e.g. us-central2-b [TPU_ZONE, CLOUDSDK_COMPUTE_ZONE]; required
  --project=ID          Google Cloud project [TPU_PROJECT]; default: gcloud's configured one
  --accelerator=TYPE    accelerator type, e.g. v4-8, v4-32, v5litepod-16, v5p-64, v6e-8
                        [TPU_ACCELERATOR_TYPE]; default v4-8
  --version=RUNTIME     TPU software version [TPU_RUNTIME_VERSION]; default by generation:
                        v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
                        v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot                create a Spot VM (may be preempted; use --watch)
  --preemptible         create a preemptible VM (may be preempted; use --watch)

Code and set-up:
  --repo=URL            git clone URL on every worker instead of copying a tarball of this
                        checkout [REPO_URL]
  --ref=REF             branch, tag or commit for --repo [REPO_REF]; default HEAD
  --remote_dir=DIR      directory on the workers, relative to the home directory;
                        default dense_ssl
  --python=PYTHON       Python 3.11+ on the workers; installed from the deadsnakes PPA when
                        it is missing; default python3.11
  --skip_setup          do not copy code or install packages on an existing VM

Training:
  --config=FILE[:VARIANT]  e.g. configs/densecl.py; required
  --workdir=gs://...       checkpoints and TensorBoard logs; must be on GCS (all workers write
                           there, and it survives the VM); required
  --data_dir=gs://...      TFDS data directory, passed as --config.data.data_dir
  -- FLAGS...              further trainer flags, e.g. -- --config.batch_size=1024

Requeue:
  --watch               stay in the foreground and poll. If the VM is preempted (state
                        PREEMPTED or TERMINATED) or deleted, recreate it, set it up and run the
                        same command again. If the trainer exits with 75 (it was preempted, see
                        dense_ssl.train.PREEMPTED_EXIT_CODE), restart it. Stops when the trainer
                        exits with any other code.
  --poll=SECONDS        seconds between polls; default 300
  --max_restarts=N      give up after N requeues; default 50
  --delete_when_done    with --watch: delete the VM once the trainer exits with 0

Other:
  --dry-run             print the commands ("+ ..." on stdout) without running them; also
                        DRY_RUN=1. Results of queries are simulated: DRY_RUN_STATES lists the
                        VM states in order (default NOT_FOUND, then READY), and
                        DRY_RUN_JOB_STATUS lists trainer exit codes (default 0).
  -h, --help            this help
EOF
}

# ---------------------------------------------------------------------------------------------
# Printing and running commands.

log() { echo "[tpu_vm] $*" >&2; }
die() { echo "tpu_vm.sh: error: $*" >&2; exit 2; }
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

# Simulated results of queries in dry-run mode: sets SIM to the next word of the named
# variable's list (the last word repeats).
declare -A SIM_INDEX=()
SIM=""
sim_next() {
  local var=$1 default=$2 i
  local -a values
  read -r -a values <<<"${!var:-$default}"
  i=${SIM_INDEX[$var]:-0}
  if ((i >= ${#values[@]})); then
    i=$((${#values[@]} - 1))
  fi
  SIM_INDEX[$var]=$((i + 1))
  SIM=${values[$i]}
}

# ---------------------------------------------------------------------------------------------
# On a TPU worker: start and stop the trainer. The launcher calls these through
# `gcloud compute tpus tpu-vm ssh --worker=all --command 'cd DIR && bash launch/tpu_vm.sh ...'`.

worker_id() {
  if [[ -n "${TPU_WORKER_ID:-}" ]]; then
    echo "$TPU_WORKER_ID"
    return
  fi
  curl -sf -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    || hostname
}

# Stops the trainer started by worker_start: SIGTERM (the trainer saves a checkpoint), then
# SIGKILL for whatever is left after two minutes.
worker_stop() {
  local pid
  [[ -f logs/pid ]] || return 0
  pid=$(<logs/pid)
  if kill -0 -- "-$pid" 2>/dev/null; then
    log "stopping process group $pid"
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 120); do
      kill -0 -- "-$pid" 2>/dev/null || break
      sleep 1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f logs/pid
}

# Starts "$@" detached from the ssh session. Output is appended to logs/worker-ID.log, and the
# exit code (or "running") is written to logs/status.
worker_start() {
  (($# > 0)) || die "worker-start needs a command after --"
  local id
  id=$(worker_id)
  mkdir -p logs
  worker_stop
  echo running >logs/status
  # setsid makes the job its own process group, so worker_stop can signal all of it.
  # shellcheck disable=SC2016  # $0, $@ and $? belong to the inner shell.
  setsid nohup bash -c '"$@" >>"$0" 2>&1; echo $? >logs/status' "logs/worker-$id.log" "$@" \
    </dev/null >/dev/null 2>&1 &
  echo $! >logs/pid
  echo "worker $id: started (pid $!); log: $PWD/logs/worker-$id.log"
}

case "${1:-}" in
  worker-start)
    shift
    [[ "${1:-}" == -- ]] && shift
    worker_start "$@"
    exit 0
    ;;
  worker-stop)
    worker_stop
    exit 0
    ;;
esac

# ---------------------------------------------------------------------------------------------
# Flags.

NAME=${TPU_NAME:-dense-ssl}
ZONE=${TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
PROJECT=${TPU_PROJECT:-}
ACCELERATOR=${TPU_ACCELERATOR_TYPE:-v4-8}
RUNTIME=${TPU_RUNTIME_VERSION:-}
CAPACITY=""
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-HEAD}
REMOTE_DIR=dense_ssl
PYTHON=python3.11
SKIP_SETUP=0
CONFIG=""
WORKDIR=""
DATA_DIR=""
WATCH=0
POLL=300
MAX_RESTARTS=50
DELETE_WHEN_DONE=0
ACTION=launch
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
    --name | --name=*) flag_value "$@"; NAME=$VALUE ;;
    --zone | --zone=*) flag_value "$@"; ZONE=$VALUE ;;
    --project | --project=*) flag_value "$@"; PROJECT=$VALUE ;;
    --accelerator | --accelerator=* | --accelerator[-_]type | --accelerator[-_]type=*)
      flag_value "$@"; ACCELERATOR=$VALUE ;;
    --version | --version=* | --runtime[-_]version | --runtime[-_]version=*)
      flag_value "$@"; RUNTIME=$VALUE ;;
    --spot) CAPACITY=--spot ;;
    --preemptible) CAPACITY=--preemptible ;;
    --repo | --repo=*) flag_value "$@"; REPO_URL=$VALUE ;;
    --ref | --ref=*) flag_value "$@"; REPO_REF=$VALUE ;;
    --remote[-_]dir | --remote[-_]dir=*) flag_value "$@"; REMOTE_DIR=$VALUE ;;
    --python | --python=*) flag_value "$@"; PYTHON=$VALUE ;;
    --skip[-_]setup) SKIP_SETUP=1 ;;
    --config | --config=*) flag_value "$@"; CONFIG=$VALUE ;;
    --workdir | --workdir=*) flag_value "$@"; WORKDIR=$VALUE ;;
    --data[-_]dir | --data[-_]dir=*) flag_value "$@"; DATA_DIR=$VALUE ;;
    --watch) WATCH=1 ;;
    --poll | --poll=*) flag_value "$@"; POLL=$VALUE ;;
    --max[-_]restarts | --max[-_]restarts=*) flag_value "$@"; MAX_RESTARTS=$VALUE ;;
    --delete[-_]when[-_]done) DELETE_WHEN_DONE=1 ;;
    --stop) ACTION=stop ;;
    --delete) ACTION=delete ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown flag $1 (see --help; trainer flags go after --)" ;;
  esac
  shift "$SHIFT"
done

[[ -n "$ZONE" ]] || die "--zone is required (or set TPU_ZONE)"
[[ "$POLL" =~ ^[0-9]+$ ]] || die "--poll must be a number of seconds"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max_restarts must be a number"
if [[ -z "$RUNTIME" ]]; then
  case "$ACCELERATOR" in
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    *) RUNTIME=tpu-ubuntu2204-base ;;  # v4 and older
  esac
fi

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
LOCATION=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOCATION+=(--project="$PROJECT")

# ---------------------------------------------------------------------------------------------
# The TPU VM.

# Sets STATE to READY, CREATING, PREEMPTED, ... or NOT_FOUND; UNKNOWN when gcloud failed
# for another reason.
STATE=""
vm_state() {
  local cmd=("${GCLOUD_TPU[@]}" describe "$NAME" "${LOCATION[@]}" --format='value(state)') out
  if dry; then
    print_cmd "${cmd[@]}"
    sim_next DRY_RUN_STATES "NOT_FOUND READY"
    STATE=$SIM
    log "(simulated) $NAME is $STATE"
  elif out=$("${cmd[@]}" 2>&1); then
    STATE=${out:-UNKNOWN}
  elif [[ $out == *NOT_FOUND* || $out == *"not found"* ]]; then
    STATE=NOT_FOUND
  else
    log "gcloud describe failed: $out"
    STATE=UNKNOWN
  fi
}

vm_create() {
  local args=(--accelerator-type="$ACCELERATOR" --version="$RUNTIME")
  [[ -n "$CAPACITY" ]] && args+=("$CAPACITY")
  log "creating $NAME ($ACCELERATOR, $RUNTIME${CAPACITY:+, ${CAPACITY#--}}) in $ZONE"
  run "${GCLOUD_TPU[@]}" create "$NAME" "${LOCATION[@]}" "${args[@]}"
}

vm_delete() {
  log "deleting $NAME"
  run "${GCLOUD_TPU[@]}" delete "$NAME" "${LOCATION[@]}" --quiet
}

vm_wait_ready() {
  for _ in $(seq 120); do
    vm_state
    [[ $STATE == READY ]] && return 0
    log "$NAME is $STATE; waiting"
    run sleep 30
  done
  die "$NAME did not become READY"
}

# Makes sure the VM exists and is READY; sets FRESH=1 when it was (re)created. The argument, if
# any, is the state the caller just read.
FRESH=0
vm_ensure() {
  FRESH=0
  if (($# > 0)); then
    STATE=$1
  else
    vm_state
  fi
  case "$STATE" in
    READY) log "reusing $NAME (READY)" ;;
    NOT_FOUND)
      vm_create
      FRESH=1 ;;
    PREEMPTED | TERMINATED)
      log "$NAME is $STATE: recreating it"
      vm_delete
      vm_create
      FRESH=1 ;;
    STOPPED)
      run "${GCLOUD_TPU[@]}" start "$NAME" "${LOCATION[@]}"
      vm_wait_ready ;;
    *) vm_wait_ready ;;
  esac
}

# Runs a shell command line on the workers ("all" or an index).
ssh_workers() {
  local worker=$1
  shift
  run "${GCLOUD_TPU[@]}" ssh "$NAME" "${LOCATION[@]}" --worker="$worker" --quiet --command="$*"
}

# ---------------------------------------------------------------------------------------------
# Code, packages and the trainer on the workers.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RD=$(printf '%q' "$REMOTE_DIR")

copy_code() {
  if [[ -n "$REPO_URL" ]]; then
    log "cloning $REPO_URL at $REPO_REF on all workers"
    ssh_workers all "set -e; [ -d $RD/.git ] || git clone -q $(printf '%q' "$REPO_URL") $RD;" \
      "git -C $RD fetch -q origin $(printf '%q' "$REPO_REF");" \
      "git -C $RD checkout -q --force FETCH_HEAD"
  else
    local tarball="${TMPDIR:-/tmp}/dense_ssl-$NAME.tar.gz"
    log "copying $REPO_ROOT to all workers"
    run tar -czf "$tarball" -C "$REPO_ROOT" --exclude=./.venv --exclude=./.git \
      --exclude=./runs --exclude=__pycache__ --exclude=.pytest_cache .
    run "${GCLOUD_TPU[@]}" scp "$tarball" "$NAME:dense_ssl.tar.gz" "${LOCATION[@]}" \
      --worker=all --quiet
    ssh_workers all "set -e; mkdir -p $RD; tar -xzf dense_ssl.tar.gz -C $RD; rm dense_ssl.tar.gz"
    run rm -f "$tarball"
  fi
}

# The package from the copied tree with its tpu and torch extras, at the lock's versions (used as
# constraints: nothing else is installed). torch, for the .pth export only, is the lock's CPU
# build, from PyTorch's CPU index; jax[tpu] brings libtpu instead of the CPU jaxlib.
install_packages() {
  local py
  py=$(printf '%q' "$PYTHON")
  log "installing dense_ssl[tpu,torch] on all workers"
  ssh_workers all "set -e; cd $RD;" \
    "command -v $py >/dev/null || { sudo add-apt-repository -y ppa:deadsnakes/ppa" \
    "&& sudo apt-get update -q && sudo apt-get install -y -q $py $py-venv; };" \
    "[ -x .venv/bin/python ] || $py -m venv .venv;" \
    ".venv/bin/pip install -q --upgrade pip;" \
    ".venv/bin/pip install -q -c requirements.lock -e \".[tpu,torch]\"" \
    "--extra-index-url https://download.pytorch.org/whl/cpu;" \
    ".venv/bin/python -c \"import jax; print(jax.process_index(), jax.device_count())\""
}

TRAIN=(.venv/bin/python -m dense_ssl.main)

start_trainer() {
  local cmd=("${TRAIN[@]}" --config="$CONFIG" --workdir="$WORKDIR")
  [[ -n "$DATA_DIR" ]] && cmd+=(--config.data.data_dir="$DATA_DIR")
  cmd+=("${EXTRA[@]}")
  log "starting the trainer on all workers"
  ssh_workers all "cd $RD && bash launch/tpu_vm.sh worker-start --$(printf ' %q' "${cmd[@]}")"
}

# Sets STATUS to the trainer's state on worker 0: running, its exit code, or unknown.
STATUS=""
job_status() {
  local cmd=("${GCLOUD_TPU[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=0 --quiet
    --command="cat $RD/logs/status")
  if dry; then
    print_cmd "${cmd[@]}"
    sim_next DRY_RUN_JOB_STATUS 0
    STATUS=$SIM
    log "(simulated) trainer status: $STATUS"
  else
    STATUS=$("${cmd[@]}" 2>/dev/null | tail -n 1) || true
    STATUS=${STATUS:-unknown}
  fi
}

# (Re)creates the VM where needed, sets it up and starts the trainer. The argument, if any, is
# the VM's state just read.
launch() {
  vm_ensure "$@"
  if ((FRESH || !SKIP_SETUP)); then
    copy_code
    install_packages
  fi
  start_trainer
}

# ---------------------------------------------------------------------------------------------
# Main.

case "$ACTION" in
  stop)
    ssh_workers all "cd $RD && bash launch/tpu_vm.sh worker-stop"
    exit 0 ;;
  delete)
    vm_delete
    exit 0 ;;
esac

[[ -n "$CONFIG" ]] || die "--config is required, e.g. --config=configs/densecl.py"
[[ -n "$WORKDIR" ]] || die "--workdir is required"
[[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path: every worker writes there" \
  "and it has to survive the VM (got $WORKDIR)"
if [[ -n "$DATA_DIR" && $DATA_DIR != gs://* ]]; then
  log "warning: --data_dir $DATA_DIR is not on GCS; it must exist on every worker"
fi
if [[ -z "$CAPACITY" && $WATCH == 1 ]]; then
  log "note: --watch on an on-demand VM only restarts trainers that exit with 75"
fi

launch
LOGS="$REMOTE_DIR/logs/worker-N.log"
log "logs: ${GCLOUD_TPU[*]} ssh $NAME ${LOCATION[*]} --worker=0 --command='tail -f $LOGS'"
((WATCH)) || exit 0

restarts=0
requeue() {
  restarts=$((restarts + 1))
  ((restarts <= MAX_RESTARTS)) || die "gave up after $MAX_RESTARTS requeues"
  log "requeue $restarts of at most $MAX_RESTARTS: $*"
}

while true; do
  run sleep "$POLL"
  vm_state
  case "$STATE" in
    READY)
      job_status
      case "$STATUS" in
        running) ;;
        0)
          log "the trainer finished (exit code 0)"
          ((DELETE_WHEN_DONE)) && vm_delete
          exit 0 ;;
        75)
          requeue "the trainer was preempted (exit code 75); restarting it"
          start_trainer ;;
        [0-9]*)
          log "the trainer failed with exit code $STATUS; see $LOGS on the workers"
          exit "$STATUS" ;;
        *) log "could not read the trainer status ($STATUS); polling again" ;;
      esac ;;
    PREEMPTED | TERMINATED | NOT_FOUND | STOPPED)
      requeue "$NAME is $STATE"
      launch "$STATE" ;;
    *) log "$NAME is $STATE; polling again" ;;
  esac
done
