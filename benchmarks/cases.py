"""CPU benchmark cases shared by the pytest-benchmark suite and the table script.

Every case is one forward + backward of a critic loss on fresh random float32 inputs, with the
same parameters for every implementation:

- ``fused``: the drop-in module on the fused CPU kernels (training fast path, pair_mlp_loss),
- ``fused_stats``: concat_critic_stats + the InfoNCE bound (general op, recomputing backward),
- ``authors``: the authors' tiling formulation (tile, concatenate, run the MLP on every pair),
- ``reference``: factorcl_ext.reference (materialising, split first layer),
- ``compiled``: torch.compile of the authors' formulation,
- ``fused_compiled``: torch.compile of the drop-in module (the custom ops traced into one graph).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import factorcl_ext
from factorcl_ext import reference
from factorcl_ext.nn import InfoNCECritic

IMPLS = ("fused", "fused_stats", "fused_compiled", "authors", "reference", "compiled")


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    dim: int
    hidden: int
    layers: int

    @property
    def label(self) -> str:
        return f"{self.name} N={self.n} d={self.dim} H={self.hidden} L={self.layers}"


def factorcl_cases(ns=(64, 128, 256, 512)) -> list[Case]:
    """The FactorCL critic: d = 128, H = 512, L = 1."""
    return [Case("factorcl", n, 128, 512, 1) for n in ns]


def mi_cases(ns=(128, 256, 512, 1024)) -> list[Case]:
    """The MI-estimation critic: d = 20, H = 512, L = 0."""
    return [Case("mi", n, 20, 512, 0) for n in ns]


def host_overhead_case() -> Case:
    """N = d = H = 8, L = 1: the arithmetic is negligible, so a call's time is host time (Python
    and dispatch); measured for every implementation (IMPLS)."""
    return Case("tiny", 8, 8, 8, 1)


_COMPILED = {}


def make_step(case: Case, impl: str, seed: int = 0):
    """A zero-argument callable that runs forward + backward once and returns the loss."""
    torch.manual_seed(seed)
    critic = InfoNCECritic(case.dim, case.dim, case.hidden, case.layers, "relu", backend="cpu")
    x = torch.randn(case.n, case.dim, requires_grad=True)
    y = torch.randn(case.n, case.dim, requires_grad=True)
    f = critic._f

    if impl == "fused":
        def loss():
            return critic(x, y)
    elif impl == "fused_stats":
        def loss():
            d = case.dim
            lin = [m for m in f if isinstance(m, torch.nn.Linear)]
            w0 = lin[0].weight
            st = factorcl_ext.concat_critic_stats(
                y, x, w0[:, d:], w0[:, :d], lin[0].bias, [m.weight for m in lin[1:-1]],
                [m.bias for m in lin[1:-1]], lin[-1].weight.reshape(-1), lin[-1].bias,
                backend="cpu",
            )
            return -factorcl_ext.infonce_lower_bound(st.lse, st.pos, case.n)
    elif impl == "authors":
        def loss():
            return reference.tiled_infonce_loss(f, x, y)
    elif impl == "reference":
        def loss():
            d = case.dim
            lin = [m for m in f if isinstance(m, torch.nn.Linear)]
            w0 = lin[0].weight
            st = reference.concat_critic_stats(
                y, x, w0[:, d:], w0[:, :d], lin[0].bias, [m.weight for m in lin[1:-1]],
                [m.bias for m in lin[1:-1]], lin[-1].weight.reshape(-1), lin[-1].bias,
            )
            return -(st[1].mean() - st[0].mean() + math.log(case.n))
    elif impl == "compiled":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(reference.tiled_infonce_loss, dynamic=False)
        compiled = _COMPILED["fn"]

        def loss():
            return compiled(f, x, y)
    elif impl == "fused_compiled":
        compiled_critic = torch.compile(critic, dynamic=False)

        def loss():
            return compiled_critic(x, y)
    else:
        raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")

    params = list(critic.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = y.grad = None
        out = loss()
        out.backward()
        return out

    return step
