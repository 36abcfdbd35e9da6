"""CPU benchmark cases shared by the pytest-benchmark suite and the table script.

Every case is one forward + backward of a critic loss on random float32 inputs drawn once when
the step is made (every call of a step reuses them), with the same parameters for every
implementation:

- ``fused``: the drop-in module on the fused CPU kernels (training fast path, pair_mlp_loss),
- ``fused_stats``: concat_critic_stats + the InfoNCE bound (general op, recomputing backward),
- ``authors``: the authors' tiling formulation (tile, concatenate, run the MLP on every pair),
- ``reference``: factorcl_ext.reference (materialising, split first layer),
- ``compiled``: torch.compile of the authors' formulation,
- ``fused_compiled``: torch.compile of the drop-in module (the custom ops traced into one graph).

The separable critic (SimCLR / CLIP InfoNCE on L2-normalised embeddings, temperature 0.1) has its
own implementations (SEPARABLE_IMPLS):

- ``fused``: ``FusedSeparableCritic.infonce_lower_bound`` (the fused loss op),
- ``fused_stats``: separable_critic_stats + the InfoNCE bound (recomputing backward),
- ``user``: what a user writes: normalise, ``g @ h.T / tau``, ``F.cross_entropy`` (materialises
  the N x M logits),
- ``compiled``: torch.compile of ``user``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import factorcl_ext
from factorcl_ext import reference
from factorcl_ext.measure import compile_every_case
from factorcl_ext.nn import FusedSeparableCritic, InfoNCECritic

IMPLS = ("fused", "fused_stats", "fused_compiled", "authors", "reference", "compiled")
SEPARABLE_IMPLS = ("fused", "fused_stats", "user", "compiled")
TEMPERATURE = 0.1  # the separable critic's


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    dim: int
    hidden: int
    layers: int

    @property
    def label(self) -> str:
        return f"{self.name} N={self.n} {self.shape}"

    @property
    def shape(self) -> str:
        if self.name == "separable":
            return f"D={self.dim} tau={TEMPERATURE}"
        return f"d={self.dim} H={self.hidden} L={self.layers}"


def factorcl_cases(ns=(64, 128, 256, 512)) -> list[Case]:
    """The FactorCL critic: d = 128, H = 512, L = 1."""
    return [Case("factorcl", n, 128, 512, 1) for n in ns]


def mi_cases(ns=(128, 256, 512, 1024)) -> list[Case]:
    """The MI-estimation critic: d = 20, H = 512, L = 0."""
    return [Case("mi", n, 20, 512, 0) for n in ns]


def separable_cases(ns=(1024, 2048, 4096, 8192)) -> list[Case]:
    """The separable critic: D = 128, normalised, temperature 0.1 (no hidden layers)."""
    return [Case("separable", n, 128, 0, 0) for n in ns]


def host_overhead_case() -> Case:
    """N = d = H = 8, L = 1: the arithmetic is negligible, so a call's time is host time (Python
    and dispatch); measured for every implementation (IMPLS)."""
    return Case("tiny", 8, 8, 8, 1)


_COMPILED = {}


def user_separable_infonce_loss(g, h):
    """The negative InfoNCE bound of the separable critic as a user writes it (SimCLR / CLIP
    style): cross-entropy of the materialised logits against the diagonal, minus log N."""
    logits = F.normalize(g, dim=1) @ F.normalize(h, dim=1).t() / TEMPERATURE
    n = logits.shape[0]
    return F.cross_entropy(logits, torch.arange(n)) - math.log(n)


def make_step(case: Case, impl: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A zero-argument callable that runs forward + backward once and returns the loss (the
    negative InfoNCE bound, the same quantity for every implementation of a case)."""
    torch.manual_seed(seed)
    if "compiled" in impl:
        compile_every_case()
    if case.name == "separable":
        return _separable_step(case, impl, dtype)
    critic = InfoNCECritic(case.dim, case.dim, case.hidden, case.layers, "relu", backend="cpu")
    critic.to(dtype)
    x = torch.randn(case.n, case.dim, dtype=dtype, requires_grad=True)
    y = torch.randn(case.n, case.dim, dtype=dtype, requires_grad=True)
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

    return _step(loss, [x, y, *critic.parameters()])


def _separable_step(case: Case, impl: str, dtype: torch.dtype):
    g = torch.randn(case.n, case.dim, dtype=dtype, requires_grad=True)
    h = torch.randn(case.n, case.dim, dtype=dtype, requires_grad=True)
    critic = FusedSeparableCritic(TEMPERATURE, normalize=True, backend="cpu")
    if impl == "fused":
        def loss():
            return -critic.infonce_lower_bound(g, h)
    elif impl == "fused_stats":
        def loss():
            st = factorcl_ext.separable_critic_stats(g, h, temperature=TEMPERATURE,
                                                     normalize=True, backend="cpu")
            return -factorcl_ext.infonce_lower_bound(st.lse, st.pos, case.n)
    elif impl == "user":
        def loss():
            return user_separable_infonce_loss(g, h)
    elif impl == "compiled":
        compiled = torch.compile(user_separable_infonce_loss, dynamic=False)

        def loss():
            return compiled(g, h)
    else:
        raise ValueError(f"unknown impl {impl!r} for the separable critic; choose from "
                         f"{SEPARABLE_IMPLS}")
    return _step(loss, [g, h])


def _step(loss, leaves):
    """Forward + backward of ``loss()`` with the leaves' gradients cleared first."""
    def step():
        clear_grads()
        out = loss()
        out.backward()
        return out

    def clear_grads():
        for p in leaves:
            p.grad = None

    step.leaves = leaves  # for the test that every implementation computes the same gradients
    step.clear_grads = clear_grads  # before a memory measurement: the step's own gradients count
    return step
