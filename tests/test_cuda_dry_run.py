"""tests/test_cuda.py run on CPU (FUSED_BN_TEST_DEVICE=cpu): without a GPU, every call of
the CUDA test file still meets the current op schemas and references, so the file cannot
go stale between the sessions that have a GPU."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_cuda_test_file_runs_on_cpu():
    env = dict(os.environ, FUSED_BN_TEST_DEVICE="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         str(TESTS / "test_cuda.py")],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
