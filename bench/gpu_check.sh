#!/usr/bin/env bash
# One-shot check for a lent GPU machine (H100/H200, no network): build, self-test, sanitizer, tests, benchmarks.
#
#   OUT=/some/dir bash bench/gpu_check.sh        # run from anywhere; logs go to $OUT (default build/gpu_check_out)
#   DRY_RUN=1 bash bench/gpu_check.sh            # CPU smoke test of this script: no install, no GPU, tiny steps
#                                                 (the e2e benchmark with --tiny)
#
# Steps (each logged under $OUT, tee'd as it runs so a timeout still leaves partial logs):
#   1. build.log      environment (GPU, driver, python, torch, nvcc) + `pip install --no-build-isolation -e .` (timed)
#                     while, in the background, the torch-free CMake build of csrc/ runs; then ctest (C++ reference
#                     self-tests: tree attention, n-gram pool) and compute-sanitizer memcheck/racecheck (--quick),
#                     in the background while the tests run
#   2. run.log        pytest (CUDA tests, the GPU lossless suite; bf16 match rates -> gpu_lossless.jsonl), then
#                     `python -m bench.attention --quick` (the issue-16 attention table: attention.json/.png), the
#                     kernel-only timings (C++), and `python -m bench.e2e_gpu` (e2e_gpu.json) with what is left of
#                     DEADLINE_S
#   3. summary.txt    the table printed last; the e2e part (and e2e_gpu.png) through the report step,
#                     `python -m bench.report $OUT/e2e_gpu.json`, which also re-reports the JSON on any other machine
# 8 files come back from $OUT at most: build.log run.log summary.txt gpu_lossless.jsonl attention.{json,png}
# e2e_gpu.{json,png}. Per-step limits are STEP_TIMEOUT_<NAME> seconds (env); DEADLINE_S (default 480: the attention
# table and the CUDA tests fit in 8 minutes on a fresh machine) bounds the whole script (the e2e benchmark gets what is
# left, and is skipped below 60 s; SKIP_E2E=1 skips it). The exit status is 1 when any step failed.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/build/gpu_check_out}"
mkdir -p "$OUT" build
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY="${PYTHON:-$(command -v python3 || command -v python)}"
T_START="$(date +%s)"
DEADLINE_S="${DEADLINE_S:-480}"
DRY_RUN="${DRY_RUN:-0}"
if [ "$DRY_RUN" = 1 ]; then   # CPU smoke test of the script's flow: nothing installed, no GPU steps
  SKIP_CMAKE=1 SKIP_INSTALL=1 E2E_COMPILE=0
  E2E_EXTRA=(--tiny)             # the e2e benchmark on tiny configs (every stage, about a minute on a CPU)
  PYTEST_ARGS="${PYTEST_ARGS:-tests/kernels/test_cuda_build.py -k backend_status}"
  PYTEST_WORKERS="${PYTEST_WORKERS:-0}"
  ATTN_ARGS=(--dry-run)
else
  ATTN_ARGS=(--quick --no-flex --warmup 5 --rep 30)
  E2E_EXTRA=()
fi
left() { echo $(( DEADLINE_S - ($(date +%s) - T_START) )); }
cap() { local l; l="$(left)"; [ "$l" -lt 5 ] && l=5; [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }   # min(limit, left)
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
} 2>&1 | tee "$OUT/build.log"

HAVE_CMAKE=0
if [ "${SKIP_CMAKE:-0}" != 1 ] && command -v cmake >/dev/null && command -v nvcc >/dev/null; then
  HAVE_CMAKE=1
  CMAKE_T0="$(now)"
  GEN=()
  command -v ninja >/dev/null && GEN=(-G Ninja)
  ( echo "=== cmake configure + build (background, started with pip install)"
    cmake -S . -B build/gpu_check "${GEN[@]}" -DCMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-90}" &&
      timeout "${STEP_TIMEOUT_CMAKE:-300}" cmake --build build/gpu_check --parallel "$MAX_JOBS"
  ) > build/gpu_check_cmake.log 2>&1 &
  CMAKE_PID=$!
fi

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  run_step "pip install -e ." build.log "${STEP_TIMEOUT_INSTALL:-300}" \
    env OUROBOROS_BUILD_CUDA="${OUROBOROS_BUILD_CUDA:-}" "$PY" -m pip install --no-build-isolation --no-deps -v -e .
else
  record "pip install -e ." skip "-" "SKIP_INSTALL=1"
fi
export PYTHONPATH="$REPO:$REPO/python${PYTHONPATH:+:$PYTHONPATH}"   # the tree itself, should the install fail
ext_note() { "$PY" -c 'import torch, ouroboros_kernels as ok; print(ok.backend_status()["cuda"])' 2>&1 | tail -1; }
EXT_NOTE="$(ext_note)"
if [ "$DRY_RUN" = 1 ]; then
  :   # no extension on a CPU machine; nothing to build
