#!/usr/bin/env bash
# The first GPU run: one call of at most 10 minutes on a machine with 64 GiB of disk and 128 GiB
# of RAM, no network, at most 8 files brought back. Steps run most valuable first, each with its
# own time budget (plus whatever earlier steps left unused, never past the total), and each
# writes its JSON the moment it ends:
#   a. eigh      30 s  the symmetric eigensolver, GPU (one call, a batch, streams) vs the host's
#                      cores, and the slot for issue 26's new solver      -> eigh.json
#   b. tests     90 s  the GPU-marked tests only (-m gpu), a time limit per test; the native
#                      module builds in the background meanwhile, its tests run once it is built
#                                                                      -> tests.json
#   c. kernels   90 s  kernel benchmarks against torch, the winners table -> bench.json, gpu_winners.json
#   d. sdxl     135 s  full-size SDXL-shaped pair generated on the GPU: a cold transfer with the
#                      cache on, then torch-only and the winners table   -> transfer_sdxl.json
#   e. flux      75 s  the SDXL pair and its cache deleted and df checked, then a Flux-shaped pair
#                      at reduced depth                                   -> transfer_flux.json
# plus gpu_check.json (the plan and every step's status, rewritten after each step) and
# gpu_check.log: 8 files. Outputs are compared through r x r products (no m x n matrix).
# Results go to $OUT if set, else benchmarks/gpu_results/<UTC time>/ (a temporary folder for a
# dry run); scratch files go elsewhere. Nothing is fetched: no package index is needed.
# To ship the table: copy gpu_winners.json to python/prolora/ops/gpu_winners.json (or point
# PROLORA_WINNERS at it); without one torch stays the default on every GPU.
#
# Usage: benchmarks/gpu_check.sh [--dry-run]
#   --dry-run  prints the one plan line, then runs every step on the CPU at toy sizes (the check
#              of this script on a machine without a GPU); its log is in the results folder.
#   PYTHON=... the interpreter (default: .venv/bin/python if present, else python3).
#   PROLORA_GPU_WORK=DIR where the generated pairs go (default: prolora-gpu-check on the roomiest of
#              /tmp, /var/tmp and the checkout's parent).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
else PY=python3
fi

STEP_NAMES=(eigh tests kernels sdxl flux)
STEP_BUDGETS=(30 90 90 135 75)
FILES=(gpu_check.json gpu_check.log eigh.json tests.json bench.json gpu_winners.json transfer_sdxl.json
       transfer_flux.json)
TOTAL=0
for b in "${STEP_BUDGETS[@]}"; do TOTAL=$((TOTAL + b)); done
PLAN="plan: ${#STEP_NAMES[@]} steps, $TOTAL s budget, ${#FILES[@]} files"
echo "$PLAN"
if [[ -n ${PROLORA_GPU_PLAN_ONLY:-} ]]; then exit 0; fi  # the plan line alone (tests/test_gpu_check.py)

if [[ -n "${OUT:-}" ]]; then RES=$OUT
elif ((DRY)); then RES=$(mktemp -d -t prolora-gpu-check.XXXXXX)
else RES=benchmarks/gpu_results/$(date -u +%Y%m%dT%H%M%SZ)
fi
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
SCRATCH=$(mktemp -d -t prolora-gpu-scratch.XXXXXX)
if [[ -z ${PROLORA_GPU_WORK:-} ]]; then  # the generated pairs (13.5 GB + 13 GB of bases for SDXL): the roomiest disk
  best=/tmp
  for d in /tmp /var/tmp "$ROOT/.."; do
    if [[ -w $d ]] && (($(df -Pk "$d" | awk 'NR==2 {print $4}') > $(df -Pk "$best" | awk 'NR==2 {print $4}'))); then best=$d; fi
  done
  PROLORA_GPU_WORK=$(cd "$best" && pwd)/prolora-gpu-check
fi
WORK=$PROLORA_GPU_WORK
if ((DRY)); then WORK=$SCRATCH/work; fi
mkdir -p "$WORK"
if ((DRY)); then
  exec 4>&2 >"$RES/gpu_check.log" 2>&1  # the plan line alone on stdout; fd 4: a failure's one line
else
  exec 4>&2 > >(tee -a "$RES/gpu_check.log") 2>&1
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PIP_NO_INDEX=1 PIP_INDEX_URL=http://127.0.0.1:9/ HF_HUB_OFFLINE=1 PROLORA_GPU_BENCH=quick
export PROLORA_CACHE_DIR=$SCRATCH/cache DRY
if ((DRY)); then export OMP_NUM_THREADS=1; fi  # toy sizes: one thread (a busy 2-core box stalls with two)
T0=$(date +%s)
DEADLINE=$((T0 + TOTAL))
CARRY=0
STEPS=""
echo "$PLAN"
echo "prolora gpu_check: $(date -u) dry_run=$DRY results=$RES scratch=$SCRATCH work=$WORK"

