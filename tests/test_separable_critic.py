"""The separable critic (DESIGN.md section 3) on every compiled backend, against the materialising
float64 reference: values and gradients of the public functions and of the core ops, the torch
integration (gradcheck, opcheck, torch.compile), and bad input.

Shapes are small and odd; tests on bigger shapes carry ``large`` in their id (``-k "not large"``
leaves them out).
"""

from __future__ import annotations

import math

import pytest
import torch

import factorcl_ext
from factorcl_ext import reference

from conftest import (
    assert_rel_close,
    club_floor,
    infonce_floor,
    loss_floor,
    rel_error,
    signed_sum_floor,
    stats_floor,
    temperature_floor,
)

F64_TOL = 1e-10
F32_TOL = 1e-5

# (id, N, M, D): N != M, N = 1, M = 1, N > M, sizes no tile divides, odd D.
SHAPES = [
    ("7x7x5", 7, 7, 5),
    ("5x11x3", 5, 11, 3),
    ("1x4x3", 1, 4, 3),
    ("1x1x2", 1, 1, 2),
    ("9x4x3", 9, 4, 3),
    ("13x29x17", 13, 29, 17),
]
# (pos_offset, exclude_offset); combinations the shape does not allow are skipped.
OFFSETS = [(0, None), (0, 0), (2, None), (None, 1), (3, 3), (1, 0), (None, None)]


def _offsets_fit(n: int, m: int, pos_offset, exclude_offset) -> bool:
    for off in (pos_offset, exclude_offset):
        if off is not None and n + off > m:
            return False
    return not (exclude_offset is not None and m == 1)


def _cases():
    for sid, n, m, d in SHAPES:
        for pos_offset, exclude_offset in OFFSETS:
            if _offsets_fit(n, m, pos_offset, exclude_offset):
                yield pytest.param(n, m, d, pos_offset, exclude_offset,
                                   id=f"{sid}-pos{pos_offset}-excl{exclude_offset}")


CASES = list(_cases())


def _inputs(n, m, d, device, dtype=torch.float64, temperature="tensor"):
    g = torch.randn(n, d, dtype=dtype, device=device)
    h = torch.randn(m, d, dtype=dtype, device=device)
    if temperature == "tensor":
        temperature = torch.tensor(0.4, dtype=dtype, device=device)
    return g, h, temperature


def _leaves(*tensors):
    """Fresh leaf copies that require grad (floats pass through)."""
    return [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t
            for t in tensors]


def _grads(out, inputs):
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    return torch.autograd.grad(out, tensors)


def _weights(n, dtype, device):
    return [torch.randn(n, dtype=dtype, device=device) for _ in range(3)]


def _weighted(stats, w):
    return sum((wi * s).sum() for wi, s in zip(w, stats))


def _stats_run(fn, g, h, temperature, w, **kw):
    """(lse, pos, rowsum, dg, dh[, dtemperature]) of ``fn`` on fresh leaves of the inputs."""
    args = _leaves(g, h, temperature)
    stats = fn(args[0], args[1], temperature=args[2], **kw)
    grads = _grads(_weighted(stats, [wi.to(g.dtype) for wi in w]), args)
    return list(stats), list(grads)


def _combined(coefs, stats):
    """The fused loss op's value from (lse, pos, rowsum): sum of c_lse lse + c_pos pos + ..."""
    return (coefs["c_lse"] * stats[0] + coefs["c_pos"] * stats[1]
            + coefs["c_rowsum"] * stats[2]).sum()


def _loss_run(fn, g, h, temperature, coefs, **kw):
    args = _leaves(g, h, temperature)
    loss = fn(args[0], args[1], temperature=args[2], **kw)
    if isinstance(loss, tuple):  # the reference gives stats: combine them as the loss op does
        loss = _combined(coefs, loss)
    return [loss], list(_grads(loss, args))


def _double(*tensors):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in tensors]


def _compare(names, actual, expected, tol, same_dtype_ref=None, floors=None):
    """actual vs the float64 reference; below float64 the tolerance is also at least twice the
    error of the reference run in the same dtype (DESIGN.md section 6), and ``floors`` (name ->
    denominator floor) bounds the relative error of a quantity small by cancellation."""
    floors = floors or {}
    for i, (name, a, e) in enumerate(zip(names, actual, expected)):
        t = tol
        if same_dtype_ref is not None:
            t = max(tol, 2 * rel_error(same_dtype_ref[i], e))
        assert_rel_close(a, e, t, name, floor=floors.get(name, 0.0))


def _floors(g, h, temperature, objective, kw, stats=()) -> dict:
    """Floors of the quantities that can be small by cancellation: the statistics (a logsumexp of
    scores near 0 is: lse -0.0016 of N = 1, M = 4, normalised, 6e-5 off in float32;
    conftest.stats_floor) and the temperature's gradient (conftest.temperature_floor)."""
    floors = {name: stats_floor(st) for name, st in zip(("lse", "pos", "rowsum"), stats)}
    if isinstance(temperature, torch.Tensor):
        floors["dtemperature"] = temperature_floor(g, h, temperature, objective, **kw)
    return floors


