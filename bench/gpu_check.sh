#!/usr/bin/env bash
# One-shot check for a lent GPU machine (H100/H200, no network): build, self-test, sanitizer, tests, benchmarks.
#
#   OUT=/some/dir bash bench/gpu_check.sh        # run from anywhere; logs go to $OUT (default build/gpu_check_out)
#
# Steps (each logged under $OUT, tee'd as it runs so a timeout still leaves partial logs):
#   1. install.log    environment (GPU, driver, python, torch, nvcc) + `pip install --no-build-isolation -e .` (timed)
#                     while, in the background, the torch-free CMake build of csrc/ runs (selftest.log)
#   2. selftest.log   cmake configure + build, ctest (C++ reference self-tests: tree attention, n-gram pool),
#                     compute-sanitizer memcheck (--quick; + racecheck of the n-gram kernels),
#                     kernel-only timings (ouroboros_selftest --bench, ouroboros_ngram_selftest --bench)
#   3. pytest.log     pytest -q tests (CUDA tests run here)
#   4. attention.log  python bench/attention.py --out $OUT/attention.json (it also writes attention.png)
#   5. summary.txt    the table printed last
# At most 8 files under $OUT: 7 are used here, so extra steps (e2e benches) may add one more (see HOOK below) or
# share a log.
# Per-step limits are STEP_TIMEOUT_<NAME> seconds (env); the exit status is 1 when any step failed.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/build/gpu_check_out}"
mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null 2>&1; then
  # No system toolkit: try an nvcc shipped as a pip package (nvidia-cuda-nvcc) next to torch.
  for d in $("$PY" -c 'import importlib.util as u; s = u.find_spec("nvidia"); print(" ".join(s.submodule_search_locations) if s else "")' 2>/dev/null); do
    for c in "$d"/cu13 "$d"/cuda_nvcc; do
      [ -z "${CUDA_HOME:-}" ] && [ -x "$c/bin/nvcc" ] && export CUDA_HOME="$c"
    done
  done
