"""benchmarks/cases.py: every implementation the CPU benchmarks time computes the same loss and
the same gradients (float64, odd sizes), so a table's ratios compare equal work."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_rel_close, infonce_floor, load_benchmark

cases = load_benchmark("cases")

# (case, implementations, baseline); the torch.compile variants are left out (compile time)
FAMILIES = {
    "factorcl": (cases.Case("factorcl", 9, 5, 7, 1), ["fused", "fused_stats", "authors",
                                                      "reference"], "authors"),
    "mi": (cases.Case("mi", 11, 3, 6, 0), ["fused", "fused_stats", "reference"], "reference"),
    "separable": (cases.Case("separable", 13, 5, 0, 0), ["fused", "fused_stats", "user"],
                  "user"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_benchmark_implementations_agree(family):
    case, impls, baseline = FAMILIES[family]
    results = {}
    for impl in impls:
        step = cases.make_step(case, impl, seed=3, dtype=torch.float64)
        loss = step()
        results[impl] = (loss.detach(), [p.grad.clone() for p in step.leaves])
    ref_loss, ref_grads = results[baseline]
    assert all(g.abs().max() > 0 for g in ref_grads[:2]), "input gradients vanish: a weak test"
    for impl in impls:
        loss, grads = results[impl]
        assert_rel_close(loss, ref_loss, 1e-10, f"{family} {impl} loss")
        assert len(grads) == len(ref_grads)
        scale = min(g.norm().item() for g in ref_grads[:2])  # d/d b_out is 0 in exact arithmetic
        for i, (a, e) in enumerate(zip(grads, ref_grads)):
            assert_rel_close(a, e, 1e-10, f"{family} {impl} grad {i}", floor=scale)


def test_separable_baseline_is_the_user_cross_entropy():
    """``user`` is the SimCLR / CLIP loss (cross-entropy over normalised logits) minus log N,
    i.e. the negative InfoNCE bound; checked against an explicit log-softmax."""
    g, h = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    gn, hn = g / g.norm(dim=1, keepdim=True), h / h.norm(dim=1, keepdim=True)
    s = gn @ hn.t() / cases.TEMPERATURE
    expected = -(s.diagonal() - s.logsumexp(1)).mean() - math.log(7)
    assert_rel_close(cases.user_separable_infonce_loss(g, h), expected, 1e-12, "user loss",
                     infonce_floor(s.logsumexp(1), s.diagonal(), 7))


def test_unknown_implementation_is_named():
    for case in (cases.Case("factorcl", 4, 3, 5, 1), cases.Case("separable", 4, 3, 0, 0)):
        with pytest.raises(ValueError, match="unknown impl 'nope'"):
            cases.make_step(case, "nope")


def test_compiled_cases_never_fall_back_to_eager_silently():
    """The ``compiled`` rows of a run share one function (one dynamo cache): past dynamo's limit
    of 8 compiles it would run eagerly with only a warning. make_step raises the limit and makes
    reaching it an error (config restored after the test)."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=False):
        cases.make_step(cases.Case("separable", 4, 3, 0, 0), "compiled")  # compiles lazily
        assert torch._dynamo.config.recompile_limit >= 64
        assert torch._dynamo.config.fail_on_recompile_limit_hit