def _check_stats_and_grads(backend, g, h, temperature, normalize, pos_offset, exclude_offset, tol):
    """separable_critic_stats of ``backend`` against the float64 reference on the same inputs."""
    w = _weights(g.shape[0], torch.float64, g.device)
    kw = dict(normalize=normalize, pos_offset=pos_offset, exclude_offset=exclude_offset)
    stats, grads = _stats_run(factorcl_ext.separable_critic_stats, g, h, temperature, w,
                              backend=backend, **kw)
    for a in stats:
        assert a.dtype == g.dtype and a.device == g.device
    ref_stats, ref_grads = _stats_run(reference.separable_critic_stats, *_double(g, h, temperature),
                                      w, **kw)
    same = None
    if g.dtype != torch.float64:
        same = sum(_stats_run(reference.separable_critic_stats, g, h, temperature, w, **kw), [])
    _compare(("lse", "pos", "rowsum", "dg", "dh", "dtemperature"), stats + grads,
             ref_stats + ref_grads, tol, same,
             _floors(g, h, temperature, lambda st: _weighted(st, w), kw, ref_stats))


def _check_loss_and_grads(backend, g, h, temperature, normalize, pos_offset, exclude_offset, tol,
                          coefs=None):
    n, m = g.shape[0], h.shape[0]
    if coefs is None:
        coefs = dict(c_lse=1.0 / n, c_pos=-1.0 / n if pos_offset is not None else 0.0,
                     c_rowsum=-0.7 / (n * m))
    kw = dict(normalize=normalize, pos_offset=pos_offset, exclude_offset=exclude_offset)
    loss, grads = _loss_run(factorcl_ext.separable_critic_loss, g, h, temperature, coefs,
                            backend=backend, **coefs, **kw)
    assert loss[0].dim() == 0 and loss[0].dtype == g.dtype
    ref_loss, ref_grads = _loss_run(reference.separable_critic_stats, *_double(g, h, temperature),
                                    coefs, **kw)
    same = None
    if g.dtype != torch.float64:
        same = sum(_loss_run(reference.separable_critic_stats, g, h, temperature, coefs, **kw), [])
    floors = _floors(g, h, temperature, lambda st: _combined(coefs, st), kw)
    g64, h64, tau64 = _double(g, h, temperature)
    ref_stats = reference.separable_critic_stats(g64, h64, temperature=tau64, **kw)
    floors["loss"] = loss_floor((coefs["c_lse"], coefs["c_pos"], coefs["c_rowsum"]), ref_stats)
    _compare(("loss", "dg", "dh", "dtemperature"), loss + grads, ref_loss + ref_grads, tol, same,
             floors)


# ---------------------------------------------------------------------------------------------
# Values and gradients against the reference.
# ---------------------------------------------------------------------------------------------


