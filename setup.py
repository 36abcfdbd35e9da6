"""Build factorcl_ext: the fused C++ CPU kernels always, the CUDA kernels when a CUDA toolkit and a
CUDA build of torch are present (no GPU is needed to compile them).

Environment:
  FACTORCL_EXT_CUDA=0/1   force the CUDA extension off / on (default: on when it can be built)
  TORCH_CUDA_ARCH_LIST    CUDA architectures, 8.0 or newer (default "8.0;9.0+PTX": sm_80, sm_90
                          and its PTX; "9.0a" adds the sm_90a target)
  MAX_JOBS                parallel compile jobs (ninja); default: CPU count bounded by free memory

Install with `pip install --no-build-isolation .` so the build uses the torch already installed
(build isolation would fetch another torch and produce an ABI mismatch).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - message for users who skipped the torch install
    sys.exit(
        "factorcl-ext: torch must be installed before building, and the build must see it:\n"
        "  pip install -r requirements.txt && pip install --no-build-isolation ."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"factorcl-ext: {msg}", file=sys.stderr)


def _nvcc_problem() -> str | None:
    """Why CUDA_HOME's nvcc cannot build for this torch (None when it can): it is missing (a
    runtime-only CUDA install), does not run, or is of another major CUDA version than torch's
    (which torch's build refuses only after the CPU sources have compiled)."""
    import re
    import subprocess

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return f"CUDA_HOME={CUDA_HOME} has no bin/nvcc (a runtime-only CUDA install?)"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{nvcc} does not run ({exc})"
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found is None:
        return f"{nvcc} --version names no CUDA release"
    if found.group(1) != torch.version.cuda.split(".")[0]:
        return (f"{nvcc} is CUDA {found.group(1)}.{found.group(2)}, torch was built with CUDA "
                f"{torch.version.cuda} (the major versions must match)")
    return None


def _want_cuda() -> bool:
    flag = os.environ.get("FACTORCL_EXT_CUDA")
    cuda_sources = glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
    if flag not in (None, "", "0", "1"):
        sys.exit(f"factorcl-ext: FACTORCL_EXT_CUDA={flag!r}: expected 0 (off) or 1 (on)")
    if flag == "0":
        _log("FACTORCL_EXT_CUDA=0: building the CPU extension only")
        return False
    why = []
    if not torch.version.cuda:
        why.append("torch is a CPU-only build")
    if CUDA_HOME is None:
        why.append("no CUDA toolkit found (set CUDA_HOME)")
    elif torch.version.cuda and (problem := _nvcc_problem()):
        why.append(problem)
    if not cuda_sources:
        why.append("no CUDA sources in csrc/cuda")
    if why and flag == "1":
        sys.exit("factorcl-ext: FACTORCL_EXT_CUDA=1 but the CUDA extension cannot be built: "
                 + "; ".join(why))
    if why:
        _log("building the CPU extension only: " + "; ".join(why)
             + " (FACTORCL_EXT_CUDA=1 makes this an error)")
        return False
    return True


# wgmma (and other sm_90a-only instructions) need the arch-specific sm_90a target. No kernel uses
# them yet, and an sm_90a copy of the same code only lengthens the build, so 9.0 does not add it;
# set this when a kernel gains an sm_90a path (or list "9.0a" in TORCH_CUDA_ARCH_LIST).
_SM90A_KERNELS = False


def _available_memory_gb() -> float | None:
    """Memory available to new processes: MemAvailable (free memory plus the file cache the
    kernel can reclaim; MemFree alone drops to a few GB on a machine that has been reading
    files), else the free pages where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _default_max_jobs() -> None:
    """Bound parallel nvcc jobs by memory (each takes ~2 GB with the torch headers) unless the
    user set MAX_JOBS, which torch's ninja build honours."""
    if os.environ.get("MAX_JOBS"):
        return
    mem_gb = _available_memory_gb()
    if mem_gb is None:
        return
    jobs = max(1, min(os.cpu_count() or 1, int(mem_gb // 2)))
    os.environ["MAX_JOBS"] = str(jobs)


def _gencode_flags(archs: str) -> list[str]:
    """nvcc -gencode flags for a TORCH_CUDA_ARCH_LIST value ("8.0;9.0+PTX", "8.6 9.0a", ...).

    Written out here because torch's cpp_extension drops its own arch flags as soon as any
    -gencode appears in extra_compile_args, which the sm_90a target needs.
    """
    flags = []
    for item in archs.replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        name = item[: -len("+PTX")] if ptx else item
        suffix = "a" if name.endswith("a") else ""
        try:
            major, minor = name.rstrip("a").split(".")
            num = int(major) * 10 + int(minor)
        except ValueError:
            sys.exit(f"factorcl-ext: cannot parse CUDA arch {item!r} in "
                     f"TORCH_CUDA_ARCH_LIST={archs!r} (use numbers such as 8.0;9.0+PTX)")
        if num < 80:
            sys.exit(f"factorcl-ext: CUDA arch {item} is not supported: the kernels use bfloat16 "
                     "tensor cores, which need compute capability 8.0 or newer")
        code = f"{num}{suffix}"
        flags.append(f"-gencode=arch=compute_{code},code=sm_{code}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{code},code=compute_{code}")
        if num == 90 and not suffix and _SM90A_KERNELS:
            flags.append("-gencode=arch=compute_90a,code=sm_90a")
    if not flags:
        sys.exit(f"factorcl-ext: TORCH_CUDA_ARCH_LIST={archs!r} names no CUDA arch")
    return sorted(set(flags), key=flags.index)


def _libstdcxx_link_args() -> list:
    """Link libstdc++ dynamically even where its development symlink (libstdc++.so) is missing.

    There g++ resolves -lstdc++ to libstdc++.a and silently copies the C++ runtime into _C.so; a
    second copy of the iostreams beside the process's libstdc++.so.6 crashed (SIGSEGV in
    ostream::_M_insert<long>, formatting a TORCH_CHECK message) on the GPU machine's toolchain,
    whose build of _C.so had no NEEDED libstdc++ entry. Naming the runtime library itself
    resolves every C++ runtime symbol before g++'s trailing -lstdc++ is reached.
    """
    import shutil
    import subprocess

    cxx = shutil.which((os.environ.get("CXX") or "c++").split()[0])
    if cxx is None:
        return []

    def find(name):
        try:
            out = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return out if os.path.isabs(out) and os.path.exists(out) else None

    if find("libstdc++.so") or not find("libstdc++.so.6"):
        return []
    _log("libstdc++.so (the development symlink) is missing: linking libstdc++.so.6 by name "
         "so that the C++ runtime is not linked statically into the extension")
    return ["-l:libstdc++.so.6"]


# Host C++ flags of the extension. torch 2.14's headers need C++20; cpp_extension does not add
# -fopenmp, and without it at::parallel_for silently runs serially. -fno-trapping-math lets GCC
# turn the kernels' relu selects (h <= 0 ? 0 : g * w) into vector blends on AVX2: with trapping
# math it keeps the product behind a branch, and the `omp simd` loops stay scalar with a
# mispredicted branch per element (the L = 0 critic's backward ran 17x slower on an AVX2 machine;
# AVX-512 masks hid it). It changes no result: no reassociation, NaN and Inf as before.
# benchmarks/cpu_vectorize_check.py (run by tests/test_cpu_codegen.py) reads this list.
CPU_CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG", "-fno-trapping-math"]


def _extensions():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = list(CPU_CXX_FLAGS)
    define_macros = []
    link_args = ["-fopenmp"] + _libstdcxx_link_args()
    if not _want_cuda():
        return [
            CppExtension(
                "factorcl_ext._C",
                sources,
                extra_compile_args={"cxx": cxx},
                extra_link_args=link_args,
                define_macros=define_macros,
            )
        ]
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0+PTX"
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"] + _gencode_flags(archs)
    # cuBLAS headers of the pip CUDA runtime live in site-packages, not under CUDA_HOME.
    include_dirs = []
    try:
        import nvidia

        for base in nvidia.__path__:
            for sub in ("cu13/include", "cublas/include", "cuda_runtime/include"):
                path = os.path.join(base, sub)
                if os.path.isdir(path):
                    include_dirs.append(path)
    except ImportError:
        pass
    # What build_info() reports: the real targets, e.g. "sm_80;sm_90;compute_90;sm_90a".
    targets = ";".join(f.rsplit("code=", 1)[1] for f in nvcc if f.startswith("-gencode="))
    define_macros += [
        ("FACTORCL_EXT_WITH_CUDA", None),
        ("FACTORCL_EXT_CUDA_ARCHS", '"' + targets + '"'),
    ]
    # aten::mm / addmm with out_dtype (float32 results of 16-bit cuBLAS products), used by the
    # separable critic's backward where this torch has them
    if all("dtype" in op.overloads() for op in (torch.ops.aten.mm, torch.ops.aten.addmm)):
        define_macros.append(("FACTORCL_EXT_MM_OUT_DTYPE", None))
    _default_max_jobs()
    _log(f"building the CPU and CUDA extension for {targets} "
         f"(TORCH_CUDA_ARCH_LIST={archs!r}, MAX_JOBS={os.environ.get('MAX_JOBS')})")
    return [
        CUDAExtension(
            "factorcl_ext._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link_args,
            define_macros=define_macros,
        )
    ]


setup(
    packages=find_packages(include=["factorcl_ext", "factorcl_ext.*"])
    + find_packages("python", include=["factorcl", "factorcl.*"]),
    package_dir={"factorcl_ext": "factorcl_ext", "factorcl": "python/factorcl"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
