#!/usr/bin/env bash
# CUDA build check, for CI machines without a GPU.
#
# In a separate venv with the CUDA build of torch, builds the whole extension
# with nvcc (default archs sm_80 and sm_90 + PTX), failing on any compiler
# warning in the CUDA sources (FUSED_BN_WERROR=1) and on register spills in
# our kernels (ptxas -v); then imports it, checks that the CUDA kernels are
# registered, and runs the test suite against that build (the CUDA tests skip
# without a GPU).
#
# The build goes to build-cuda/ and is tested from a staging copy there, so the
# in-place CPU build (fused_bn/_C*.so) is left alone.
#
# Environment:
#   FUSED_BN_CUDA_VENV     venv to create or reuse (default: .venv-cuda)
#   CUDA_HOME              CUDA toolkit with nvcc (default: /usr/local/cuda, else nvcc on PATH)
#   TORCH_CUDA_ARCH_LIST   default "8.0;9.0+PTX"
#   MAX_JOBS               parallel compile jobs (default: 2)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$(realpath -m "${FUSED_BN_CUDA_VENV:-.venv-cuda}")"
OUT="build-cuda"
PY="$VENV/bin/python"
start=$(date +%s)
phase_start=$start

phase() {
  local now
  now=$(date +%s)
  echo "== cuda_build: $1 done in $((now - phase_start)) s (total $((now - start)) s)"
  phase_start=$now
}

# 1. The venv: torch's default PyPI wheel for 2.13.0 is the CUDA 13.0 build.
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
"$PY" -m pip install --isolated --quiet --disable-pip-version-check \
  torch==2.13.0 numpy pytest hypothesis expecttest "setuptools>=77" wheel ninja
"$PY" - <<'EOF'
import torch
assert torch.version.cuda is not None, f"torch {torch.__version__} is not a CUDA build"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
phase "venv"

# 2. The toolkit.
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  else
    echo "cuda_build: nvcc not found; set CUDA_HOME" >&2
    exit 1
  fi
fi
export CUDA_HOME
"$CUDA_HOME/bin/nvcc" --version | tail -n 2

# 3. The build: warnings are errors, ptxas reports every kernel's resources.
mkdir -p "$OUT"
LOG="$OUT/build.log"
rm -rf "$OUT/lib"
set +e
FUSED_BN_CUDA=1 FUSED_BN_WERROR=1 FUSED_BN_PTXAS_VERBOSE=1 \
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}" MAX_JOBS="${MAX_JOBS:-2}" \
  "$PY" setup.py build_ext --build-temp "$OUT/temp" --build-lib "$OUT/lib" >"$LOG" 2>&1
status=$?
set -e
if [ $status -ne 0 ]; then
  grep -E -B2 -A8 "error|warning" "$LOG" | head -n 200 || tail -n 100 "$LOG"
  echo "cuda_build: the CUDA build failed (full log: $LOG)" >&2
  exit $status
fi
phase "build"

# 4. Register use and spills of our kernels, per architecture.
"$PY" .ci/ptxas_report.py "$LOG"

# 5. Import on this (GPU-less) machine and run the tests against this build.
STAGE="$OUT/stage"
rm -rf "$STAGE"
mkdir -p "$STAGE"
cp -r fused_bn tests benchmarks pyproject.toml README.md "$STAGE"/
rm -f "$STAGE"/fused_bn/_C*.so
cp "$OUT"/lib/fused_bn/_C*.so "$STAGE"/fused_bn/
cd "$STAGE"
"$PY" - <<'EOF'
import torch
import fused_bn

info = fused_bn.build_info()
print("build_info:", info)
assert info["cuda"] is True, "the extension was built without CUDA kernels"
ops = ["batch_norm_act", "batch_norm_act_backward", "batch_norm_stats", "batch_norm_act_elemt",
       "batch_norm_act_backward_reduce", "batch_norm_act_backward_elemt",
       "update_running_stats_", "dropout", "dropout_", "dropout_apply_mask", "philox4x32"]
missing = [op for op in ops
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_bn::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print(f"CUDA kernels registered for {len(ops)} ops; torch.cuda.is_available() = "
      f"{torch.cuda.is_available()}")
EOF
"$PY" -m pytest tests -q -p no:cacheprovider
cd "$ROOT"
phase "import and tests"
echo "== cuda_build: OK in $(($(date +%s) - start)) s"
