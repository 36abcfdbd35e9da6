"""The fused CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer.

Runs tests/run_cpu_sanitizers.sh: the CPU extension built again with -fsanitize=address,undefined
in a copy of this checkout, and the CPU backend's op, module and random-configuration suites and
the CUDA kernels' CPU emulation run against it in their own pytest process. Fails on any
sanitizer report (an out-of-bounds access of a kernel buffer or of the emulated shared memory,
undefined behaviour) or failing test. About 10 minutes on 2 cores: marked slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SESSION_SEED

ROOT = Path(__file__).resolve().parents[1]


def _gcc_has_sanitizers() -> bool:
    if shutil.which("gcc") is None:
        return False
    for lib in ("libasan.so", "libubsan.so"):
        path = subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True,
                              text=True).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):  # gcc echoes unknown names
            return False
    return True


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(os.environ.get("FACTORCL_UNDER_SANITIZERS")),
                       reason="already the sanitized run"),
    pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None,
                       reason="the script copies the checkout's tracked files: needs git"),
    pytest.mark.skipif(not _gcc_has_sanitizers(), reason="needs gcc with libasan and libubsan"),
]


def test_cpu_kernels_under_address_and_undefined_behaviour_sanitizers():
    # the child draws this session's per-test seeds, so that a failure there is rerun with the
    # FACTORCL_TEST_SEED this session's header prints (its own header is not in the output)
    env = dict(os.environ, PYTHON=sys.executable, FACTORCL_TEST_SEED=str(SESSION_SEED))
    proc = subprocess.run(["bash", str(ROOT / "tests" / "run_cpu_sanitizers.sh")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    output = proc.stdout + proc.stderr
    print(output)
    assert proc.returncode == 0, f"run_cpu_sanitizers.sh exited with {proc.returncode}:\n" \
        f"{output[-8000:]}"
    assert "=== no sanitizer report" in output and " passed" in output, output[-3000:]