def test_inputs_on_another_gpu_than_the_current_one(backend, device):
    """The ops run on their inputs' GPU whichever device is current (see the concat critic's
    test of the same name)."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip("needs a GPU backend and two GPUs")
    other = torch.device("cuda", 1)
    with torch.cuda.device(0):
        _check_stats_and_grads(backend, *_inputs(37, 53, 29, other), True, 0, None, F64_TOL)
        _check_loss_and_grads(backend, *_inputs(37, 53, 29, other), False, 3, 1, F64_TOL)
        assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("temperature", [0.5, "tensor"], ids=["tau-float", "tau-tensor"])
@pytest.mark.parametrize("n,m,d,pos_offset,exclude_offset", CASES)
def test_stats_float64(backend, device, n, m, d, pos_offset, exclude_offset, temperature,
                       normalize):
    g, h, temperature = _inputs(n, m, d, device, temperature=temperature)
    _check_stats_and_grads(backend, g, h, temperature, normalize, pos_offset, exclude_offset,
                           F64_TOL)


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("temperature", [0.5, "tensor"], ids=["tau-float", "tau-tensor"])
@pytest.mark.parametrize("n,m,d,pos_offset,exclude_offset", CASES)
def test_loss_float64(backend, device, n, m, d, pos_offset, exclude_offset, temperature,
                      normalize):
    g, h, temperature = _inputs(n, m, d, device, temperature=temperature)
    _check_loss_and_grads(backend, g, h, temperature, normalize, pos_offset, exclude_offset,
                          F64_TOL)


@pytest.mark.parametrize("n,m,d,pos_offset,exclude_offset", [
    pytest.param(13, 29, 17, 3, 3, id="13x29x17-pos3-excl3"),
    pytest.param(1, 4, 3, 0, None, id="1x4x3-pos0"),
    pytest.param(9, 4, 3, None, None, id="9x4x3-nopos"),
])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_float32(backend, device, n, m, d, pos_offset, exclude_offset, normalize):
    g, h, temperature = _inputs(n, m, d, device, dtype=torch.float32)
    _check_stats_and_grads(backend, g, h, temperature, normalize, pos_offset, exclude_offset,
                           F32_TOL)
    _check_loss_and_grads(backend, g, h, temperature, normalize, pos_offset, exclude_offset,
                          F32_TOL)


# Bigger than one strip of rows per worker in every backend: several strips, several slots.
@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_TOL), (torch.float32, F32_TOL)],
                         ids=["f64", "f32"])
@pytest.mark.parametrize("n,m,d,pos_offset,exclude_offset", [
    pytest.param(130, 3001, 9, 1, 0, id="large-130x3001x9"),
    pytest.param(517, 1031, 67, 257, 3, id="large-517x1031x67"),
])
def test_large(backend, device, n, m, d, pos_offset, exclude_offset, dtype, tol):
    g, h, temperature = _inputs(n, m, d, device, dtype=dtype)
    _check_stats_and_grads(backend, g, h, temperature, True, pos_offset, exclude_offset, tol)
    _check_loss_and_grads(backend, g, h, temperature, True, pos_offset, exclude_offset, tol)


@pytest.mark.parametrize("n,m,d,pos_offset,exclude_offset", [
    pytest.param(7, 7, 5, 0, None, id="7x7x5-pos0"),
    pytest.param(5, 11, 3, 2, 4, id="5x11x3-pos2-excl4"),
    pytest.param(6, 9, 4, None, 3, id="6x9x4-nopos-excl3"),
    pytest.param(3, 5, 1, 2, 2, id="3x5x1-pos2-excl2"),
])
def test_core_ops(backend, device, n, m, d, pos_offset, exclude_offset):
    """pair_dot_stats / pair_dot_loss (G, H already scaled) against the reference core."""
    G, H = (torch.randn(k, d, dtype=torch.float64, device=device) for k in (n, m))
    w = _weights(n, torch.float64, device)

    Ga, Ha = _leaves(G, H)
    stats = factorcl_ext.pair_dot_stats(Ga, Ha, pos_offset=pos_offset,
                                        exclude_offset=exclude_offset, backend=backend)
    grads = _grads(_weighted(stats, w), (Ga, Ha))
    Gr, Hr = _leaves(G, H)
    ref = reference.pair_dot_stats(Gr, Hr, pos_offset, exclude_offset)
    ref_grads = _grads(_weighted(ref, w), (Gr, Hr))
    for name, a, e in zip(("lse", "pos", "rowsum", "dG", "dH"), (*stats, *grads),
                          (*ref, *ref_grads)):
        assert_rel_close(a, e, F64_TOL, name)
    if pos_offset is None:
        assert torch.count_nonzero(stats.pos) == 0

    c_pos = 0.0 if pos_offset is None else 0.9
    Ga, Ha = _leaves(G, H)
    loss = factorcl_ext.pair_dot_loss(Ga, Ha, c_lse=0.3, c_pos=c_pos, c_rowsum=-0.2,
                                      pos_offset=pos_offset, exclude_offset=exclude_offset,
                                      backend=backend)
    grads = _grads(loss, (Ga, Ha))
    Gr, Hr = _leaves(G, H)
    lse, pos, rowsum = reference.pair_dot_stats(Gr, Hr, pos_offset, exclude_offset)
    ref_loss = (0.3 * lse + c_pos * pos - 0.2 * rowsum).sum()
    ref_grads = _grads(ref_loss, (Gr, Hr))
    for name, a, e in zip(("loss", "dG", "dH"), (loss, *grads), (ref_loss, *ref_grads)):
        assert_rel_close(a, e, F64_TOL, name)


def test_exclusion_changes_results(backend, device):
    """exclude_offset really removes a column (a test of the test cases above)."""
    G, H = torch.randn(5, 4, dtype=torch.float64, device=device), torch.randn(8, 4,
                                                                               dtype=torch.float64,
                                                                               device=device)
    full = factorcl_ext.pair_dot_stats(G, H, pos_offset=1, backend=backend)
    excl = factorcl_ext.pair_dot_stats(G, H, pos_offset=1, exclude_offset=1, backend=backend)
    s = G @ H.t()
    rows = torch.arange(5, device=device)
    assert torch.all(excl.lse < full.lse)
    assert_rel_close(full.rowsum - excl.rowsum, s[rows, rows + 1], F64_TOL, "excluded column")
    # pos is the excluded entry here, and still reported.
    assert_rel_close(excl.pos, s[rows, rows + 1], F64_TOL, "pos")


def test_loss_matches_stats(backend, device):
    """The fused loss equals the same combination of the stats op, values and gradients."""
    n, m, d = 11, 19, 7
    g, h, temperature = _inputs(n, m, d, device)
    coefs = dict(c_lse=0.7, c_pos=-1.3, c_rowsum=0.05)
    kw = dict(temperature=temperature, normalize=True, pos_offset=5, exclude_offset=2,
              backend=backend)
    a = _leaves(g, h)
    loss = factorcl_ext.separable_critic_loss(a[0], a[1], **coefs, **kw)
    grads = _grads(loss, a)
    b = _leaves(g, h)
    st = factorcl_ext.separable_critic_stats(b[0], b[1], **kw)
    combo = (coefs["c_lse"] * st.lse + coefs["c_pos"] * st.pos
             + coefs["c_rowsum"] * st.rowsum).sum()
    combo_grads = _grads(combo, b)
    assert_rel_close(loss, combo, F64_TOL, "loss",
                     loss_floor([coefs[c] for c in ("c_lse", "c_pos", "c_rowsum")], st))
    for name, x, y in zip(("dg", "dh"), grads, combo_grads):
        assert_rel_close(x, y, F64_TOL, name)


def test_loss_without_grad(backend, device):
    """No input requires grad: the loss op skips its gradients, the value is unchanged."""
    g, h, _ = _inputs(6, 10, 5, device)
    kw = dict(c_lse=1.0, c_pos=-1.0, pos_offset=2, exclude_offset=0, backend=backend)
    with torch.no_grad():
        loss_ng = factorcl_ext.separable_critic_loss(g, h, **kw)
    loss = factorcl_ext.separable_critic_loss(g, h, **kw)
    assert not loss.requires_grad
    lse, pos, _ = reference.separable_critic_stats(g, h, pos_offset=2, exclude_offset=0)
    assert_rel_close(loss_ng, (lse - pos).sum(), F64_TOL, "loss (no_grad)")
    assert_rel_close(loss, (lse - pos).sum(), F64_TOL, "loss")


@pytest.mark.parametrize("op", ["stats", "loss"])
def test_inference_mode_columns(backend, device, op):
    """Columns made under torch.inference_mode (a memory bank filled without gradients) against
    rows that require grad: the recomputing backward needs the columns, which PyTorch cannot save
    as they are (a copy is saved). Unnormalised, so that the bank reaches the op itself. The
    reference, g @ h.T, would refuse too: it runs on a normal copy here."""
    g, h, temperature = _inputs(7, 12, 5, device)
    with torch.inference_mode():
        bank = h.clone()
    assert bank.is_inference()
    kw = dict(temperature=temperature, normalize=False, pos_offset=4, exclude_offset=1)
    coefs = dict(c_lse=0.8, c_pos=-1.1, c_rowsum=0.3)
    rows, ref_rows = _leaves(g, g)
    stats = reference.separable_critic_stats(ref_rows, h, **kw)
    if op == "stats":
        w = _weights(7, torch.float64, device)
        got = _weighted(factorcl_ext.separable_critic_stats(rows, bank, **kw, backend=backend), w)
        exp = _weighted(stats, w)
        floor = signed_sum_floor(*(wi * st for wi, st in zip(w, stats)))
    else:
        got = factorcl_ext.separable_critic_loss(rows, bank, **coefs, **kw, backend=backend)
        exp = _combined(coefs, stats)
        floor = loss_floor(coefs.values(), stats)
    assert_rel_close(got, exp, F64_TOL, op, floor)
    assert_rel_close(_grads(got, [rows])[0], _grads(exp, [ref_rows])[0], F64_TOL, "dg")


def test_non_contiguous(backend, device):
    n, m, d = 9, 14, 6
    g = torch.randn(n, 2 * d, dtype=torch.float64, device=device)[:, ::2]  # strided rows
    h = torch.randn(d, m, dtype=torch.float64, device=device).t()  # transposed
    assert not g.is_contiguous() and not h.is_contiguous()
    temperature = torch.tensor(0.6, dtype=torch.float64, device=device)
    _check_stats_and_grads(backend, g, h, temperature, False, 3, 1, F64_TOL)
    _check_loss_and_grads(backend, g, h, temperature, False, 3, 1, F64_TOL)
    # The core ops' gradients are laid out like their inputs (as the fake functions say).
    G, H = _leaves(g, h)
    loss = factorcl_ext.pair_dot_loss(G, H, c_lse=1.0, pos_offset=0, backend=backend)
    dG, dH = _grads(loss, (G, H))
    assert dG.stride() == G.stride() and dH.stride() == H.stride()
    assert not H.is_contiguous()


# ---------------------------------------------------------------------------------------------
# NaN / Inf, determinism.
# ---------------------------------------------------------------------------------------------


def _nonfinite_inputs(device):
    n, m, d = 6, 9, 4
    g = torch.randn(n, d, dtype=torch.float64, device=device)
    h = torch.randn(m, d, dtype=torch.float64, device=device)
    h[:, 0] = h[:, 0].abs() + 0.1  # so that rows 1 and 2 below are all +Inf / all -Inf
    inf = float("inf")
    g[1] = torch.tensor([inf, 0.0, 0.0, 0.0])
    g[2] = torch.tensor([-inf, 0.0, 0.0, 0.0])
    g[3, 1] = float("nan")
    g[4] = torch.tensor([inf, 1.0, 0.0, 0.0])
    return g, h


@pytest.mark.parametrize("pos_offset,exclude_offset", [(0, None), (1, 2), (None, 0)])
def test_nan_inf_propagate(backend, device, pos_offset, exclude_offset):
    """A NaN or Inf in a row gives exactly the reference's NaN / Inf, and no other row changes."""
    g, h = _nonfinite_inputs(device)
    stats = factorcl_ext.pair_dot_stats(g, h, pos_offset=pos_offset,
                                        exclude_offset=exclude_offset, backend=backend)
    ref = reference.pair_dot_stats(g, h, pos_offset, exclude_offset)
    for name, a, e in zip(("lse", "pos", "rowsum"), stats, ref):
        torch.testing.assert_close(a, e, equal_nan=True, rtol=1e-12, atol=0, msg=name)
    assert stats.lse[1] == float("inf") and stats.lse[2] == float("-inf")
    assert torch.isnan(stats.lse[3]) and torch.isfinite(stats.lse[[0, 5]]).all()

    w = _weights(g.shape[0], torch.float64, device)
    a = _leaves(g, h)
    grads = _grads(_weighted(factorcl_ext.pair_dot_stats(
        a[0], a[1], pos_offset=pos_offset, exclude_offset=exclude_offset, backend=backend), w), a)
    r = _leaves(g, h)
    ref_grads = _grads(_weighted(reference.pair_dot_stats(r[0], r[1], pos_offset, exclude_offset),
                                 w), r)
    for name, x, y in zip(("dG", "dH"), grads, ref_grads):
        torch.testing.assert_close(x, y, equal_nan=True, rtol=1e-10, atol=1e-12, msg=name)

    c_pos = 0.0 if pos_offset is None else -1.0
    loss = factorcl_ext.pair_dot_loss(g, h, c_lse=1.0, c_pos=c_pos, c_rowsum=0.1,
                                      pos_offset=pos_offset, exclude_offset=exclude_offset,
                                      backend=backend)
    assert torch.isnan(loss)


