"""`make lint` as a test, so that CI keeps it passing: ruff (rules pinned in pyproject.toml) over
the Python sources and clang-format (.clang-format) over csrc/. requirements.txt pins both tools;
where one is not installed its test is skipped."""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_DIRS = ["factorcl_ext", "python", "tests", "benchmarks"]
CSRC_PATTERNS = ["csrc/*.cpp", "csrc/*.h", "csrc/*/*.cpp", "csrc/*/*.h", "csrc/*/*.cu",
                 "csrc/*/*.cuh"]


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"{' '.join(cmd[:3])} ... failed (exit {done.returncode}):\n{done.stdout}{done.stderr}"
    )


def test_ruff():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -r requirements.txt)")
    _run([sys.executable, "-m", "ruff", "check", "--no-cache", *PYTHON_DIRS])


def test_clang_format():
    beside = os.path.join(os.path.dirname(sys.executable), "clang-format")
    exe = beside if os.path.exists(beside) else shutil.which("clang-format")
    if exe is None:
        pytest.skip("clang-format is not installed (pip install -r requirements.txt)")
    files = sorted(f for p in CSRC_PATTERNS for f in glob.glob(os.path.join(ROOT, p)))
    assert len(files) >= 10, f"csrc/ sources not found under {ROOT}"
    _run([exe, "--dry-run", "-Werror", *files])