fi
[ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"

SUMMARY_ROWS=()
FAILED=0
# record NAME STATUS SECONDS NOTE
record() {
  SUMMARY_ROWS+=("$(printf '%-22s %-8s %8s  %s' "$1" "$2" "$3" "$4")")
  [ "$2" = "FAIL" ] && FAILED=1
  return 0
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# run_step NAME LOG TIMEOUT CMD... : run CMD with a timeout, tee its output to $OUT/LOG, record the result.
run_step() {
  local name="$1" log="$2" limit="$3"
  shift 3
  local t0 rc status note=""
  t0="$(now)"
  echo "=== $name: $* (limit ${limit}s)" | tee -a "$OUT/$log"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
  rc=$?
  if [ "$rc" -eq 0 ]; then status=ok; else status=FAIL; note="exit $rc"; fi
  [ "$rc" -eq 124 ] && note="timed out after ${limit}s"
  record "$name" "$status" "$(elapsed "$t0")" "$note"
  return "$rc"
}

# ---- 1. environment + pip install (CMake build in the background) ---------------------------------------------------
{
  echo "=== environment ($(date -u +%FT%TZ))"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not found (CUDA_HOME=${CUDA_HOME:-unset})"
  command -v cmake >/dev/null && cmake --version | head -1 || echo "cmake: not found"
  command -v compute-sanitizer >/dev/null && echo "compute-sanitizer: $(command -v compute-sanitizer)" || echo "compute-sanitizer: not found"
} 2>&1 | tee "$OUT/install.log"

HAVE_CMAKE=0
if command -v cmake >/dev/null && command -v nvcc >/dev/null; then
  HAVE_CMAKE=1
  CMAKE_T0="$(now)"
  GEN=()
  command -v ninja >/dev/null && GEN=(-G Ninja)
  ( echo "=== cmake configure + build (background, started with pip install)"
    cmake -S . -B build/gpu_check "${GEN[@]}" -DCMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-80;90}" &&
      timeout "${STEP_TIMEOUT_CMAKE:-420}" cmake --build build/gpu_check --parallel "$MAX_JOBS"
  ) > "$OUT/selftest.log" 2>&1 &
  CMAKE_PID=$!
fi

run_step "pip install -e ." install.log "${STEP_TIMEOUT_INSTALL:-420}" \
  env OUROBOROS_BUILD_CUDA="${OUROBOROS_BUILD_CUDA:-}" "$PY" -m pip install --no-build-isolation --no-deps -v -e .
EXT_NOTE="$("$PY" -c 'import torch, ouroboros_kernels as ok; print(ok.backend_status()["cuda"])' 2>&1 | tail -1)"
record "cuda backend" "$([ "$EXT_NOTE" = available ] && echo ok || echo FAIL)" "-" "$EXT_NOTE"
echo "cuda backend: $EXT_NOTE" | tee -a "$OUT/install.log"

# ---- 2. torch-free build, ctest, sanitizer ---------------------------------------------------------------------------
if [ "$HAVE_CMAKE" = 1 ]; then
  wait "$CMAKE_PID"
  rc=$?
  record "cmake build" "$([ $rc -eq 0 ] && echo ok || echo FAIL)" "$(elapsed "$CMAKE_T0")" \
    "$([ $rc -eq 0 ] || echo "exit $rc, see selftest.log")"
  cat "$OUT/selftest.log"
  if [ "$rc" -eq 0 ]; then
    run_step "ctest (selftest)" selftest.log "${STEP_TIMEOUT_CTEST:-300}" \
      ctest --test-dir build/gpu_check --output-on-failure -R '^(tree_attention_selftest|ngram_selftest)$' -V
    SANITIZER="$(command -v compute-sanitizer || true)"
    for cand in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
      [ -z "$SANITIZER" ] && [ -x "$cand" ] && SANITIZER="$cand"
    done
    if [ -n "$SANITIZER" ]; then
      run_step "sanitizer memcheck" selftest.log "${STEP_TIMEOUT_SANITIZER:-300}" \
        "$SANITIZER" --tool memcheck --error-exitcode 3 --leak-check full build/gpu_check/ouroboros_selftest --quick
      run_step "sanitizer ngram" selftest.log "${STEP_TIMEOUT_SANITIZER:-300}" \
        "$SANITIZER" --tool memcheck --error-exitcode 3 --leak-check full build/gpu_check/ouroboros_ngram_selftest --quick
      run_step "racecheck ngram" selftest.log "${STEP_TIMEOUT_SANITIZER:-300}" \
        "$SANITIZER" --tool racecheck --error-exitcode 3 build/gpu_check/ouroboros_ngram_selftest --quick
    else
      record "sanitizer memcheck" skip "-" "compute-sanitizer not found"
    fi
    # Kernel-only timings of the SPEC §4 attention shapes (CUDA events, L2-rotated cache), no torch involved.
    run_step "kernel bench (C++)" selftest.log "${STEP_TIMEOUT_KBENCH:-180}" \
      build/gpu_check/ouroboros_selftest --quick --bench
    # N-gram pool: insert / lookup / both-in-a-graph per step, V=152064 S=16384 G=20 P=6 (kernel only).
    run_step "ngram bench (C++)" selftest.log "${STEP_TIMEOUT_KBENCH:-180}" \
      build/gpu_check/ouroboros_ngram_selftest --quick --bench
  fi
else
  record "cmake build" skip "-" "cmake or nvcc not found"
fi

# ---- 3. tests --------------------------------------------------------------------------------------------------------
# The GPU-relevant files by default (the CPU-only lossless suite runs in CI); PYTEST_ARGS=tests runs everything.
PYTEST_ARGS="${PYTEST_ARGS:-tests/test_tree_attention.py tests/test_cuda_build.py tests/test_cuda_ngram.py \
tests/test_gpu_pool.py tests/test_fast_path.py tests/test_patch.py}"
# shellcheck disable=SC2086
run_step "pytest tests" pytest.log "${STEP_TIMEOUT_PYTEST:-360}" "$PY" -m pytest -q -ra $PYTEST_ARGS
PYTEST_LINE="$(grep -E '(passed|failed|error)' "$OUT/pytest.log" | tail -1)"
[ -n "$PYTEST_LINE" ] && SUMMARY_ROWS[-1]="${SUMMARY_ROWS[-1]}  ${PYTEST_LINE//=/}"

# ---- 4. benchmarks ---------------------------------------------------------------------------------------------------
# SKIP_BENCH=1 stops after the tests (to split the check over two calls within the 10-minute limit of one).
# The e2e benchmark shares attention.log (8-file limit).
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  if [ -f bench/attention.py ]; then
    run_step "bench attention" attention.log "${STEP_TIMEOUT_BENCH:-240}" \
      "$PY" bench/attention.py --no-flex --out "$OUT/attention.json"
  else
    record "bench attention" skip "-" "bench/attention.py not found"
  fi
  run_step "bench e2e (gpu)" attention.log "${STEP_TIMEOUT_E2E:-480}" \
    "$PY" bench/e2e_gpu.py --pairs "${E2E_PAIRS:-qwen}" --budget-s "${E2E_BUDGET:-420}" --out "$OUT/e2e_gpu.json"
fi

# ---- 5. summary (printed last) ---------------------------------------------------------------------------------------
{
  echo
  echo "=== gpu_check summary ($(date -u +%FT%TZ)); logs in $OUT"
  printf '%-22s %-8s %8s  %s\n' step status seconds note
  for row in "${SUMMARY_ROWS[@]}"; do echo "$row"; done
  if grep -qE '^bench \(' "$OUT/selftest.log" 2>/dev/null; then
    echo
    grep -E '^(bench \(|Hq=)' "$OUT/selftest.log"
  fi
} | tee "$OUT/summary.txt"
exit "$FAILED"
