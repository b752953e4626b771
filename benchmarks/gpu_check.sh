#!/usr/bin/env bash
# One prepared GPU check for prolora's kernels (about 5-8 minutes on an H100/H200):
#   1. versions, nvcc, nvidia-smi
#   2. build the native module with its CUDA launchers (PROLORA_CUDA=ON, this GPU's architecture)
#   3. the GPU tests (marked gpu) and the Triton kernel tests, compiled on the GPU; the eigensolver:
#      eigh vs the truncated solver and both together (benchmarks/bench_eigh.py)
#   4. cold transfers of full-size SDXL- and Flux-shaped pairs with --device cuda, default dispatch
#      vs torch-only backends (benchmarks/gpu_transfer.py): seconds, peak device memory
#   5. the kernel benchmarks against torch.linalg / cuSOLVER / torch.svd_lowrank
#   6. the measured-winners table (gpu_winners.json) that dispatch consults, and a summary
# Results go to $OUT if set, else benchmarks/gpu_results/<UTC time>/ (at most 10 files).
# To ship the table: copy gpu_winners.json to python/prolora/ops/gpu_winners.json (or point
# PROLORA_WINNERS at it); without one, torch stays the default on every GPU.
#
# Usage: benchmarks/gpu_check.sh [--dry-run]
#   --dry-run  the CPU parts only (no build, CPU benchmarks, winners from them): checks the
#              script itself on a machine without a GPU; results to $OUT or a temporary folder.
#   PYTHON=... the interpreter (default python3).
#   BUDGET_S=  the whole run's limit in seconds (default 540): every step has its own timeout,
#              cut to what is left of the budget, so the summary is always written.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
if [[ -n "${OUT:-}" ]]; then
  RES=$OUT
elif ((DRY)); then
  RES=$(mktemp -d -t prolora-gpu-check.XXXXXX)
else
  RES=benchmarks/gpu_results/$(date -u +%Y%m%dT%H%M%SZ)
