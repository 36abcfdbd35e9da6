"""Shared test fixtures: which backends to test, on which device, and the tolerance check.

Backends under test: every compiled backend usable here (``cpu``; ``cuda`` and ``triton`` when a
GPU is present), or exactly the comma-separated list in ``FACTORCL_TEST_BACKENDS`` (how the
Triton interpreter run selects ``triton`` on CPU tensors, in its own process).
"""

from __future__ import annotations

import os
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


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, but reproducible from the test id when one fails.
    # zlib.crc32, not hash(): str hashes are salted per process (PYTHONHASHSEED).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error of the whole tensor: ||actual - expected|| / ||expected|| (float64)."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    denom = e.norm().item()
    num = (a - e).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_rel_close(actual, expected, tol: float, name: str = "tensor") -> None:
    """DESIGN.md section 6 tolerance check, with the worst element in the message."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = rel_error(actual, expected)
    if not err <= tol:  # also catches NaN
        diff = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs()
        idx = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {tol:.1e}; worst element at flat index {idx}: "
            f"{actual.reshape(-1)[idx].item()!r} vs {expected.reshape(-1)[idx].item()!r}"
        )
