"""Random combinations of every option of the public ops, against the float64 reference.

The parametrised suites vary one or two options at a time on fixed shapes; here each case draws
all of them at once (sizes no tile divides, N != M, L = 0..3, both activations and output
activations, pos_offset None or anywhere in range, exclude_offset, a float or tensor temperature,
normalisation, non-contiguous inputs, the stats op with random upstream gradients or the fused
loss with random coefficients), so that an option's interaction with another is checked too.
float64, values and the gradient of every tensor argument; the case's settings are in the
failure message, and FACTORCL_TEST_SEED (pytest header) replays the run.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import factorcl_ext as fx
from factorcl_ext import _backends

from conftest import assert_rel_close, loss_floor

F64 = torch.float64
TOL = 1e-10
# the interpreter runs a Triton program at a time in Python: fewer cases there
CASES = 8 if _backends.triton_interpreted() else 40


def _tensor(shape, scale, transposed, device):
    if transposed and len(shape) == 2:  # same values, column-major storage
        return (torch.randn(shape[::-1], dtype=F64) * scale).t().to(device)
    return (torch.randn(shape, dtype=F64) * scale).to(device)


def _draw_case(rng: random.Random):
    n = rng.randint(1, 37)
    m = n + rng.randint(0, 20) if rng.random() < 0.7 else rng.randint(1, 40)
    case = dict(kind=rng.choice(["concat", "separable"]), N=n, M=m,
                pos_offset=None if m < n or rng.random() < 0.2 else rng.randint(0, m - n),
                loss=rng.random() < 0.5, transposed=rng.random() < 0.3)
    if case["kind"] == "concat":
        case.update(du=rng.randint(1, 9), dv=rng.randint(1, 9), H=rng.randint(1, 70),
                    L=rng.randint(0, 3), activation=rng.choice(["relu", "tanh"]),
                    out_activation=rng.choice(["none", "softplus"]))
    else:
        exclude = None if m < n or m == 1 or rng.random() < 0.5 else rng.randint(0, m - n)
        # D >= 2: with D = 1 a normalised embedding is +-1 and its gradient is zero in exact
        # arithmetic, so a relative error would compare rounding noise with rounding noise
        case.update(D=rng.randint(2, 70), exclude_offset=exclude,
                    temperature=round(rng.uniform(0.05, 2.0), 3),
                    tensor_temperature=rng.random() < 0.5, normalize=rng.random() < 0.5)
    return case


def _inputs(case, device):
    """The op's positional tensors (hidden layers as lists) and keyword options."""
    t = case["transposed"]
    n, m = case["N"], case["M"]
    if case["kind"] == "concat":
        du, dv, h, L = case["du"], case["dv"], case["H"], case["L"]
        args = [_tensor((n, du), 1.0, t, device), _tensor((m, dv), 1.0, t, device),
                _tensor((h, du), 0.5, t, device), _tensor((h, dv), 0.5, t, device),
                _tensor((h,), 0.3, t, device),
                [_tensor((h, h), 1 / math.sqrt(h), t, device) for _ in range(L)],
                [_tensor((h,), 0.1, t, device) for _ in range(L)],
                _tensor((h,), 1 / math.sqrt(h), t, device), _tensor((), 1.0, t, device)]
        kw = dict(activation=case["activation"], out_activation=case["out_activation"],
                  pos_offset=case["pos_offset"])
    else:
        args = [_tensor((n, case["D"]), 1.0, t, device),
                _tensor((m, case["D"]), 1.0, t, device)]
        kw = dict(pos_offset=case["pos_offset"], exclude_offset=case["exclude_offset"],
                  normalize=case["normalize"], temperature=case["temperature"])
        if case["tensor_temperature"]:
            kw["temperature"] = torch.tensor(case["temperature"], dtype=F64, device=device)
    return args, kw


