"""Measurement helpers shared by the demo and the benchmark scripts: median wall time, peak extra
resident memory of a call, the FLOP count of DESIGN.md, and a matmul rate to compare against."""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from typing import Callable, Optional

import torch


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_heap() -> None:
    """Hand the C heap's free pages back to the kernel (glibc ``malloc_trim``), so that memory an
    earlier call freed but the allocator kept resident is faulted in again, and counted, when a
    measured call reuses it. Elsewhere (no glibc) a no-op."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current resident size (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_extra_rss_bytes(fn: Callable[[], object],
                         before: Optional[Callable[[], object]] = None) -> Optional[int]:
    """Peak resident memory of ``fn()`` above the resident memory before it (Linux): the heap's
    free pages are released, VmHWM is reset to the current RSS through /proc/self/clear_refs, then
    read after the call. ``before()`` runs first, to drop what an earlier call left resident and
    ``fn`` replaces (a training step's gradients: resident in the baseline, the step's own would
    not count). None where that cannot be done (not Linux, or a sandbox that does not let a
    process write its clear_refs); ``fn()`` runs either way."""
    if before is not None:
        before()
    gc.collect()
    _release_free_heap()
    try:
        _reset_peak_rss()
        before = _status_kib("VmRSS")
    except (OSError, RuntimeError):
        fn()
        return None
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


MEMORY_UNAVAILABLE = ("peak memory not measured: it needs Linux's /proc/self/clear_refs, which "
                      "this system does not let the process write")


def compile_every_case(limit: int = 256) -> None:
    """Let ``torch.compile`` compile every shape a benchmark run gives it. Dynamo compiles a
    function for at most ``recompile_limit`` (8) sets of guards and then runs it eagerly, with a
    warning only, which would time eager code under a ``compiled`` label (the 9th case of a run,
    each N, L, dtype and pass being a set). Raises the limit and makes reaching it an error."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def concat_critic_flops(n: int, m: int, hidden: int, layers: int, du: int, dv: int,
                        backward: bool = True) -> float:
    """Useful FLOPs of the concat critic (DESIGN.md section 2): per pair 2*L*H^2 forward, 6*L*H^2
    forward + backward, plus the first-layer products (2*(N*du + M*dv)*H forward, 3x that with
    backward). Element-wise work is not counted."""
    per_pair = (6 if backward else 2) * layers * hidden * hidden
    first = (6 if backward else 2) * (n * du + m * dv) * hidden
    return float(n) * m * per_pair + first


def separable_critic_flops(n: int, m: int, dim: int, backward: bool = True) -> float:
    """Useful FLOPs of the separable critic (DESIGN.md section 3): the N x M x D score product,
    2*N*M*D forward, 6*N*M*D with backward (dG and dH). Normalisation and the logsumexp (O(N*M)
    element-wise) are not counted."""
    return float(n) * m * dim * (6 if backward else 2)


def matmul_gflops(m: int = 4096, k: int = 512, n: int = 512, repeats: int = 7,
                  dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of torch.mm on an [m, k] x [k, n] product on the CPU (median of ``repeats``)."""
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    t = median_seconds(lambda: torch.mm(a, b), repeats=repeats, warmup=2)
    return 2.0 * m * k * n / t / 1e9
