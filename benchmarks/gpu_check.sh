#!/usr/bin/env bash
# All GPU checks in one go, for a machine with a GPU, a CUDA build of torch and
# nvcc; sized to finish within 8 minutes on an H100 (the step limits add up to 465 s).
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# Steps (each time-limited; a failing step does not stop the next ones):
#   build       the extension for this GPU's architecture (ptxas -v in build.log)
#   tests_verified  tests/test_cuda.py, slow cases included, with the verified kernels (the
#               default): the unverified ones must be refused by the ops and computed by
#               PyTorch's composite in the modules (test_cuda_verified.log, .xml)
#   tests_next  the same with FUSED_BN_CUDA_KERNELS=next, which runs the kernels not yet
#               verified on a GPU (activations other than identity/ReLU, the residual add;
#               docs/cuda.md; test_cuda_next.log, .xml); the slow case is ReLU only, run
#               once above
#   memcheck    compute-sanitizer memcheck on benchmarks/gpu_sanitize_case.py with next
#               (every activation and the residual add)
#   racecheck   compute-sanitizer racecheck on the verified cases (the reductions' shared
#               memory, the same code for every activation)
#   benchmark, benchmark_next   the same reduced rows (BN+ReLU, every other activation,
#               BN+add+ReLU; fwd+bwd) with each selection against eager (benchmark*.txt,
#               .md, .json); FUSED_BN_BENCH_ARGS replaces the rows
# OUT_DIR/summary.txt lists each step's status and duration, each selection's test counts
# and benchmark geometric mean against eager, and whether the "next" selection may become
# the default; the exit status is non-zero when any step failed. tests/test_dropout.py is
# not part of it (28 s on an H200): run it on its own when time is left.
#
# Environment: PYTHON (default python), CUDA_HOME (default /usr/local/cuda when
# present), MAX_JOBS (default: CPU count), FUSED_BN_BENCH_ARGS,
# FUSED_BN_BENCH_SECONDS (each benchmark step's time limit, default 30).
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
cd "$ROOT"
# The in-place build is imported from the checkout, also by scripts under benchmarks/.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
SANITIZER="${CUDA_HOME:+$CUDA_HOME/bin/}compute-sanitizer"
command -v "$SANITIZER" >/dev/null || SANITIZER=compute-sanitizer
failed=0

# step NAME SECONDS LOG COMMAND...: runs COMMAND under a time limit, output to
# OUT/LOG, and records the outcome in OUT/summary.txt.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local begin status verdict
  begin=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
  status=$?
  case $status in
    0) verdict=ok ;;
    124 | 137) verdict="timed out after ${limit} s" ;;
    *) verdict="failed (exit $status)" ;;
  esac
  [ $status -eq 0 ] || failed=1
  printf '%-10s %-28s %4d s  %s\n' "$name" "$verdict" "$(($(date +%s) - begin))" "$log" |
    tee -a "$OUT/summary.txt"
  return $status
}

: >"$OUT/summary.txt"
{
  nvidia-smi || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
  "${CUDA_HOME:+$CUDA_HOME/bin/}nvcc" --version || true
} >"$OUT/device.txt" 2>&1

# The extension must share torch's C++ runtime (libstdc++.so). A compiler that
# links libstdc++ statically (as one GPU image's Python toolchain does) gives it a
# private copy whose locale torch never sets up, and formatting a float in an
# error message then crashes. Such a compiler is replaced by a system g++ that
# links the shared runtime.
probe_dir="$(mktemp -d)"
printf '#include <sstream>\nstd::string f(double x) { std::ostringstream s; s << x; return s.str(); }\n' \
  >"$probe_dir/p.cpp"
# links_shared_runtime CXX: whether CXX builds shared objects against libstdc++.so.
links_shared_runtime() {
  "$1" -shared -fPIC "$probe_dir/p.cpp" -o "$probe_dir/p.so" 2>/dev/null &&
    ldd "$probe_dir/p.so" | grep -q 'libstdc++' &&
    ! nm "$probe_dir/p.so" | grep -q ' [TW] _ZNSt6locale'
}
python_cxx="${CXX:-$("$PY" -c "import sysconfig; print((sysconfig.get_config_var('CXX') or 'c++').split()[0])")}"
if links_shared_runtime "$python_cxx"; then
  echo "gpu_check: C++ compiler $python_cxx (shared libstdc++)" >>"$OUT/device.txt"
else
  for candidate in /usr/bin/g++ /usr/bin/g++-1[0-9]; do
    if [ -x "$candidate" ] && links_shared_runtime "$candidate"; then
      echo "gpu_check: $python_cxx links libstdc++ statically; building with $candidate" |
        tee -a "$OUT/device.txt"
      export CXX="$candidate" CC="${candidate/g++/gcc}" LDSHARED="$candidate -shared"
      break
    fi
  done
  [ -n "${LDSHARED:-}" ] ||
    echo "gpu_check: $python_cxx links libstdc++ statically and no system g++ was found" |
    tee -a "$OUT/device.txt"
