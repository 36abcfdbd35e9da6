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

import numpy as np
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


def pytest_configure(config):
    # Without the compiled extension every backend-parametrised test would be skipped and the
    # run would pass having tested no kernel (seen from a checkout whose package was installed
    # elsewhere); FACTORCL_TEST_BACKENDS names the backends explicitly where that is meant.
    info = factorcl_ext.build_info()
    if not os.environ.get("FACTORCL_TEST_BACKENDS") and not info["cpu_kernels"]:
        raise pytest.UsageError(
            "factorcl_ext's compiled extension is not available here "
            f"({info.get('extension_error')}; factorcl_ext imported from "
            f"{os.path.dirname(factorcl_ext.__file__)}): build it in this checkout with "
            "`pip install --no-build-isolation -e .`, or set FACTORCL_TEST_BACKENDS to run "
            "without it")


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
    seed = SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # the data tests' files: a failure replays from the seed too
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


# A float32 kernel and the float64 reference (on the same rounded inputs) give a relu unit of a
# hidden layer opposite signs where its pre-activation is within float32's rounding of 0 (about
# 1e-7 of the sum of its terms' magnitudes): each such pair is an O(1/M) step in the gradients
# (5.5e-5 to 2.8e-4 relative seen in a simulation at 150 x 203 x 97, L = 2, in 3 draws of 10).
# Comparing with a float32 reference does not help where such units are few: it flips other ones
# (with the fused CPU kernel standing in for a GPU kernel at 113 x 203 x 72, L = 1, the kernel's
# error passed twice the float32 reference's by 7 % in 1 draw of 300). The first layer's
# act(A + B) keeps its sign in any precision. float32 relu checks with hidden layers run on draws
# whose hidden pre-activations stay this far from 0 (a few draws at up to ~1e5 hidden
# pre-activations; hopeless far beyond, so such checks use a shape of that size).
RELU_MARGIN = 2e-6


def needs_relu_margin(dtype, activation, layers) -> bool:
    """Whether a check in ``dtype`` (IEEE float32 matmuls) of a pair MLP with ``activation`` and
    ``layers`` hidden layers needs RELU_MARGIN draws: float32 relu with a hidden layer."""
    return dtype == torch.float32 and activation == "relu" and layers > 0


def hidden_relu_margin(A, B, hidden_weights, hidden_biases, dtype) -> float:
    """The smallest |z| / sum|terms of z| over the hidden layers' pre-activations z = W h + b of
    every pair, in float64 on the inputs rounded to ``dtype`` (relu; inf without hidden layers)."""

    def rounded(t):
        return t.detach().to(dtype).to(torch.float64)

    h = torch.relu(rounded(A)[:, None, :] + rounded(B)[None, :, :])
    margin = math.inf
    for w, bias in zip(hidden_weights, hidden_biases):
        w, bias = rounded(w), rounded(bias)
        z = h @ w.T + bias
        terms = h @ w.abs().T + bias.abs()  # h >= 0
        margin = min(margin, (z.abs() / terms).min().item())
        h = torch.relu(z)
    return margin


def draw_with_relu_margin(draw, core, dtype, what: str):
    """``draw()`` again until the hidden relu pre-activations of ``core(drawn)`` (A, B, hidden
    weights, hidden biases), on the inputs rounded to ``dtype``, keep RELU_MARGIN of their terms
    from 0 (``dtype`` None: the first draw); ``what`` names the shape in the error."""
    for _ in range(100):
        drawn = draw()
        if dtype is None or hidden_relu_margin(*core(drawn), dtype) >= RELU_MARGIN:
            return drawn
    raise AssertionError(f"no draw in 100 kept the hidden relu inputs {RELU_MARGIN} from 0 at "
                         f"{what}: a smaller shape is needed")


def nonfinite_weight_core(N: int, M: int, H: int, L: int, where: str, bad: float) -> dict:
    """Concat-critic core inputs (float64, make_core's keys) with one non-finite weight, ``bad``
    at ``where`` ("w_out", or "hidden": the last hidden layer's weight), and a relu unit, UNIT,
    of the layer that weight reads (nonfinite_gated_layer) that is off for every pair of the batch
    but on for a row whose A is 0, the padding row of a kernel tile. The scores are then NaN, and
    the reference's relu backward (a select) keeps the NaN upstream gradient out of UNIT: its
    gradients are 0, not NaN. A product with the relu mask (0 * NaN), or a padding row's dz that
    is not zeroed (its 0 * NaN, with UNIT on), gives NaN. "hidden" needs L >= 1; H >= 4."""
    d = torch.float64
    A, B = torch.randn(N, H, dtype=d), torch.randn(M, H, dtype=d)
    Ws = [torch.randn(H, H, dtype=d) / H**0.5 for _ in range(L)]
    bs = [0.3 * torch.randn(H, dtype=d) for _ in range(L)]
    w_out = torch.randn(H, dtype=d) / H**0.5
    k, g = NONFINITE_UNIT, nonfinite_gated_layer(L, where)
    # unit 0 of layers 0..g: relu(10 - 1) = 9 in the batch, carried up unchanged, and 0 on a
    # padding row. It is on for every pair, so the NaN reaches dB[:, 0] on every draw (the
    # reference's NaN half of the pattern: a path through units that happen to be on could be
    # off for the whole batch)
    A[:, 0], B[:, 0] = 10.0, -1.0
    for W, b in zip(Ws[:g], bs[:g]):
        W[0], b[0] = 0.0, 0.0
        W[0, 0] = 1.0
    if g == 0:  # layer-0 unit k: A + B = -9 in the batch, 0 + 1 on a padding row
        A[:, k], B[:, k] = -10.0, 1.0
    else:  # layer-g unit k: -h_(g-1)[0] + 1
        Ws[g - 1][k], bs[g - 1][k] = 0.0, 1.0
        Ws[g - 1][k, 0] = -1.0
    if where == "hidden":
        Ws[-1][1, k] = bad  # into dh_(L-1)[:, k] of every pair, padding rows too
    else:
        w_out[k] = bad
    return {"A": A, "B": B, "hidden_weights": Ws, "hidden_biases": bs, "w_out": w_out,
            "b_out": 0.5 * torch.randn((), dtype=d)}


def nonfinite_gated_layer(L: int, where: str) -> int:
    """The layer (0: the first, A + B) whose unit NONFINITE_UNIT nonfinite_weight_core keeps off:
    its gradients there are 0 in the reference, dB[:, unit] for layer 0, else that row of
    hidden_weights[layer - 1]'s gradient."""
    return L if where == "w_out" else L - 1


NONFINITE_UNIT = 3  # the unit that nonfinite_weight_core keeps off


def assert_nonfinite_pattern_equal(actual, expected, name: str, tol: float = 1e-10) -> None:
    """Same NaN and Inf positions as ``expected``, and the finite part within ``tol``."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{name}: NaN pattern differs"
    assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{name}: Inf pattern differs"
    fin = torch.isfinite(e)
    if fin.any():
        assert_rel_close(a[fin], e[fin].to(a.dtype), tol, name + " (finite part)")