fi
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
exec > >(tee -a "$RES/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s)
BUDGET=${BUDGET_S:-540}
STEPS=()

# step NAME TIMEOUT_S CMD...: runs CMD under min(TIMEOUT_S, what is left of the budget),
# records its exit status (124: timed out or no time left), never aborts the script
step() {
  local name=$1 limit=$2 start rc left
  shift 2
  left=$((BUDGET - ($(date +%s) - T0) - 15))
  if ((left < 10)); then
    echo "=== [$name] skipped: the ${BUDGET}s budget is spent"
    STEPS+=("$name=124")
    return 0
  fi
  if ((limit > left)); then limit=$left; fi
  echo "=== [$name] (timeout ${limit}s) $*"
  start=$(date +%s)
  set +e
  timeout --kill-after=5 "$limit" "$@"
  rc=$?
  set -e
  echo "=== [$name] exit $rc after $(($(date +%s) - start))s"
  STEPS+=("$name=$rc")
  return 0
}

echo "prolora gpu_check: $(date -u) dry_run=$DRY results=$RES"
step versions 60 "$PY" - <<'EOF'
import platform, sys
print("python", sys.version.split()[0], platform.machine())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
EOF
if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "nvcc: not found"; fi
if command -v nvidia-smi >/dev/null; then nvidia-smi || true; else echo "nvidia-smi: not found"; fi

HAVE_GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if ((!DRY && !HAVE_GPU)); then
  echo "no CUDA device visible to torch: this check is for a GPU machine (use --dry-run elsewhere)"
  exit 3
fi

# ---- build --------------------------------------------------------------------------------------
if ((DRY)); then
  echo "=== [build] skipped (dry run): using the installed prolora"
else
  ARCH=$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')
  step build 200 "$PY" -m pip install --no-build-isolation --no-deps -q -e . \
    -Ccmake.define.PROLORA_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH" -Cbuild-dir=build/gpu-check
  if [[ "${STEPS[-1]}" != "build=0" ]]; then
    # fallback without pip: CMake straight into the source tree (PYTHONPATH=python finds the kernels)
    step build-cmake 200 bash -c "cmake -S . -B build/gpu-check-cmake -DCMAKE_BUILD_TYPE=Release \
        -DPROLORA_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DPython_EXECUTABLE=\$(command -v $PY) \
        -Dpybind11_DIR=\$($PY -m pybind11 --cmakedir) && cmake --build build/gpu-check-cmake -j \$(nproc) &&
      cp build/gpu-check-cmake/_C*.so python/prolora/"
    export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
step native 60 "$PY" -c '
import sys
from prolora import _native as n
print("native built:", n.available(), n.why_unavailable() or "", "| CUDA launchers:", n.has_cuda(),
      "| CUDA usable:", n.cuda_unavailable_reason() or "yes")
import torch
sys.exit(0 if not torch.cuda.is_available() or (n.has_cuda() and not n.cuda_unavailable_reason()) else 1)'
step backends 60 "$PY" -m prolora.cli backends

# ---- tests --------------------------------------------------------------------------------------
step tests 150 "$PY" -m pytest tests/test_kernels_triton.py tests/test_backends_native.py tests/test_native.py \
  -m "not slow" -q -p no:cacheprovider -rs --junitxml="$RES/tests.xml"

# ---- the eigensolver: eigh (batched, per matrix on streams, on the host's cores, split) vs the truncated
# solver (topk_eigh subspace) and both as a transfer runs them, on one SDXL block's 20 Gram matrices;
# its rows join the winners table (op topk_eigh), so this run decides the GPU's eigensolver default
if ((DRY)); then EIGH=(--device cpu --width 0.1 --rounds 1); else EIGH=(--device cuda --rounds 3); fi
step eigh 120 "$PY" -m benchmarks.bench_eigh "${EIGH[@]}" --json "$RES/eigh.json" --points "$RES/bench_eigh.json"

# ---- cold transfers with --device cuda: default dispatch vs torch-only, in the same run ----------
# full-size SDXL- and Flux-shaped pairs generated on the GPU (reused from /tmp between runs)
if ((DRY)); then
  XFER=(--device cpu --width 0.25 --depth 0.1)
else
  XFER=(--device cuda)
fi
step transfer-sdxl 150 "$PY" -m benchmarks.gpu_transfer --family sdxl "${XFER[@]}" --json "$RES/transfer_sdxl.json"
step transfer-flux 240 "$PY" -m benchmarks.gpu_transfer --family flux "${XFER[@]}" --json "$RES/transfer_flux.json"

# ---- benchmarks (one JSON per op family: a timeout loses one family, not all) ----------------------
if ((DRY)); then
  MARK="not gpu"
  TIMER=(--benchmark-timer time.process_time)
else
  MARK="gpu"
  TIMER=()
fi
BENCH=()
for fam in small_svd truncated_svd "project_lora or subspace_phi"; do
  tag=${fam%% *}
  step "bench-$tag" 150 "$PY" -m pytest benchmarks/bench_kernels.py -m "$MARK" -k "$fam" -q -p no:cacheprovider \
    --benchmark-enable ${TIMER[@]+"${TIMER[@]}"} --benchmark-json="$RES/bench_$tag.json" \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name
  if [[ -f "$RES/bench_$tag.json" ]]; then BENCH+=("$RES/bench_$tag.json"); fi
done

if [[ -f "$RES/bench_eigh.json" ]]; then BENCH+=("$RES/bench_eigh.json"); fi

# ---- winners and summary ------------------------------------------------------------------------
if ((${#BENCH[@]})); then
  step winners 60 "$PY" benchmarks/bench_kernels.py winners "$RES/gpu_winners.json" "${BENCH[@]}"
else
  echo "no benchmark JSON: no winners table"
  STEPS+=("winners=1")
fi

rc=0
STEPS_STR="${STEPS[*]}" DRY=$DRY T0=$T0 RES=$RES "$PY" - <<'EOF' || rc=$?
import json, os, time
from pathlib import Path
res = Path(os.environ["RES"])
steps = {k: int(v) for k, v in (s.split("=", 1) for s in os.environ["STEPS_STR"].split())}
if steps.get("build-cmake") == 0:
    steps["build"] = 0  # the fallback build stood in for the pip build
failed = sorted(k for k, v in steps.items() if v != 0)
summary = {"dry_run": os.environ["DRY"] == "1", "seconds": round(time.time() - int(os.environ["T0"])),
           "steps": steps, "failed": failed,
           "files": sorted(p.name for p in res.iterdir() if p.is_file())}
w = res / "gpu_winners.json"
if w.is_file():
    table = json.loads(w.read_text())
    summary["device"] = table.get("device")
    summary["versions"] = table.get("versions")
    summary["wins"] = [p for p in table["points"] if p["accurate"] and p["speedup"] >= table.get("min_speedup", 1.05)]
(res / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: summary[k] for k in ("dry_run", "seconds", "steps", "failed")}, indent=1))
raise SystemExit(1 if failed else 0)
EOF
echo "results in $RES ($(($(date +%s) - T0))s)"
exit $rc