@pytest.mark.parametrize("dtype,big", [(torch.float64, 800.0), (torch.float32, 100.0)])
@pytest.mark.parametrize("pos_offset,exclude_offset", [(1, None), (0, 2)])
def test_loss_gradients_of_a_row_with_inf_beside_a_large_score(backend, device, dtype, big,
                                                                pos_offset, exclude_offset):
    """Row 0 scores [+Inf, big, ...] with exp(big) beyond the dtype's range: the CPU loss op
    formed its softmax as exp(s) / sumexp there (no finite maximum to subtract), which overflowed
    to Inf / Inf = NaN for the big score and spread a NaN over that column's whole dH row. The
    reference's exp(s - lse) is 0 there: the loss op's gradients now equal the reference's, NaN
    where it has NaN (the +Inf entry), and no other row or column changes."""
    inf = float("inf")
    g = torch.randn(4, 3, dtype=torch.float64, device=device)
    h = torch.randn(7, 3, dtype=torch.float64, device=device)
    g[0] = torch.tensor([1.0, 1.0, 0.0])
    h[0] = torch.tensor([inf, 0.0, 0.0])  # s_00 = +Inf, s_i0 = +-Inf for the other rows
    h[1] = torch.tensor([0.0, big, 0.0])  # s_01 = big
    g, h = g.to(dtype), h.to(dtype)
    kw = dict(c_lse=1.0, c_pos=-1.0, c_rowsum=0.1, pos_offset=pos_offset,
              exclude_offset=exclude_offset)
    a = _leaves(g, h)
    grads = torch.autograd.grad(factorcl_ext.pair_dot_loss(*a, backend=backend, **kw), a)
    r = _leaves(g, h)
    ref_grads = torch.autograd.grad(factorcl_ext.pair_dot_loss(*r, backend="reference", **kw), r)
    assert torch.isfinite(ref_grads[1][1:]).all()  # the big score's column is finite there
    for name, x, y in zip(("dG", "dH"), grads, ref_grads):
        torch.testing.assert_close(x, y, equal_nan=True, rtol=1e-5, atol=1e-6, msg=name)


