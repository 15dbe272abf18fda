#!/usr/bin/env bash
# All GPU checks in one go, for a machine with a GPU, a CUDA build of torch and
# nvcc; sized to finish within 8 minutes (the step limits add up to 500 s).
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# Steps (each time-limited; a failing step does not stop the next ones):
#   build       the extension for this GPU's architecture (ptxas -v in build.log)
#   tests_cuda  tests/test_cuda.py, slow cases included (test_cuda.log, test_cuda.xml),
#               with the verified kernels (the default)
#   tests_next  the same with FUSED_BN_CUDA_KERNELS=next: the kernels not yet verified on a
#               GPU (activations other than identity/ReLU, the residual add; docs/cuda.md)
#   tests_dropout  tests/test_dropout.py, CPU-vs-CUDA masks included (test_dropout.log,
#               test_dropout.xml)
#   memcheck    compute-sanitizer memcheck on benchmarks/gpu_sanitize_case.py
#   racecheck   compute-sanitizer racecheck on the same
#   benchmark   python -m benchmarks --device cuda $FUSED_BN_BENCH_ARGS (benchmark.txt,
#               benchmark.md, benchmark.json; default: float32/bfloat16/float16)
#   benchmark_next  the activation and residual rows with FUSED_BN_CUDA_KERNELS=next against
#               eager (benchmark_next.txt, .md, .json)
# OUT_DIR/summary.txt lists each step's status and duration, each benchmark's geometric
# mean against eager, and whether the "next" selection may become the default; the
# exit status is non-zero when any step failed.
#
# Environment: PYTHON (default python), CUDA_HOME (default /usr/local/cuda when
# present), MAX_JOBS (default: CPU count), FUSED_BN_BENCH_ARGS,
# FUSED_BN_BENCH_SECONDS (each benchmark step's time limit, default 45).
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

# One pytest run per file: a crash in one keeps the other's report.
step tests_cuda 60 test_cuda.log "$PY" -m pytest tests/test_cuda.py -q -rfE -p no:cacheprovider \
  --junitxml="$OUT/test_cuda.xml"
tests_next_ok=0
step tests_next 60 test_cuda_next.log env FUSED_BN_CUDA_KERNELS=next "$PY" -m pytest \
  tests/test_cuda.py -q -rfE -p no:cacheprovider --junitxml="$OUT/test_cuda_next.xml" &&
  tests_next_ok=1
step tests_dropout 30 test_dropout.log "$PY" -m pytest tests/test_dropout.py -q -rfE \
  -p no:cacheprovider --junitxml="$OUT/test_dropout.xml"
step memcheck 35 memcheck.log "$SANITIZER" --tool memcheck --error-exitcode 1 \
  "$PY" benchmarks/gpu_sanitize_case.py
step racecheck 25 racecheck.log "$SANITIZER" --tool racecheck --error-exitcode 1 \
  "$PY" benchmarks/gpu_sanitize_case.py
# shellcheck disable=SC2086  # FUSED_BN_BENCH_ARGS is a list of arguments
step benchmark "${FUSED_BN_BENCH_SECONDS:-45}" benchmark.txt "$PY" -m benchmarks --device cuda \
  --malloc steady --json "$OUT/benchmark.json" --markdown "$OUT/benchmark.md" \
  ${FUSED_BN_BENCH_ARGS:---dtypes float32 bfloat16}
next_ops="bn_relu6_fwd_bwd bn_leaky_relu_fwd_bwd bn_silu_fwd_bwd bn_hardswish_fwd_bwd \
bn_elu_fwd_bwd bn_add_relu_fwd_bwd"
# shellcheck disable=SC2086  # next_ops is a list of arguments
step benchmark_next "${FUSED_BN_BENCH_SECONDS:-45}" benchmark_next.txt env \
  FUSED_BN_CUDA_KERNELS=next "$PY" -m benchmarks --device cuda --malloc steady --ops $next_ops \
  --shapes 32,64,56,56 32,256,14,14 --dtypes float32 bfloat16 \
  --json "$OUT/benchmark_next.json" --markdown "$OUT/benchmark_next.md"

# The verdict on the "next" selection: every CUDA test passed with it, and its rows are
# not slower than eager (geometric mean; the rows themselves are in benchmark_next.txt).
{
  for log in benchmark.txt benchmark_next.txt; do
    [ -f "$OUT/$log" ] && echo "$log: $(grep -E '^all rows' "$OUT/$log" | head -n 1)"
  done
  next_geomean="$(grep -E '^all rows' "$OUT/benchmark_next.txt" 2>/dev/null |
    grep -oE '[0-9.]+x' | head -n 1 | tr -d x)"
  if [ "$tests_next_ok" -eq 1 ] && [ -n "$next_geomean" ] &&
    awk -v g="$next_geomean" 'BEGIN { exit !(g >= 1.0) }'; then
    echo "next selection: tests passed, ${next_geomean}x eager: may become the default"
  else
    echo "next selection: NOT ready (tests passed: $tests_next_ok, geomean: ${next_geomean:-none})"
  fi
} | tee -a "$OUT/summary.txt"

echo "gpu_check: results in $OUT"
exit $failed