elif [ "$EXT_NOTE" != available ] && [ "${OUROBOROS_BUILD_CUDA:-}" != 0 ]; then   # fallback: build it in place
  run_step "build_ext --inplace" build.log "${STEP_TIMEOUT_INSTALL:-300}" \
    env OUROBOROS_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace
  EXT_NOTE="$(ext_note)"
fi
if [ "$DRY_RUN" = 1 ]; then
  record "cuda backend" skip "-" "$EXT_NOTE (DRY_RUN)"
else
  record "cuda backend" "$([ "$EXT_NOTE" = available ] && echo ok || echo FAIL)" "-" "$EXT_NOTE"
fi
echo "cuda backend: $EXT_NOTE" | tee -a "$OUT/build.log"

# ---- 2. torch-free build; ctest + sanitizer in the background while the tests run -------------------------------------
SELFTEST_PID=""
if [ "$HAVE_CMAKE" = 1 ]; then
  wait "$CMAKE_PID"
  rc=$?
  record "cmake build" "$([ $rc -eq 0 ] && echo ok || echo FAIL)" "$(elapsed "$CMAKE_T0")" \
    "$([ $rc -eq 0 ] || echo "exit $rc, see build.log")"
  cat build/gpu_check_cmake.log >> "$OUT/build.log"
  [ "$rc" -ne 0 ] && tail -30 build/gpu_check_cmake.log
  if [ "$rc" -eq 0 ]; then
    SANITIZER="$(command -v compute-sanitizer || true)"
    for cand in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
      [ -z "$SANITIZER" ] && [ -x "$cand" ] && SANITIZER="$cand"
    done
    (
      # The summary rows of a subshell are lost: each step prints a RESULT line that the parent turns into rows.
      st() { local n="$1"; shift; local t0; t0="$(now)"
             timeout --kill-after=10 "${STEP_TIMEOUT_SELFTEST:-200}" "$@" > build/gpu_check_step.log 2>&1
             local rc=$?; cat build/gpu_check_step.log; tail -5 build/gpu_check_step.log >&2
             echo "RESULT|$n|$([ $rc -eq 0 ] && echo ok || echo FAIL)|$(elapsed "$t0")|$([ $rc -eq 0 ] || echo "exit $rc")"; }
      st "ctest (selftest)" ctest --test-dir build/gpu_check --output-on-failure -R '^(tree_attention_selftest|ngram_selftest)$'
      if [ -n "$SANITIZER" ]; then
        st "sanitizer memcheck" "$SANITIZER" --tool memcheck --error-exitcode 3 build/gpu_check/ouroboros_selftest --quick
        st "sanitizer ngram" "$SANITIZER" --tool memcheck --error-exitcode 3 build/gpu_check/ouroboros_ngram_selftest --quick
        st "racecheck ngram" "$SANITIZER" --tool racecheck --error-exitcode 3 build/gpu_check/ouroboros_ngram_selftest --quick
      else
        echo "RESULT|sanitizer memcheck|skip|-|compute-sanitizer not found"
      fi
    ) >> "$OUT/build.log" 2>/dev/null &
    SELFTEST_PID=$!
  fi
else
  record "cmake build" skip "-" "SKIP_CMAKE=1, or cmake/nvcc not found"
fi

# ---- 3. tests --------------------------------------------------------------------------------------------------------
# The GPU-relevant files by default (the CPU-only lossless suite runs in CI); PYTEST_ARGS=tests runs everything.
# The inductor tests (-m compile) are left to CI's CPU run: the e2e benchmark times the compiled path on the GPU.
PYTEST_ARGS="${PYTEST_ARGS:-tests/decoding/test_gpu_lossless.py tests/kernels/test_tree_attention.py \
tests/kernels/test_cuda_build.py tests/kernels/test_cuda_ngram.py tests/drafting/test_gpu_pool.py tests/hf/test_fast_path.py \
tests/hf/test_patch.py tests/decoding/test_device_cycle.py tests/decoding/test_batch_cycle.py tests/kernels/test_tree_attention_rows.py tests/kernels/test_glue_kernels.py tests/hf/test_fused_glue.py \
tests/tuning/test_probes.py tests/hf/test_compile.py}"
PYTEST_MARK="${PYTEST_MARK:-not compile}"
PYTEST_OPTS=()
"$PY" -c 'import xdist' 2>/dev/null && PYTEST_OPTS=(-n "${PYTEST_WORKERS:-8}")
# one hung or crashing test must not eat the step: a per-test limit when pytest-timeout is there
"$PY" -c 'import pytest_timeout' 2>/dev/null && PYTEST_OPTS+=(--timeout "${PYTEST_TEST_TIMEOUT:-90}")
# shellcheck disable=SC2086
export OUROBOROS_REPORT_DIR="$OUT"
run_step "pytest" run.log "${STEP_TIMEOUT_PYTEST:-200}" \
  "$PY" -m pytest -q -ra -p no:cacheprovider "${PYTEST_OPTS[@]}" -m "$PYTEST_MARK" $PYTEST_ARGS