def test_large_scores_do_not_overflow(backend, device):
    """Scores far beyond exp's range: the logsumexp must subtract the row maximum."""
    g = torch.randn(5, 3, dtype=torch.float64, device=device) * 400
    h = torch.randn(8, 3, dtype=torch.float64, device=device)
    for dtype, tol in ((torch.float64, F64_TOL), (torch.float32, F32_TOL)):
        stats = factorcl_ext.pair_dot_stats(g.to(dtype), h.to(dtype), pos_offset=1,
                                            exclude_offset=0, backend=backend)
        ref = reference.pair_dot_stats(g, h, 1, 0)
        assert torch.isfinite(stats.lse).all()
        assert_rel_close(stats.lse, ref[0], tol, f"lse {dtype}")


def test_large_column_count_sums_stay_accurate(backend, device):
    """float32 row sums over eight million columns (a memory bank of negatives): the CPU kernel's
    sums were one vector accumulator per row, sequential over M / 8 additions per lane, and its
    rowsum drifted to 2.6e-6 at M = 1e6 and 1.3e-5 at 16e6 (DESIGN.md's float32 bound: 1e-5;
    torch's cascade sum: 2e-8); they are now blocked in two levels (at most 6.7e-7 here over ten
    seeds). Bar: 2e-6 on the CPU, DESIGN.md's float32 1e-5 on GPU backends (whose running sums
    over column tiles are not measured at this size yet), or twice the materialising reference's
    float32 error if that is larger."""
    n, m = 3, 2**23
    g = torch.randn(n, 2, dtype=torch.float64, device=device) * 0.5 + 0.3
    h = torch.randn(m, 2, dtype=torch.float64, device=device) * 0.5 + 0.3
    exact = reference.pair_dot_stats(g, h, 0, None)
    ours = factorcl_ext.pair_dot_stats(g.float(), h.float(), backend=backend)
    theirs = reference.pair_dot_stats(g.float(), h.float(), 0, None)
    for name, a, b, e in zip(("lse", "pos", "rowsum"), ours, theirs, exact):
        bar = max(2e-6 if backend == "cpu" else F32_TOL, 2 * rel_error(b.double(), e))
        assert_rel_close(a.double(), e, bar, f"{name}, M = {m}")


