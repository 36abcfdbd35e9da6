"""pytest-benchmark suite of the CPU critics (forward + backward, float32).

    python -m pytest benchmarks/test_cpu_critics.py --benchmark-columns=median,iqr,rounds
"""

import time

import pytest

from cases import (
    IMPLS,
    SEPARABLE_IMPLS,
    factorcl_cases,
    host_overhead_case,
    make_step,
    mi_cases,
    separable_cases,
)

FACTORCL = factorcl_cases()
MI = mi_cases()
SEPARABLE = separable_cases()


def _bench(benchmark, case, impl):
    step = make_step(case, impl)
    step()  # warm-up (and compilation, for torch.compile)
    t0 = time.perf_counter()
    step()
    rounds = 3 if time.perf_counter() - t0 > 0.2 else 7  # fewer rounds of the slow cases
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("impl", ["fused", "fused_stats", "authors", "compiled"])
@pytest.mark.parametrize("case", FACTORCL, ids=lambda c: f"N{c.n}")
def test_factorcl_critic(benchmark, case, impl):
    benchmark.group = case.label
    _bench(benchmark, case, impl)


@pytest.mark.parametrize("impl", ["fused", "reference", "compiled"])
@pytest.mark.parametrize("case", MI, ids=lambda c: f"N{c.n}")
def test_mi_critic(benchmark, case, impl):
    benchmark.group = case.label
    _bench(benchmark, case, impl)


@pytest.mark.parametrize("impl", SEPARABLE_IMPLS)
@pytest.mark.parametrize("case", SEPARABLE, ids=lambda c: f"N{c.n}")
def test_separable_critic(benchmark, case, impl):
    benchmark.group = case.label
    _bench(benchmark, case, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_host_overhead(benchmark, impl):
    """N = d = H = 8: the Python and dispatch time of one forward + backward (cpu_table.py
    --host-overhead interleaves the implementations, which a shared machine needs)."""
    case = host_overhead_case()
    benchmark.group = case.label
    step = make_step(case, impl)
    step()
    benchmark.pedantic(step, rounds=300, iterations=1, warmup_rounds=10)