PYTEST_LINE="$(grep -E '(passed|failed|error)' "$OUT/run.log" | tail -1)"
[ -n "$PYTEST_LINE" ] && SUMMARY_ROWS[-1]="${SUMMARY_ROWS[-1]}  ${PYTEST_LINE//=/}"
if [ -n "$SELFTEST_PID" ]; then
  wait "$SELFTEST_PID"
  while IFS='|' read -r _ n st sec note; do record "$n" "$st" "$sec" "$note"; done < <(grep '^RESULT|' "$OUT/build.log")
fi

# ---- 4. benchmarks ---------------------------------------------------------------------------------------------------
# SKIP_BENCH=1 stops after the tests. The attention table (issue 16) first, then the kernel-only timings (C++), then
# the end-to-end benchmark (issue 6) with what is left of DEADLINE_S.
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  if [ "${SKIP_KBENCH:-0}" = 1 ]; then
    record "kernel benches" skip "-" "SKIP_KBENCH=1"
  else
    run_step "bench attention" run.log "$(cap "${STEP_TIMEOUT_BENCH:-150}")" \
      "$PY" -m bench.attention "${ATTN_ARGS[@]}" --out "$OUT/attention.json"
    if [ "$HAVE_CMAKE" = 1 ] && [ -x build/gpu_check/ouroboros_selftest ]; then
      # Kernel-only timings of the SPEC §4 attention shapes and the n-gram pool (CUDA events, no torch).
      run_step "kernel bench (C++)" run.log "$(cap "${STEP_TIMEOUT_KBENCH:-40}")" \
        build/gpu_check/ouroboros_selftest --quick --bench
      run_step "ngram bench (C++)" run.log "$(cap "${STEP_TIMEOUT_KBENCH:-40}")" \
        build/gpu_check/ouroboros_ngram_selftest --quick --bench
    fi
  fi
  E2E_LEFT="$(( $(left) - ${BENCH_RESERVE_S:-15} ))"   # keep a little for the summary
  if [ "${SKIP_E2E:-0}" = 1 ]; then
    record "bench e2e (gpu)" skip "-" "SKIP_E2E=1"
  elif [ "$E2E_LEFT" -gt 60 ]; then
    run_step "bench e2e (gpu)" run.log "$E2E_LEFT" \
      "$PY" -m bench.e2e_gpu --pairs "${E2E_PAIRS:-qwen}" --budget-s "$(( E2E_LEFT - 20 ))" \
      --replay-max-cycles "${REPLAY_CYCLES:-150}" $([ "${E2E_COMPILE:-1}" = 1 ] && echo --ours-compile) \
      "${E2E_EXTRA[@]}" --no-plot --out "$OUT/e2e_gpu.json"      # the report step below draws the PNG
  else
    record "bench e2e (gpu)" skip "-" "only ${E2E_LEFT}s left of DEADLINE_S"
  fi
fi

# ---- 5. summary (printed last) ---------------------------------------------------------------------------------------
{
  echo
  echo "=== gpu_check summary ($(date -u +%FT%TZ)); logs in $OUT"
  printf '%-22s %-8s %8s  %s\n' step status seconds note
  for row in "${SUMMARY_ROWS[@]}"; do echo "$row"; done
  [ -f "$OUT/gpu_lossless.jsonl" ] && { echo; echo "bf16 lossless (tiny models):"; cat "$OUT/gpu_lossless.jsonl"; }
  if grep -q '^Targets (issue 16' "$OUT/run.log" 2>/dev/null; then
    echo
    sed -n '/^Targets (issue 16/,/targets met$/p' "$OUT/run.log"
  fi
  if grep -qE '^bench \(' "$OUT/run.log" 2>/dev/null; then
    echo
    grep -E '^(bench \(|Hq=)' "$OUT/run.log"
  fi
  if [ -f "$OUT/e2e_gpu.json" ]; then   # the e2e table (and e2e_gpu.png beside the JSON) from the JSON alone
    echo
    "$PY" -m bench.report "$OUT/e2e_gpu.json" 2>&1 || echo "report of $OUT/e2e_gpu.json failed"
  fi
} | tee "$OUT/summary.txt"
exit "$FAILED"
