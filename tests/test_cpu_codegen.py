"""What the CPU kernels compile to, checked on any machine: every loop under ``#pragma omp simd``
in csrc/cpu vectorises for each ISA clone with the extension's own flags (setup.py's
CPU_CXX_FLAGS). A scalar one runs with a branch per element; on AVX2 the L = 0 critic's backward
was 17x slower that way, while the AVX-512 machine its benchmark ran on hid it.
benchmarks/cpu_vectorize_check.py does the compiling; about 20 s a run on 2 cores."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from conftest import load_benchmark


def _is_gcc() -> bool:
    exe = shutil.which(os.environ.get("CXX", "c++"))
    if exe is None:
        return False
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return "Free Software Foundation" in out


pytestmark = pytest.mark.skipif(not _is_gcc(), reason="needs GCC (its vectoriser report)")


@pytest.fixture(scope="module")
def check():
    return load_benchmark("cpu_vectorize_check")


def test_every_simd_loop_vectorises_with_the_build_flags(check, capsys):
    assert "-fno-trapping-math" in check.cpu_cxx_flags()
    code = check.main([])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"csrc/cpu/pair_mlp.cpp: [1-9]\d* omp simd loops, ok", out), out


def test_the_check_finds_the_scalar_relu_backward_without_the_flag(check, capsys):
    """The check can fail: with trapping math back on, the relu backward loops (the output
    layer's and the L = 0 recomputing one) are reported scalar."""
    code = check.main(["--extra-flags=-ftrapping-math"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert out.count("not vectorized, control flow in loop") >= 2, out


def test_simd_loop_ranges_cover_the_loop_bodies(check, tmp_path):
    src = tmp_path / "k.cpp"
    src.write_text("void f(float* x, int n) {\n"
                   "#pragma omp simd\n"
                   "  for (int i = 0; i < n; ++i) {\n"
                   "    x[i] = x[i] < 0 ? 0 : x[i];\n"
                   "  }\n"
                   "#pragma omp simd\n"
                   "  for (int i = 0; i < n; ++i) x[i] += 1;\n"
                   "}\n")
    assert check.simd_loops(src) == [(2, 5), (6, 7)]
    report = f"{src}:4:12: missed: not vectorized: control flow in loop.\n" \
             f"{src}:8:1: missed: not vectorized: control flow in loop.\n"
    assert check.scalar_simd_loops(report, src) == [(4, 2, 5)]
