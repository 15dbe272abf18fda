"""The GPU check's Python run on CPU: tests/test_cuda.py with FUSED_BN_TEST_DEVICE=cpu and
benchmarks/gpu_sanitize_case.py --device cpu. Without a GPU, every call they make still
meets the current op schemas and references, so they cannot go stale between the sessions
that have a GPU (benchmarks/gpu_check.sh)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run_on_cpu(*args):
    # PYTHONPATH: a script's own folder, not the working directory, starts sys.path, and
    # fused_bn may be this checkout's build rather than an installed package.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, FUSED_BN_TEST_DEVICE="cpu", PYTHONPATH=path)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cuda_test_file_runs_on_cpu():
    result = run_on_cpu("-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                        str(ROOT / "tests" / "test_cuda.py"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def test_sanitizer_case_runs_on_cpu():
    result = run_on_cpu(str(ROOT / "benchmarks" / "gpu_sanitize_case.py"), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cases run on cpu" in result.stdout
