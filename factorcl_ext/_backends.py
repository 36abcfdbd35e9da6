"""Which backends exist in this install, and which one a call runs on.

Backends of every op (DESIGN.md section 5): ``reference`` (materialising PyTorch), ``cpu`` (fused
C++), ``triton`` (GPU; CPU tensors too under ``TRITON_INTERPRET=1``), ``cuda`` (hand-written CUDA).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import Optional

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

_REBUILD = "pip install --no-build-isolation -e .   (from the factorcl-ext source tree)"

_C = None
_C_ERROR: Optional[BaseException] = None
try:
    # loading it registers the torch.ops.factorcl ops
    _C = importlib.import_module("factorcl_ext._C")
except ImportError as exc:  # only when the extension was not built, or does not load
    _C_ERROR = exc
    # said once, at import: backend="auto" now runs the materialising reference on CPU tensors
    # (N x M x H memory) and the CUDA kernels are absent, which no call would otherwise show
    warnings.warn(
        f"factorcl_ext: the compiled extension did not load ({exc}); backend='auto' falls back "
        f"to the materialising 'reference' on CPU tensors and 'cpu' / 'cuda' are unavailable. "
        f"Imported from {os.path.dirname(os.path.abspath(__file__))}; build it with:\n"
        f"  {_REBUILD}",
        RuntimeWarning,
        stacklevel=2,
    )


def compiled_module():
    """The compiled extension module, or a RuntimeError that says how to build it."""
    if _C is None:
        raise RuntimeError(
            f"factorcl_ext's compiled extension is not available ({_C_ERROR}); rebuild it with:\n"
            f"  {_REBUILD}"
        )
    return _C


def has_cpu_kernels() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", 0))


# Boolean environment values, as Triton reads its own (TRITON_INTERPRET: any case), plus the
# usual spellings of false.
_ENV_TRUE = ("1", "true", "yes", "on", "y")
_ENV_FALSE = ("0", "false", "no", "off", "n")


def env_flag(name: str, default: bool) -> bool:
    """The boolean environment variable ``name``: ``default`` when unset or empty; a ValueError
    naming it for a value that is neither true (1, true, yes, on) nor false (0, false, no, off)."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in _ENV_TRUE or value in _ENV_FALSE:
        return value in _ENV_TRUE
    raise ValueError(f"{name}={raw!r}: expected 1 or 0 (or true/false, yes/no, on/off)")


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter: TRITON_INTERPRET as Triton reads it
    (1, true, yes, on, y in any case; anything else is off), so that the two agree."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _ENV_TRUE


# Looked up once at import: torch.compile (dynamo) cannot trace an import inside a traced call.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def has_triton() -> bool:
    return _HAS_TRITON


def available_backends() -> list[str]:
    """Backends usable in this process (not counting ``auto``)."""
    found = ["reference"]
    if has_cpu_kernels():
        found.append("cpu")
    gpu = torch.cuda.is_available()
    if has_triton() and (gpu or triton_interpreted()):
        found.append("triton")
    if has_cuda_kernels() and gpu:
        found.append("cuda")
    return found


def check_name(backend: str) -> None:
    """ValueError unless ``backend`` is one of :data:`BACKENDS` (whether it can run is decided
    by :func:`resolve`, from the tensors' device)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``; ValueError when it cannot run there."""
    check_name(backend)
    if backend == "auto":
        if device.type == "cuda":
            if has_cuda_kernels():
                return "cuda"
            if has_triton():
                return "triton"
            return "reference"
        if device.type == "cpu" and has_cpu_kernels():
            return "cpu"
        return "reference"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        compiled_module()
    elif backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not has_cuda_kernels():
            raise RuntimeError(
                "backend='cuda': this build of factorcl_ext has no CUDA kernels "
                f"(factorcl_ext.build_info() = {build_info()}); rebuild on a machine with nvcc "
                f"and a CUDA build of torch: FACTORCL_EXT_CUDA=1 {_REBUILD}"
            )
    elif backend == "triton":
        if not has_triton():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                f"got tensors on {device}"
            )
    return backend


def build_info() -> dict:
    """What this install compiled: kernels, CUDA archs, OpenMP, and the usable backends."""
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_kernels": has_cpu_kernels(),
        "cuda_kernels": has_cuda_kernels(),
        "cuda_archs": (getattr(_C, "cuda_archs", "") or None) if _C is not None else None,
        "openmp": bool(getattr(_C, "with_openmp", 0)) if _C is not None else False,
        "triton": has_triton(),
        "available_backends": available_backends(),
    }
    if _C_ERROR is not None:
        info["extension_error"] = str(_C_ERROR)
    return info
