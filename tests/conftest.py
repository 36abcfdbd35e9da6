"""Shared test fixtures: which backends to test, on which device, and the tolerance check.

Backends under test: every compiled backend usable here (``cpu``; ``cuda`` and ``triton`` when a
GPU is present), or exactly the comma-separated list in ``FACTORCL_TEST_BACKENDS`` (how the
Triton interpreter run selects ``triton`` on CPU tensors, in its own process).
"""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

import factorcl_ext


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


def assert_rel_close(actual, expected, tol: float, name: str = "tensor", floor: float = 0.0) -> None:
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
