"""Check that the CPU kernels' element-wise loops vectorise: compile csrc/cpu/*.cpp with the
extension's own flags (setup.py's CPU_CXX_FLAGS) and GCC's vectoriser report, and fail when any
loop under ``#pragma omp simd`` is reported "not vectorized: control flow in loop" for any of its
instantiations or ISA clones (x86-64-v4 / v3 / default).

    python benchmarks/cpu_vectorize_check.py                       # exit 1 on a scalar simd loop
    python benchmarks/cpu_vectorize_check.py --extra-flags=-ftrapping-math   # see what it catches

Why: such a loop compiles to scalar code with a branch per element; on random data that branch
is mispredicted half the time (the L = 0 critic's backward ran 17x slower on an AVX2 machine than
its vectorised form). AVX-512 builds can hide it (masked operations), so a benchmark on one
machine does not; this check does not need the machine at all.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
MISSED = re.compile(r"^(?P<file>[^:\s]+):(?P<line>\d+):\d+: missed: not vectorized: "
                    r"control flow in loop")


def cpu_cxx_flags() -> list[str]:
    """setup.py's CPU_CXX_FLAGS, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "CPU_CXX_FLAGS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise SystemExit("setup.py has no CPU_CXX_FLAGS list")


def simd_loops(source: pathlib.Path) -> list[tuple[int, int]]:
    """(first, last) line of each loop that follows ``#pragma omp simd`` (1-based, inclusive):
    from the pragma to the brace that closes the loop's body."""
    lines = source.read_text().splitlines()
    loops = []
    for i, text in enumerate(lines):
        if not re.match(r"\s*#pragma omp simd\b", text):
            continue
        depth, opened, j = 0, False, i + 1
        while j < len(lines):
            depth += lines[j].count("{") - lines[j].count("}")
            opened = opened or "{" in lines[j]
            if (opened and depth <= 0) or (not opened and lines[j].rstrip().endswith(";")):
                break
            j += 1
        loops.append((i + 1, j + 1))
    return loops


def compile_report(source: pathlib.Path, flags: list[str], compiler: str) -> str:
    import torch.utils.cpp_extension as ext

    includes = [f"-I{p}" for p in ext.include_paths()] + [
        f"-I{sysconfig.get_paths()['include']}"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [compiler, *flags, "-fPIC", *includes, "-DTORCH_API_INCLUDE_EXTENSION_H",
               "-DTORCH_EXTENSION_NAME=_C", "-fopt-info-vec-missed", "-c", str(source), "-o",
               os.path.join(tmp, "x.o")]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"compiling {source.name} failed:\n{res.stderr[-3000:]}")
    return res.stderr


def scalar_simd_loops(report: str, source: pathlib.Path) -> list[tuple[int, int, int]]:
    """(report line, loop first, loop last) for each "control flow" miss inside a simd loop."""
    loops = simd_loops(source)
    found = set()
    for line in report.splitlines():
        m = MISSED.match(line)
        if m is None or pathlib.Path(m["file"]).name != source.name:
            continue
        n = int(m["line"])
        for first, last in loops:
            if first <= n <= last:
                found.add((n, first, last))
    return sorted(found)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extra-flags", default="", help="appended to CPU_CXX_FLAGS (one string)")
    p.add_argument("--compiler", default=os.environ.get("CXX", "c++"))
    args = p.parse_args(argv)
    if shutil.which(args.compiler) is None:
        raise SystemExit(f"no C++ compiler {args.compiler!r}")
    flags = cpu_cxx_flags() + args.extra_flags.split()
    sources = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
    print(f"flags: {' '.join(flags)}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        reports = list(pool.map(lambda s: compile_report(s, flags, args.compiler), sources))
    bad = 0
    for source, report in zip(sources, reports):
        misses = scalar_simd_loops(report, source)
        loops = simd_loops(source)
        status = "ok" if not misses else f"{len(misses)} scalar"
        print(f"{source.relative_to(ROOT)}: {len(loops)} omp simd loops, {status}")
        for n, first, last in misses:
            print(f"  line {n} (loop at lines {first}-{last}): not vectorized, control flow in "
                  "loop")
        bad += len(misses)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