def test_bit_identical_reruns(backend, device):
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter runs one program at a time: nothing to race")
    n, m, d = 300, 2001, 33  # several strips per worker on the CPU backend
    g, h, temperature = _inputs(n, m, d, device, dtype=torch.float32)
    w = _weights(n, torch.float32, device)

    def run():
        a = _leaves(g, h)
        st = factorcl_ext.separable_critic_stats(a[0], a[1], temperature=0.3, pos_offset=7,
                                                 exclude_offset=1, backend=backend,
                                                 deterministic=True)
        out = [*st, *_grads(_weighted(st, w), a)]
        b = _leaves(g, h)
        loss = factorcl_ext.separable_critic_loss(b[0], b[1], c_lse=1.0, c_pos=-1.0,
                                                  c_rowsum=0.01, temperature=0.3, pos_offset=7,
                                                  exclude_offset=1, backend=backend,
                                                  deterministic=True)
        return out + [loss, *_grads(loss, b)]

    first, second = run(), run()
    for i, (x, y) in enumerate(zip(first, second)):
        assert torch.equal(x, y), f"output {i} differs between two identical runs"


# ---------------------------------------------------------------------------------------------
# torch integration: gradcheck, opcheck, torch.compile.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pos_offset,exclude_offset", [(1, 2), (None, 0)])
def test_gradcheck(backend, device, pos_offset, exclude_offset):
    g, h, temperature = _inputs(3, 6, 4, device)
    args = tuple(_leaves(g, h, temperature))

    def stats(g, h, t):
        return tuple(factorcl_ext.separable_critic_stats(
            g, h, temperature=t, normalize=True, pos_offset=pos_offset,
            exclude_offset=exclude_offset, backend=backend))

    def loss(g, h, t):
        return factorcl_ext.separable_critic_loss(
            g, h, c_lse=0.8, c_pos=0.0 if pos_offset is None else -1.1, c_rowsum=0.3,
            temperature=t, normalize=True, pos_offset=pos_offset, exclude_offset=exclude_offset,
            backend=backend)

    assert torch.autograd.gradcheck(stats, args)
    assert torch.autograd.gradcheck(loss, args)


def _core_op(backend, name):
    """The registered core op of ``backend`` and the arguments it takes after the C++ op's (the
    Triton twin's ``deterministic``)."""
    if backend == "triton":
        import factorcl_ext.triton  # noqa: F401  (registers the factorcl::triton_* ops)

        return getattr(torch.ops.factorcl, "triton_" + name).default, (False,)
    return getattr(torch.ops.factorcl, name).default, ()


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck(backend, device, requires_grad):
    n, m, d = 5, 9, 3
    G = torch.randn(n, d, dtype=torch.float64, device=device, requires_grad=requires_grad)
    H = torch.randn(m, d, dtype=torch.float64, device=device, requires_grad=requires_grad)
    Hs = torch.randn(d, m, dtype=torch.float64, device=device).t().requires_grad_(requires_grad)
    stats, extra = _core_op(backend, "pair_dot_stats")
    loss, _ = _core_op(backend, "pair_dot_loss")
    for args in [(G, H, 0, None), (G, H, 4, 2), (G, Hs, None, 0)]:
        torch.library.opcheck(stats, (*args, *extra))
    # With compute_grad=False the op has no gradients to give, so it only meets inputs that do not
    # require grad (the Python layer passes compute_grad=True whenever one does).
    torch.library.opcheck(loss, (G, H, 1, 3, 0.5, -0.25, 0.125, requires_grad, *extra))
    torch.library.opcheck(loss, (G, Hs, None, None, 1.0, 0.0, -0.5, requires_grad, *extra))
    if not requires_grad:
        torch.library.opcheck(loss, (G, H, 1, 3, 0.5, -0.25, 0.125, True, *extra))


def test_opcheck_backward_op(backend, device):
    op, extra = _core_op(backend, "pair_dot_stats_backward")
    n, m, d = 5, 9, 3
    G = torch.randn(n, d, dtype=torch.float64, device=device)
    H = torch.randn(m, d, dtype=torch.float64, device=device)
    lse = reference.pair_dot_stats(G, H, 1, 2)[0]
    grads = [torch.randn(n, dtype=torch.float64, device=device) for _ in range(3)]
    # An expanded (stride 0) upstream gradient, as .sum() produces.
    grads[2] = torch.randn((), dtype=torch.float64, device=device).expand(n)
    torch.library.opcheck(op, (*grads, G, H, lse, 1, 2, *extra))


