#!/usr/bin/env bash
# The accelerator measurements of benchmarks/RESULTS.md (sections 1b, 1c, 2) and a jax check of
# the installed version, as ONE command on a lent GPU machine.
#
#   bash benchmarks/device_check.sh          # on the GPU machine: about 9 minutes
#   SMOKE=1 bash benchmarks/device_check.sh  # tiny sizes, any machine (~3.5 min on 2 cores)
#   DRY_RUN=1 bash benchmarks/device_check.sh # prints each part's command, runs nothing
#   PARTS=curve,step_f32 bash benchmarks/device_check.sh   # only these parts (a second call)
#
# Device time is scarce (a task gets minutes, a machine start included), so everything runs in
# one call, in order of value, each part under its own time limit inside BUDGET seconds: a part
# that hangs or runs out of memory costs its limit and the later parts still run. While the GPU
# parts run, the jax-only test modules run on the host's other cores (JAX_PLATFORMS=cpu), which
# is where a newer jax (0.11 there, 0.10 here) shows API changes.
#
# Logs go to $OUT (the device tool's folder; ./device_out elsewhere), at most 8 files, since the
# device tool brings back no more. The last lines printed are a summary table and the ratio
# lines to paste into benchmarks/RESULTS.md.
# No -e: a part that fails is recorded in the summary and the next part still runs.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:-device_out}
SMOKE=${SMOKE:-0}
BUDGET=${BUDGET:-$([ "$SMOKE" = 1 ] && echo 900 || echo 540)}
PARTS=${PARTS:-env,tests,step_bf16,peer,curve,step_f32}
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

if [ "$SMOKE" = 1 ]; then
  # The settings of tests/test_benchmarks.py, so a test run reuses its compiled steps.
  SIZE=(--models=resnet18 --sizes=64 --queue=64 --hidden=64 --dim=16 --bn=sync --warmup=1
        --iters=1 --repeats=2)
  HEADLINE=(--batch=8 --dtypes=float32)
  CURVE=(8 16)
  F32=(--batch=8 --dtypes=float32 "--methods=mocov2,densecl")
else
  SIZE=(--models=resnet50 --sizes=224 --warmup=3 --iters=20 --repeats=5)
  HEADLINE=(--batch=256 --dtypes=bfloat16)
  CURVE=(64 1024)  # 256 is the headline run
  F32=(--batch=256 --dtypes=float32 "--methods=mocov2,densecl")
fi

# part NAME LIMIT_S COMMAND...: runs COMMAND with output to $OUT/NAME.log (appended), under
# min(LIMIT_S, what is left of BUDGET), and records its exit code and seconds.
part() {
  local name=$1 limit=$2 left rc start
  shift 2
  case ",$PARTS," in *",$name,"*) ;; *) return 0 ;; esac
  left=$((BUDGET - SECONDS - 15))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    printf '%-12s skipped (budget spent)\n' "$name" >>"$OUT/summary.txt"
    return 0
  fi
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "+ [$name ${limit}s] $*"
    return 0
  fi
  start=$SECONDS
  echo "+ $* (limit ${limit}s)" >>"$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  rc=$?
  printf '%-12s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$*" >>"$OUT/summary.txt"
  return 0
}

# 0. What machine and versions this is; the parity vectors on the accelerator (highest matmul
#    precision inside dense_ssl.parity, so TF32 does not blur them).
{
  date -u '+# %Y-%m-%d %H:%M UTC'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' || true
} >"$OUT/env.log" 2>&1
part env 90 "$PY" -m dense_ssl.parity tests/data/parity/*.npz

# 1. jax-only test modules on the host CPU (no TensorFlow, ml_collections or clu needed),
#    in the background on cores the GPU parts leave alone.
TEST_PID=
if [ "$SMOKE" != 1 ]; then
  PIN=()
  cores=$(nproc)
  if command -v taskset >/dev/null && [ "$cores" -ge 8 ]; then PIN=(taskset -c "4-$((cores - 1))"); fi
  (
    export JAX_PLATFORMS=cpu
    mapfile -t JAX_ONLY < <(grep -E '^tests/' tests/jax_only.txt)  # as CI's newest-jax run
    part tests 420 "${PIN[@]}" "$PY" -m pytest -q -p no:cacheprovider -n 6 --dist loadfile \
      "${JAX_ONLY[@]}"
  ) &
  TEST_PID=$!
fi

# 2. The headline: MoCo-v2, DenseCL, HoughCL step throughput and MFU (RESULTS.md section 1b).
part step_bf16 300 "$PY" benchmarks/step.py "${SIZE[@]}" "${HEADLINE[@]}"
# 3. The same DenseCL and MoCo-v2 steps in PyTorch (AMP), same GPU, same run (section 2).
part peer 150 "$PY" benchmarks/peer_torch.py "${SIZE[@]}" "${HEADLINE[@]}" --repeats=3 --iters=10
# 4. DenseCL's batch curve (section 1c), then float32 (TF32 matmuls on the GPU).
for b in "${CURVE[@]}"; do
  part curve 150 "$PY" benchmarks/step.py "${SIZE[@]}" --methods=densecl --batch="$b" \
    --dtypes="${HEADLINE[1]#--dtypes=}"
done
part step_f32 150 "$PY" benchmarks/step.py "${SIZE[@]}" "${F32[@]}"

if [ -n "$TEST_PID" ]; then wait "$TEST_PID"; fi

echo "# device_check.sh: ${SECONDS}s of ${BUDGET}s; logs in $OUT"
cat "$OUT/summary.txt"
# The lines to paste: ratios, MFU table rows, test and parity totals.
grep -hE '^(DenseCL|HoughCL|JAX/PyTorch|ALL PASS)|^\| *(mocov2|densecl|houghcl) |^[0-9]+ passed|failed|FAIL' \
  "$OUT"/step_bf16.log "$OUT"/peer.log "$OUT"/curve.log "$OUT"/step_f32.log "$OUT"/tests.log \
  "$OUT"/env.log 2>/dev/null | grep -v '^+ '
exit 0