def _leaves(args, kw):
    """Fresh leaf copies that require grad, in a flat list, and the args/kw that use them."""
    flat = []

    def leaf(x):
        if isinstance(x, list):
            return [leaf(y) for y in x]
        y = x.detach().clone().requires_grad_(True)
        flat.append(y)
        return y

    args = [leaf(a) for a in args]
    kw = dict(kw)
    if isinstance(kw.get("temperature"), torch.Tensor):
        kw["temperature"] = leaf(kw["temperature"])
    return args, kw, flat


def _run(case, args, kw, backend, upstream, coefs):
    args, kw, flat = _leaves(args, kw)
    concat = case["kind"] == "concat"
    if case["loss"]:
        op = fx.concat_critic_loss if concat else fx.separable_critic_loss
        outs = [op(*args, **kw, **coefs, backend=backend)]
        outs[0].backward()
    else:
        op = fx.concat_critic_stats if concat else fx.separable_critic_stats
        outs = list(op(*args, **kw, backend=backend))
        sum((o * g).sum() for o, g in zip(outs, upstream)).backward()
    return outs, [x.grad for x in flat]


def test_random_configurations_match_reference(backend, device):
    rng = random.Random(torch.randint(0, 2**31, ()).item())  # from the test's fresh seed
    for k in range(CASES):
        case = _draw_case(rng)
        args, kw = _inputs(case, device)
        n = case["N"]
        upstream = [torch.randn(n, dtype=F64, device=device) for _ in range(3)]
        coefs = dict(c_lse=rng.uniform(-1, 1), c_rowsum=rng.uniform(-1, 1),
                     c_pos=0.0 if case["pos_offset"] is None else rng.uniform(-1, 1))
        got, got_grads = _run(case, args, kw, backend, upstream, coefs)
        exp, exp_grads = _run(case, args, kw, "reference", upstream, coefs)
        where = f"case {k} of {CASES}, {backend}: {case}"
        if case["loss"]:  # coefficients of either sign: judge the loss at its terms' size
            stats = (fx.concat_critic_stats if case["kind"] == "concat"
                     else fx.separable_critic_stats)(*args, **kw, backend="reference")
            assert_rel_close(got[0], exp[0], TOL, f"loss ({where})",
                             loss_floor([coefs[c] for c in ("c_lse", "c_pos", "c_rowsum")],
                                        stats))
        else:
            for name, a, e in zip(("lse", "pos", "rowsum"), got, exp):
                assert_rel_close(a, e, TOL, f"{name} ({where})")
        for i, (a, e) in enumerate(zip(got_grads, exp_grads)):
            assert a is not None, f"gradient of input {i} missing ({where})"
            assert_rel_close(a, e, TOL, f"gradient of input {i} ({where})")


@pytest.mark.parametrize("seed", range(3))
def test_case_draws_cover_every_option(seed):
    """The draws reach the options they are meant to combine (a guard against a draw that
    silently stopped producing, say, non-contiguous inputs or hidden layers)."""
    rng = random.Random(seed)
    cases = [_draw_case(rng) for _ in range(200)]
    concat = [c for c in cases if c["kind"] == "concat"]
    separable = [c for c in cases if c["kind"] == "separable"]
    assert {c["L"] for c in concat} == {0, 1, 2, 3}
    assert {(c["activation"], c["out_activation"]) for c in concat} == {
        ("relu", "none"), ("relu", "softplus"), ("tanh", "none"), ("tanh", "softplus")}
    assert any(c["exclude_offset"] not in (None, 0) for c in separable)
    assert {c["normalize"] for c in separable} == {True, False}
    assert {c["tensor_temperature"] for c in separable} == {True, False}
    assert any(c["pos_offset"] is None for c in cases)
    assert any(c["pos_offset"] not in (None, 0) for c in cases)
    assert any(c["M"] < c["N"] for c in cases) and any(c["M"] > c["N"] for c in cases)
    assert {c["loss"] for c in cases} == {True, False}
    assert {c["transposed"] for c in cases} == {True, False}