def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    n, m, d = 8, 13, 6

    coefs = dict(c_lse=1.0 / n, c_pos=-1.0 / n, c_rowsum=0.1)
    kw = dict(normalize=True, pos_offset=2, exclude_offset=0)

    def step(g, h, t):
        return factorcl_ext.separable_critic_loss(g, h, temperature=t, backend=backend, **coefs,
                                                  **kw)

    compiled = torch.compile(step, fullgraph=True)
    g, h, temperature = _inputs(n, m, d, device, dtype=torch.float32)
    a = _leaves(g, h, temperature)
    loss = compiled(*a)
    loss.backward()
    b = _leaves(g, h, temperature)
    ref = step(*b)
    ref.backward()
    stats64 = reference.separable_critic_stats(g.double(), h.double(),
                                               temperature=temperature.double(), **kw)
    assert_rel_close(loss, ref, F32_TOL, "loss", loss_floor(coefs.values(), stats64))
    # compiled and eager autograd round the temperature's cancelling sum differently (9.3e-5 of
    # a 0.0035 value on one seed): its floor is the size of its terms
    tau_floor = temperature_floor(g, h, temperature, lambda st: _combined(coefs, st), **kw)
    for name, x, y, floor in zip(("dg", "dh", "dtemperature"), a, b, (0.0, 0.0, tau_floor)):
        assert_rel_close(x.grad, y.grad, F32_TOL, name, floor=floor)


@pytest.mark.parametrize("op", ["stats", "loss"])
def test_second_derivative_raises_instead_of_zeros(op, backend, device):
    """First-order backward: create_graph=True gives the same gradient; differentiating it again
    raises instead of PyTorch's silent zeros for the backward kernel's part."""
    g, h, temperature = _inputs(6, 9, 4, device)
    a = _leaves(g, h, temperature)

    def objective():
        if op == "stats":
            st = factorcl_ext.separable_critic_stats(*a[:2], temperature=a[2], pos_offset=2,
                                                     backend=backend)
            return (st.lse - st.pos).sum()
        return factorcl_ext.separable_critic_loss(*a[:2], temperature=a[2], c_lse=1.0,
                                                  c_pos=-1.0, pos_offset=2, backend=backend)

    plain = torch.autograd.grad(objective(), a)
    graphed = torch.autograd.grad(objective(), a, create_graph=True)
    for x, y in zip(graphed, plain):
        assert torch.equal(x.detach(), y)
    for wrt in a:
        with pytest.raises(RuntimeError, match="first-order only.*backend='reference'"):
            torch.autograd.grad((graphed[0] ** 2).sum(), wrt, retain_graph=True)


# ---------------------------------------------------------------------------------------------
# Bad input: named errors from the Python layer; the C++ kernels' second-line checks.
# ---------------------------------------------------------------------------------------------


def _bad_calls(device):
    def t(*shape, dtype=torch.float64):
        return torch.randn(*shape, dtype=dtype, device=device)

    sc, sl = factorcl_ext.separable_critic_stats, factorcl_ext.separable_critic_loss
    return [
        ("g-rank", ValueError, "g", lambda b: sc(t(2, 3, 4), t(5, 4), backend=b)),
        ("h-rank", ValueError, "h", lambda b: sc(t(2, 4), t(5), backend=b)),
        ("width", ValueError, "widths", lambda b: sc(t(2, 4), t(5, 3), backend=b)),
        ("dtype", TypeError, "dtype", lambda b: sc(t(2, 4), t(5, 4, dtype=torch.float32),
                                                   backend=b)),
        ("not-a-tensor", TypeError, "g", lambda b: sc([[1.0]], t(5, 4), backend=b)),
        ("sparse-h", TypeError, r"h must be a dense \(strided\) tensor",
         lambda b: sc(t(3, 4), t(5, 4).to_sparse(), backend=b)),
        ("pos-range", ValueError, "pos_offset", lambda b: sc(t(3, 4), t(5, 4), pos_offset=3,
                                                             backend=b)),
        ("pos-negative", ValueError, "pos_offset", lambda b: sc(t(3, 4), t(5, 4), pos_offset=-1,
                                                                backend=b)),
        ("pos-bool", TypeError, "pos_offset", lambda b: sc(t(3, 4), t(5, 4), pos_offset=True,
                                                           backend=b)),
        ("pos-float", TypeError, "pos_offset", lambda b: sc(t(3, 4), t(5, 4), pos_offset=1.0,
                                                            backend=b)),
        ("excl-range", ValueError, "exclude_offset",
         lambda b: sc(t(3, 4), t(5, 4), exclude_offset=4, backend=b)),
        ("excl-bool", TypeError, "exclude_offset",
         lambda b: sc(t(3, 4), t(5, 4), exclude_offset=False, backend=b)),
        ("excl-single-column", ValueError, "exclude_offset",
         lambda b: sc(t(1, 4), t(1, 4), exclude_offset=0, backend=b)),
        ("empty-g", ValueError, "empty", lambda b: sc(t(0, 4), t(5, 4), backend=b)),
        ("empty-h", ValueError, "empty", lambda b: sc(t(2, 4), t(0, 4), pos_offset=None,
                                                      backend=b)),
        ("tau-zero", ValueError, "temperature", lambda b: sc(t(2, 4), t(5, 4), temperature=0.0,
                                                             backend=b)),
        ("tau-negative", ValueError, "temperature",
         lambda b: sc(t(2, 4), t(5, 4), temperature=-0.1, backend=b)),
        ("tau-str", TypeError, "temperature", lambda b: sc(t(2, 4), t(5, 4), temperature="0.1",
                                                           backend=b)),
        ("tau-bool", TypeError, "temperature", lambda b: sc(t(2, 4), t(5, 4), temperature=True,
                                                            backend=b)),
        ("tau-shape", ValueError, "temperature",
         lambda b: sc(t(2, 4), t(5, 4), temperature=t(2).abs(), backend=b)),
        ("normalize-int", TypeError, "normalize", lambda b: sc(t(2, 4), t(5, 4), normalize=1,
                                                               backend=b)),
        ("c-pos-without-pos", ValueError, "c_pos",
         lambda b: sl(t(2, 4), t(5, 4), c_pos=1.0, pos_offset=None, backend=b)),
        ("c-str", TypeError, "c_lse", lambda b: sl(t(2, 4), t(5, 4), c_lse="1", backend=b)),
        ("loss-pos-range", ValueError, "pos_offset",
         lambda b: sl(t(3, 4), t(5, 4), c_lse=1.0, pos_offset=3, backend=b)),
    ]


