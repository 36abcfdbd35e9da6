"""Build factorcl_ext: the fused C++ CPU kernels always, the CUDA kernels when a CUDA toolkit and a
CUDA build of torch are present (no GPU is needed to compile them).

Environment:
  FACTORCL_EXT_CUDA=0/1   force the CUDA extension off / on (default: on when it can be built)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0+PTX"; 9.0 also gets sm_90a)
  MAX_JOBS                parallel compile jobs (ninja)

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


def _want_cuda() -> bool:
    flag = os.environ.get("FACTORCL_EXT_CUDA")
    cuda_sources = glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
    possible = bool(torch.version.cuda) and CUDA_HOME is not None and bool(cuda_sources)
    if flag == "0":
        _log("FACTORCL_EXT_CUDA=0: building the CPU extension only")
        return False
    if flag == "1" and not possible:
        sys.exit(
            "factorcl-ext: FACTORCL_EXT_CUDA=1 but the CUDA extension cannot be built "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}, "
            f"{len(cuda_sources)} .cu sources)"
        )
    if not possible:
        why = []
        if not torch.version.cuda:
            why.append("torch is a CPU-only build")
        if CUDA_HOME is None:
            why.append("no CUDA toolkit found (set CUDA_HOME)")
        if not cuda_sources:
            why.append("no CUDA sources in csrc/cuda")
        _log("building the CPU extension only: " + "; ".join(why))
        return False
    return True


def _extensions():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # torch 2.14's headers need C++20; cpp_extension does not add -fopenmp, and without it
    # at::parallel_for silently runs serially.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG"]
    define_macros = []
    link_args = ["-fopenmp"]
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
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    if "9.0" in archs:
        # wgmma needs the arch-specific target.
        nvcc += ["-gencode=arch=compute_90a,code=sm_90a"]
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
    define_macros += [
        ("FACTORCL_EXT_WITH_CUDA", None),
        ("FACTORCL_EXT_CUDA_ARCHS", '"' + archs + '"'),
    ]
    _log(f"building the CPU and CUDA extension for archs {archs}")
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
