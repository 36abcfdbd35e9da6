"""Shared test fixtures: which backends to test, on which device, and the tolerance check.

Backends under test: every compiled backend usable here (``cpu``; ``cuda`` and ``triton`` when a
GPU is present), or exactly the comma-separated list in ``FACTORCL_TEST_BACKENDS`` (how the
Triton interpreter run selects ``triton`` on CPU tensors, in its own process).
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import sys
import zlib
from pathlib import Path

import pytest
import torch

import factorcl_ext


def load_benchmark(name: str):
    """benchmarks/<name>.py as a fresh module (the benchmarks are scripts, not a package),
    registered in sys.modules as ``benchmark_<name>`` (dataclasses look their module up there)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _backends_under_test() -> list[str]:
    env = os.environ.get("FACTORCL_TEST_BACKENDS")
    if env:
        return [b.strip() for b in env.split(",") if b.strip()]
    return [b for b in factorcl_ext.available_backends() if b != "reference"]


BACKENDS = _backends_under_test()


def device_for(backend: str) -> torch.device:
    if backend in ("cuda", "triton") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def device(backend) -> torch.device:
    return device_for(backend)


# Fresh random inputs every run; a failure is reproduced with FACTORCL_TEST_SEED=<the seed printed
# in the pytest header>.
SESSION_SEED = int(os.environ.get("FACTORCL_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"factorcl-ext: FACTORCL_TEST_SEED={SESSION_SEED}, backends under test: {BACKENDS}"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    yield


def rel_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """Relative error of the whole tensor: ||actual - expected|| / max(||expected||, floor).

    ``floor`` is for quantities that are zero in exact arithmetic (the output bias's gradient
    under InfoNCE, say), where both sides are rounding noise; give it the scale of the
    neighbouring quantities, never more.
    """
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    denom = max(e.norm().item(), floor)
    num = (a - e).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def stats_floor(stat: torch.Tensor) -> float:
    """Denominator floor for a statistic's relative error: the norm it would have if every entry
    were 1, the scale of the scores the low-precision tests' inputs give. A score's rounding error
    scales with its terms (sum_n |w_out[n] h_L[n]|, O(1) there), not with its value, so a statistic
    that is small by cancellation has a large relative error in every implementation: with one
    pair (N = M = 1, H = 16, L = 2, tanh, bf16) the CUDA kernel's lse was 0.2535 against 0.2403 on
    an H100 (5.5e-2 relative, 1.3e-2 absolute) while the bf16 reference happened to land at
    0.2402; in the CPU emulation, 200 seeds of that case spread the kernel's relative error to
    0.37 and the bf16 reference's to 0.42 (scores near 0), and 1 seed failed the rule without
    this floor."""
    return stat.numel() ** 0.5


def signed_sum_floor(*terms) -> float:
    """Denominator floor for a value that is a signed sum (an MI bound mean(pos) - mean(lse) +
    log M, a fused loss, a directional derivative sum g * t): the size of its terms, the sum of
    their absolute values. Each term is a tensor, whose elements are summands, or a number. Such a
    value can be ~0 by cancellation while each term carries its own rounding, so its relative error
    is unbounded in every implementation: a float64 InfoNCE loss of -5.76e-5 was 3.9e-12 off
    relative, 2.2e-16 absolute, against a 1e-12 bar (CI, 2026-12-06); over 1500 seeds of that test
    the worst was 2.8e-11, and 8.9e-16 with this floor."""
    return sum(t.detach().double().abs().sum().item() if torch.is_tensor(t) else abs(float(t))
               for t in terms)


def infonce_floor(lse, pos, m) -> float:
    """signed_sum_floor of I_NCE = mean(pos) - mean(lse) + log m, from its statistics."""
    n = pos.numel()
    return signed_sum_floor(pos.detach().double() / n, lse.detach().double() / n, math.log(m))


def club_floor(pos, rowsum, m) -> float:
    """signed_sum_floor of I_CLUB = mean(pos) - sum(rowsum) / (n m), from its statistics."""
    n = pos.numel()
    return signed_sum_floor(pos.detach().double() / n, rowsum.detach().double() / (n * m))


def loss_floor(coefs, stats) -> float:
    """Denominator floor for a fused loss's relative error: the size of its terms,
    sum_k |c_k| ||stat_k||_1 (signed_sum_floor; c_pos < 0): a bf16 loss was 2.03e-2 off against
    the 2e-2 tolerance (CUDA kernels in CPU emulation, 2026-12-05), with every statistic within
    its own."""
    return signed_sum_floor(*(c * s.detach().double() for c, s in zip(coefs, stats)))


def temperature_floor(g, h, temperature, objective, *, normalize: bool = False,
                      pos_offset=0, exclude_offset=None) -> float:
    """Denominator floor for the separable critic's temperature gradient: the size of its terms.
    d objective / d tau = -(1/tau) sum_(i,d) G_id dG_id with G = g^ / tau (g^ = g, or g
    normalised), so it is a signed sum of N*D terms and can be small by cancellation while each
    term carries its own rounding: float32 CPU dtemperature was 1.26e-5 off against 1e-5 (ci-local,
    2026-12-05), and on 400 seeds of one float32 case the materialising float32 reference's own
    error reached 1.3e-4 when the sum was 1 % of its terms. Returns (1/|tau|) sum |G dG| in
    float64 from ``reference.pair_dot_stats``; ``objective`` maps its (lse, pos, rowsum) to the
    scalar whose gradient is checked."""
    from factorcl_ext import reference

    tau = float(temperature)
    g, h = g.detach().double(), h.detach().double()
    if normalize:
        g, h = torch.nn.functional.normalize(g, dim=1), torch.nn.functional.normalize(h, dim=1)
    G = (g / tau).requires_grad_()
    (dG,) = torch.autograd.grad(objective(reference.pair_dot_stats(G, h, pos_offset,
                                                                   exclude_offset)), G)
    return (G * dG).abs().sum().item() / abs(tau)


def assert_rel_close(actual, expected, tol: float, name: str = "tensor",
                     floor: float = 0.0) -> None:
    """DESIGN.md section 6 tolerance check, with the worst element in the message."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = rel_error(actual, expected, floor)
    if not err <= tol:  # also catches NaN
        diff = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs()
        idx = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {tol:.1e}; worst element at flat index {idx}: "
            f"{actual.reshape(-1)[idx].item()!r} vs {expected.reshape(-1)[idx].item()!r}"
        )