_BAD_IDS = [c[0] for c in _bad_calls("cpu")]


@pytest.mark.parametrize("case", _BAD_IDS)
def test_bad_input(backend, device, case):
    _, exc, word, call = {c[0]: c for c in _bad_calls(device)}[case]
    with pytest.raises(exc, match=word):
        call(backend)


def test_bad_dtype_on_cpu(backend, device):
    if device.type != "cpu":
        pytest.skip("bfloat16 is supported on GPU backends")
    g = torch.randn(3, 4, dtype=torch.bfloat16)
    h = torch.randn(5, 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        factorcl_ext.separable_critic_stats(g, h, backend=backend)
    with pytest.raises(TypeError, match="bfloat16"):
        factorcl_ext.separable_critic_loss(g, h, c_lse=1.0, backend=backend)


def test_cpp_checks(backend, device):
    """The C++ kernels refuse bad input themselves (ValueError / TypeError naming the argument)
    when called through the dispatcher without the Python layer."""
    if backend != "cpu":
        pytest.skip("the second-line checks tested here are the CPU kernels'")
    f = torch.ops.factorcl
    G, H = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    v = torch.randn(3, dtype=torch.float64)
    cases = [
        (ValueError, "G must be 2-D", lambda: f.pair_dot_stats(G[0], H, 0, None)),
        (ValueError, "H must be 2-D", lambda: f.pair_dot_loss(G, H[None], 0, None, 1., 0., 0.,
                                                               False)),
        (ValueError, "widths", lambda: f.pair_dot_stats(G, H[:, :3], 0, None)),
        (TypeError, "dtype", lambda: f.pair_dot_stats(G, H.float(), 0, None)),
        (TypeError, "float32 and float64", lambda: f.pair_dot_stats(G.bfloat16(), H.bfloat16(),
                                                                    0, None)),
        (ValueError, "pos_offset", lambda: f.pair_dot_stats(G, H, 3, None)),
        (ValueError, "pos_offset", lambda: f.pair_dot_stats(G, H, -1, None)),
        (ValueError, "exclude_offset", lambda: f.pair_dot_loss(G, H, 0, 3, 1., 0., 0., True)),
        (ValueError, "empty", lambda: f.pair_dot_stats(G[:0], H, None, None)),
        (ValueError, "single column", lambda: f.pair_dot_stats(G[:1], H[:1], None, 0)),
        (ValueError, "grad_lse", lambda: f.pair_dot_stats_backward(v[:2], v, v, G, H, v, 0,
                                                                   None)),
        (TypeError, "lse", lambda: f.pair_dot_stats_backward(v, v, v, G, H, v.float(), 0, None)),
    ]
    for exc, word, call in cases:
        with pytest.raises(exc, match=word):
            call()


def test_bound_helpers(backend, device):
    """infonce_lower_bound / nce_club_upper_bound from the stats of this backend."""
    n, m = 6, 10
    g, h, _ = _inputs(n, m, 5, device)
    st = factorcl_ext.separable_critic_stats(g, h, temperature=0.5, pos_offset=2, backend=backend)
    s = (g / 0.5) @ h.t()
    rows = torch.arange(n, device=device)
    nce = s[rows, rows + 2].mean() - torch.logsumexp(s, 1).mean() + math.log(m)
    club = s[rows, rows + 2].mean() - s.mean()
    assert_rel_close(factorcl_ext.infonce_lower_bound(st.lse, st.pos, m), nce, F64_TOL, "I_NCE",
                     infonce_floor(st.lse, st.pos, m))
    assert_rel_close(factorcl_ext.nce_club_upper_bound(st.pos, st.rowsum, m), club, F64_TOL,
                     "I_CLUB", club_floor(st.pos, st.rowsum, m))