fi
rm -rf "$probe_dir"

ARCH="$("$PY" -c "import torch; print('{}.{}'.format(*torch.cuda.get_device_capability()))")"
if ! step build 210 build.log env FUSED_BN_CUDA=1 FUSED_BN_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST="$ARCH" \
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace --build-temp build-gpu; then
  echo "gpu_check: build failed, see $OUT/build.log" >&2
  exit 1
fi
"$PY" .ci/ptxas_report.py "$OUT/build.log" >"$OUT/ptxas.txt" 2>&1 || failed=1

# tests SELECTION LIMIT [PYTEST ARGS...]: tests/test_cuda.py under one kernel selection.
tests() {
  local selection=$1 limit=$2
  shift 2
  step "tests_$selection" "$limit" "test_cuda_$selection.log" env FUSED_BN_CUDA_KERNELS="$selection" \
    "$PY" -m pytest tests/test_cuda.py -q -rfE -p no:cacheprovider \
    --junitxml="$OUT/test_cuda_$selection.xml" "$@"
}
tests verified 70
tests_next_ok=0
tests next 65 -m "not slow" && tests_next_ok=1
memcheck_ok=0
step memcheck 35 memcheck.log env FUSED_BN_CUDA_KERNELS=next "$SANITIZER" --tool memcheck \
  --error-exitcode 1 "$PY" benchmarks/gpu_sanitize_case.py && memcheck_ok=1
step racecheck 25 racecheck.log "$SANITIZER" --tool racecheck --error-exitcode 1 \
  "$PY" benchmarks/gpu_sanitize_case.py
# BN+ReLU runs the verified kernels under both selections: the control row.
bench_rows="--ops bn_relu_fwd_bwd bn_relu6_fwd_bwd bn_leaky_relu_fwd_bwd bn_silu_fwd_bwd \
bn_hardswish_fwd_bwd bn_elu_fwd_bwd bn_add_relu_fwd_bwd --shapes 32,64,56,56 32,256,14,14 \
--dtypes float32 bfloat16 --layouts contiguous --compile-ops none --min-run-time 0.1 --rounds 3"
for selection in verified next; do
  # shellcheck disable=SC2086  # the rows are a list of arguments
  step "bench_$selection" "${FUSED_BN_BENCH_SECONDS:-30}" "benchmark_$selection.txt" env \
    FUSED_BN_CUDA_KERNELS="$selection" "$PY" -m benchmarks --device cuda --malloc steady \
    --json "$OUT/benchmark_$selection.json" --markdown "$OUT/benchmark_$selection.md" \
    ${FUSED_BN_BENCH_ARGS:-$bench_rows}
done

# The last line of pytest's report: counts of passed, failed, skipped, errors.
test_counts() {
  tail -n 1 "$OUT/test_cuda_$1.log" 2>/dev/null | tr -d '=' | sed 's/^ *//; s/ in [0-9.]*s.*//'
}
# The geometric mean against eager over all rows, e.g. 1.23.
bench_geomean() {
  grep -E '^all rows' "$OUT/benchmark_$1.txt" 2>/dev/null | grep -oE '[0-9.]+x' | head -n 1 |
    tr -d x
}

# The verdict on the "next" selection: every CUDA test passed with it, memcheck found no
# error in its kernels, and the same rows
# are not slower with it than with the verified selection, today's default (geometric
# means against eager; the rows themselves are in benchmark_*.txt).
{
  echo
  for selection in verified next; do
    echo "$selection: tests: $(test_counts "$selection")" \
      "benchmark: $(bench_geomean "$selection")x eager (geomean)"
  done
  verified_geomean="$(bench_geomean verified)"
  next_geomean="$(bench_geomean next)"
  if [ "$tests_next_ok" -eq 1 ] && [ "$memcheck_ok" -eq 1 ] && [ -n "$next_geomean" ] &&
    [ -n "$verified_geomean" ] &&
    awk -v n="$next_geomean" -v v="$verified_geomean" 'BEGIN { exit !(n >= v) }'; then
    echo "next selection: all tests passed, memcheck clean, ${next_geomean}x eager (verified:" \
      "${verified_geomean}x): may become the default"
  else
    echo "next selection: NOT ready (all tests passed: $tests_next_ok, memcheck clean:" \
      "$memcheck_ok, geomean ${next_geomean:-none}x eager, verified ${verified_geomean:-none}x)"
  fi
} | tee -a "$OUT/summary.txt"

echo "gpu_check: results in $OUT"
exit $failed