summary() {
  "$PY" -m benchmarks.gpu_report summary "$RES/gpu_check.json" --plan "$PLAN" --steps "$STEPS" --t0 "$T0" \
    --folder "$RES" $( ((DRY)) && echo --dry) || echo "summary failed"
}

# step NAME BUDGET CMD...: CMD under min(BUDGET + time earlier steps left, time left of the total);
# records the exit status (124: timed out or no time left) and rewrites the summary
step() {
  local name=$1 budget=$2 start rc limit left
  shift 2
  start=$(date +%s)
  left=$((DEADLINE - start))
  limit=$((budget + CARRY))
  if ((limit > left)); then limit=$left; fi
  if ((limit < 5)); then
    echo "=== [$name] skipped: the ${TOTAL}s budget is spent"
    STEPS="$STEPS $name=124:0:$budget"
    summary
    return 0
  fi
  echo "=== [$name] (budget ${budget}s, limit ${limit}s) $*"
  timeout --kill-after=5 "$limit" "$@"
  rc=$?
  local took=$(($(date +%s) - start))
  echo "=== [$name] exit $rc after ${took}s"
  CARRY=$((budget + CARRY - took))
  if ((CARRY < 0)); then CARRY=0; fi
  STEPS="$STEPS $name=$rc:$took:$budget"
  summary
}

# ---- versions (part of the total, not a step) ---------------------------------------------------
timeout 30 "$PY" - <<'EOF' || echo "versions: failed"
import platform, shutil, sys
print("python", sys.version.split()[0], platform.machine())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
try:
    import triton
    print("triton", triton.__version__, "(interpreter-tested here with 3.6 and 3.9)")
except ImportError as e:
    print("triton missing:", e)
print("disk free GB:", round(shutil.disk_usage("/tmp").free / 1e9, 1))
EOF
if ((!DRY)); then
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; fi
  df -h "$WORK" /tmp || true
  HAVE_GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
  if ((!HAVE_GPU)); then
    echo "no CUDA device visible to torch: this check is for a GPU machine (use --dry-run elsewhere)"
    echo "gpu_check: no CUDA device (see $RES/gpu_check.log)" >&4
    exit 3
  fi
fi

# ---- a. eigh ------------------------------------------------------------------------------------
if ((DRY)); then EIGH=(--device cpu --sizes 64,96 --batch 4,4 --budget 8); else EIGH=(--budget 20); fi
step eigh "${STEP_BUDGETS[0]}" "$PY" -m benchmarks.gpu_eigh "${EIGH[@]}" --json "$RES/eigh.json"

# ---- the native module with its CUDA launchers, in the background (tests and kernels use it) -----
BUILD_DONE=$SCRATCH/build.done
if ((DRY)); then
  touch "$BUILD_DONE"  # a dry run uses the native module as installed
else
  ARCH=$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')
  (
    GEN=(); if command -v ninja >/dev/null; then GEN=(-G Ninja); fi
    timeout 240 nice -n 10 cmake -S . -B "$SCRATCH/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DPROLORA_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DPython_EXECUTABLE="$(command -v "$PY")" \
      -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" &&
    timeout 240 nice -n 10 cmake --build "$SCRATCH/build" -j 8 &&
    cp "$SCRATCH"/build/_C*.so python/prolora/ && echo "native build: ok"
    touch "$BUILD_DONE"
  ) >"$SCRATCH/build.log" 2>&1 &
fi

# ---- b. the GPU-marked tests only ---------------------------------------------------------------
gpu_tests() {
  local end=$(($(date +%s) + $1))
  PROLORA_TEST_TIMEOUT=75 "$PY" -m pytest -p benchmarks.step_timeout -p no:cacheprovider -m gpu -q -rs \
    tests/ops/test_kernels_triton.py tests/engine/test_gpu_engine.py --junitxml="$SCRATCH/tests_triton_engine.xml"
  while [[ ! -f $BUILD_DONE ]] && (($(date +%s) < end - 20)); do sleep 2; done
  tail -3 "$SCRATCH/build.log" 2>/dev/null
  if [[ -f $BUILD_DONE ]]; then
    PROLORA_TEST_TIMEOUT=75 timeout $((end - $(date +%s))) "$PY" -m pytest -p benchmarks.step_timeout \
      -p no:cacheprovider -m gpu -q -rs tests/ops/test_native.py tests/ops/test_backends_native.py \
      --junitxml="$SCRATCH/tests_native.xml"
  else
    echo "native module not built in time: its GPU tests did not run"
  fi
  "$PY" -m benchmarks.gpu_report tests "$RES/tests.json" "$SCRATCH/tests_triton_engine.xml" "$SCRATCH/tests_native.xml"
  "$PY" - "$RES/tests.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("tests:", {k: r[k] for k in ("passed", "failed", "errors", "skipped")})
sys.exit(1 if r["failed"] or r["errors"] or not r["passed"] and not r["skipped"] else 0)
EOF
}
export -f gpu_tests
export PY SCRATCH RES BUILD_DONE
step tests "${STEP_BUDGETS[1]}" bash -c "gpu_tests $((STEP_BUDGETS[1] + CARRY - 5))"

