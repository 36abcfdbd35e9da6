"""Compile the CUDA backend's kernels for one GPU target, without a GPU, and print each kernel's
registers, spills and local-memory stack per mode (and with --sass its machine-code counts): a
look at what a GPU would run, and the check that a kernel change did not start spilling.

    python benchmarks/cuda_compile_check.py                # sm_90, every csrc/cuda/*.cu
    python benchmarks/cuda_compile_check.py --arch 80 --sass pair_mlp_bwd.cu

Needs nvcc (CUDA_HOME or /usr/local/cuda) and torch's CUDA headers; compiles with the nvcc flags
setup.py uses. SASS counts (--sass, through the cuobjdump that ships with Triton): HMMA
(tensor-core mma.sync), LDG.128 (16-byte global loads), LDG (all global loads), LDL/STL (local
memory: spills and stack arrays). Counts are static (instructions in the code), not executed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {  # Mode<T, Kind> as mangled in the kernel names -> the names csrc/cuda/README.md uses
    "13__nv_bfloat16LNS0_4KindE0": "bf16",
    "6__halfLNS0_4KindE0": "fp16",
    "fLNS0_4KindE1": "tf32",
    "fLNS0_4KindE2": "fp32",
    "dLNS0_4KindE2": "fp64",
}
KERNEL = re.compile(r"_ZN12factorcl_ext4cuda(\d+)(\w+?)I")


def _nvcc() -> str:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = Path(home) / "bin" / "nvcc"
    if not nvcc.exists():
        sys.exit(f"no nvcc at {nvcc}: set CUDA_HOME")
    return str(nvcc)


def _includes() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    dirs = include_paths(device_type="cuda") + [sysconfig.get_paths()["include"],
                                                 str(ROOT / "csrc"), str(ROOT / "csrc" / "cuda")]
    try:  # cuBLAS headers of the pip CUDA runtime (as setup.py)
        import nvidia

        dirs += [os.path.join(b, "cu13", "include") for b in nvidia.__path__]
    except ImportError:
        pass
    return [f"-I{d}" for d in dirs if os.path.isdir(d)]


def compile_one(src: Path, arch: str, out_dir: Path) -> tuple[str, str]:
    obj = out_dir / (src.stem + ".o")
    cmd = [_nvcc(), "-O3", "-std=c++20", "--expt-relaxed-constexpr",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", *_includes(),
           "-DTORCH_EXTENSION_NAME=_C", "-c", str(src), "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"nvcc failed on {src.name}:\n{res.stderr[-4000:]}")
    return res.stderr, str(obj)


def ptxas_rows(log: str):
    """(kernel, mode, registers, spill stores, spill loads, stack) per entry function."""
    name = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m and name:
            stack, st, ld = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            k = KERNEL.search(name)
            kernel = k.group(2)[:int(k.group(1))] if k else name
            mode = next((v for key, v in MODES.items() if key in name), "-")
            yield kernel, mode, int(m.group(1)), st, ld, stack, name
            name = None


def sass_counts(obj: str) -> dict[str, dict[str, int]]:
    try:
        import triton

        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    except ImportError:
        tool = None
    tool = str(tool) if tool and tool.exists() else shutil.which("cuobjdump")
    if tool is None:
        sys.exit("--sass needs cuobjdump (Triton ships one)")
    text = subprocess.run([tool, "-sass", obj], capture_output=True, text=True).stdout
    counts = {}
    for body in re.split(r"\n\s*Function : ", text)[1:]:
        name = body.split("\n", 1)[0].strip()
        ins = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", body)
        counts[name] = {
            "instr": len(ins),
            "HMMA": sum(i.startswith("HMMA") for i in ins),
            "LDG": sum(i.startswith("LDG") for i in ins),
            "LDG.128": sum(i.startswith("LDG") and i.endswith(".128") for i in ins),
            "LDL/STL": sum(i.startswith(("LDL", "STL")) for i in ins),
        }
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("files", nargs="*", help="csrc/cuda/*.cu file names (default: all)")
    p.add_argument("--arch", default="90", help="compute capability without the dot: 80, 90")
    p.add_argument("--sass", action="store_true", help="also count SASS instructions")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    srcs = [ROOT / "csrc" / "cuda" / f for f in args.files] or sorted(
        (ROOT / "csrc" / "cuda").glob("*.cu"))
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda s: compile_one(s, args.arch, Path(tmp)), srcs))
        head = f"{'file':<18} {'kernel':<24} {'mode':<5} {'regs':>4} {'spill st':>8} " \
               f"{'spill ld':>8} {'stack':>5}"
        extra = ["instr", "HMMA", "LDG", "LDG.128", "LDL/STL"]
        columns = "".join(f" {e:>8}" for e in extra) if args.sass else ""
        print(f"sm_{args.arch}\n" + head + columns)
        for src, (log, obj) in zip(srcs, results):
            sass = sass_counts(obj) if args.sass else {}
            for kernel, mode, regs, st, ld, stack, name in ptxas_rows(log):
                line = f"{src.name:<18} {kernel:<24} {mode:<5} {regs:>4} {st:>8} {ld:>8} {stack:>5}"
                if args.sass:
                    c = sass.get(name, {})
                    line += "".join(f" {c.get(e, 0):>8}" for e in extra)
                print(line)


if __name__ == "__main__":
    main()