# ---- c. kernel benchmarks against torch, and the winners table ----------------------------------
kernel_bench() {
  local end=$(($(date +%s) + $1)) mark=gpu timer=() fams
  fams=("truncated_svd" "project_lora or subspace_phi" "small_svd")
  if ((DRY)); then mark="not gpu"; timer=(--benchmark-timer time.process_time)
    fams=("small_svd_cpu and 256-12" "project_lora_cpu and torch"); fi
  local files=() shares=(45 40 15) i=0 total=$1
  for fam in "${fams[@]}"; do
    local tag=${fam%% *} left=$((end - $(date +%s) - 10)) mine=$((total * ${shares[i]} / 100))
    i=$((i + 1))
    if ((i < ${#fams[@]} && mine < left)); then left=$mine; fi  # the last family takes what is left
    if ((left < 10)); then echo "bench $tag: no time left"; continue; fi
    PROLORA_TEST_TIMEOUT=60 timeout "$left" "$PY" -m pytest benchmarks/bench_kernels.py -p benchmarks.step_timeout \
      -p no:cacheprovider -m "$mark" -k "$fam" -q --benchmark-enable ${timer[@]+"${timer[@]}"} \
      --benchmark-json="$SCRATCH/bench_$tag.json" --benchmark-columns=median,iqr,rounds --benchmark-sort=name
    if [[ -f $SCRATCH/bench_$tag.json ]]; then files+=("$SCRATCH/bench_$tag.json"); fi
  done
  "$PY" -m benchmarks.gpu_report bench "$RES/bench.json" ${files[@]+"${files[@]}"}
  "$PY" benchmarks/bench_kernels.py winners "$RES/gpu_winners.json" ${files[@]+"${files[@]}"}
}
export -f kernel_bench
step kernels "${STEP_BUDGETS[2]}" bash -c "kernel_bench $((STEP_BUDGETS[2] + CARRY - 5))"

# ---- d. SDXL-shaped: cold with the cache on; winners table vs torch-only -------------------------
if ((DRY)); then
  SIZE=(--device cpu --width 0.05 --depth 0.05 --max-memory 1GB); FLUX=(--device cpu --width 0.1 --depth 0.03 --max-memory 1GB)
else
  SIZE=(--max-memory 32GB); FLUX=(--depth 0.2 --max-memory 32GB)
fi
step sdxl "${STEP_BUDGETS[3]}" "$PY" -m benchmarks.gpu_transfer --family sdxl "${SIZE[@]}" --dir "$WORK" \
  --runs cache,torch-only,winners --winners "$RES/gpu_winners.json" --json "$RES/transfer_sdxl.json"

# ---- e. Flux-shaped, last, at reduced depth, once the SDXL pair is gone -------------------------
df -h "$WORK" || true
step flux "${STEP_BUDGETS[4]}" "$PY" -m benchmarks.gpu_transfer --family flux "${FLUX[@]}" --dir "$WORK" \
  --remove "$WORK/sdxl-*" "$WORK/cache-sdxl" --min-free-gb "$( ((DRY)) && echo 0.5 || echo 20)" \
  --runs cache,torch-only --winners "$RES/gpu_winners.json" --json "$RES/transfer_flux.json"
df -h "$WORK" || true

# ---- the end: at most 8 files under the results folder --------------------------------------------
rm -rf "$SCRATCH"
extra=$(find "$RES" -maxdepth 1 -type f ! -name '*.tmp' | grep -v -x -F -f <(printf "$RES/%s\n" "${FILES[@]}") || true)
if [[ -n $extra ]]; then
  echo "unexpected files, folded into gpu_check.log: $extra"
  for f in $extra; do echo "--- $f"; head -c 20000 "$f"; rm -f "$f"; done
fi
summary
failed=$("$PY" -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))["failed"]))' "$RES/gpu_check.json" \
         2>/dev/null || echo summary)
echo "results in $RES ($(($(date +%s) - T0))s); failed: ${failed:-none}"
if [[ -n $failed ]]; then
  echo "gpu_check: failed steps: $failed (log: $RES/gpu_check.log)" >&4
  exit 1
fi
exit 0
