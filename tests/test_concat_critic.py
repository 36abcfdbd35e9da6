"""Concat critic (DESIGN.md section 2): the fused stats op, its backward and the fused loss op,
against the materialising float64 reference, on every backend under test.

Tests whose name contains ``large`` use shapes bigger than the CPU kernel's tiles; deselect them
with ``-k "not large"`` where a backend is slow (the Triton interpreter).
"""

from __future__ import annotations

import pytest
import torch

import factorcl_ext as fe
from factorcl_ext import reference as ref

from conftest import (
    NONFINITE_UNIT,
    assert_nonfinite_pattern_equal,
    assert_rel_close,
    club_floor,
    infonce_floor,
    loss_floor,
    nonfinite_gated_layer,
    nonfinite_weight_core,
    rel_error,
    signed_sum_floor,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
BUDGET_ENV = "FACTORCL_EXT_CPU_BUFFER_BYTES"  # CPU kernel's per-thread buffer budget (bytes)

# (N, M, H, L, activation, out_activation, pos_offset)
SHAPES = [
    pytest.param(7, 13, 19, 0, "relu", "none", 2, id="odd-L0-relu-none-pos2"),
    pytest.param(7, 13, 19, 1, "tanh", "softplus", 0, id="odd-L1-tanh-softplus"),
    pytest.param(7, 13, 19, 2, "relu", "softplus", None, id="odd-L2-relu-softplus-nopos"),
    pytest.param(7, 13, 19, 2, "tanh", "none", 6, id="odd-L2-tanh-none-pos6"),
    pytest.param(5, 5, 16, 0, "tanh", "softplus", 0, id="square-L0-tanh-softplus"),
    pytest.param(12, 17, 3, 3, "relu", "none", 5, id="L3-relu-pos5"),
    pytest.param(1, 1, 5, 1, "relu", "none", 0, id="N1-M1"),
    pytest.param(1, 9, 8, 1, "tanh", "none", 8, id="N1-pos-last"),
    pytest.param(6, 1, 11, 2, "tanh", "softplus", None, id="M1-nopos"),
    pytest.param(9, 4, 7, 1, "relu", "softplus", None, id="N-gt-M"),
]


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def make_core(N, M, H, L, dtype=torch.float64, device="cpu", b_out_shape=(), score_shift=0.0):
    """Core-op inputs, drawn in float64 so every dtype sees the same values."""
    d = torch.float64
    p = {
        "A": torch.randn(N, H, dtype=d),
        "B": torch.randn(M, H, dtype=d),
        "hidden_weights": [torch.randn(H, H, dtype=d) / H**0.5 for _ in range(L)],
        "hidden_biases": [0.3 * torch.randn(H, dtype=d) for _ in range(L)],
        "w_out": torch.randn(H, dtype=d) / H**0.5 * 1.5,
        "b_out": 0.5 * torch.randn(b_out_shape, dtype=d) + score_shift,
    }
    return cast(p, dtype, device)


def make_concat(N, M, du, dv, H, L, dtype=torch.float64, device="cpu", b_out_shape=(),
                score_shift=0.0):
    d = torch.float64
    p = {
        "u": torch.randn(N, du, dtype=d),
        "v": torch.randn(M, dv, dtype=d),
        "w_u": torch.randn(H, du, dtype=d) / du**0.5,
        "w_v": torch.randn(H, dv, dtype=d) / dv**0.5,
        "b_0": 0.3 * torch.randn(H, dtype=d),
        "hidden_weights": [torch.randn(H, H, dtype=d) / H**0.5 for _ in range(L)],
        "hidden_biases": [0.3 * torch.randn(H, dtype=d) for _ in range(L)],
        "w_out": torch.randn(H, dtype=d) / H**0.5 * 1.5,
        "b_out": 0.5 * torch.randn(b_out_shape, dtype=d) + score_shift,
    }
    return cast(p, dtype, device)


def cast(p, dtype, device, requires_grad=False):
    def one(t):
        return t.detach().to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return {k: [one(t) for t in v] if isinstance(v, list) else one(v) for k, v in p.items()}


def leaves(p):
    out = []
    for v in p.values():
        out.extend(v if isinstance(v, list) else [v])
    return out


def leaf_names(p):
    out = []
    for k, v in p.items():
        out.extend([f"{k}[{i}]" for i in range(len(v))] if isinstance(v, list) else [k])
    return out


def grads_of(obj, p):
    return torch.autograd.grad(obj, leaves(p))


def assert_all_close(actual, expected, tol, names, same_dtype_ref=None, floors=()):
    """Relative error <= tol per tensor. With ``same_dtype_ref`` (the reference run in the
    kernel's dtype, float32) a tensor may also pass at twice that reference's own error: a
    float32 result that is small by cancellation (a bias gradient summing terms of both signs)
    cannot be more accurate than float32 arithmetic allows (DESIGN.md section 6). ``floors``
    are the first tensors' denominator floors (a loss's, say); the others have none."""
    assert len(actual) == len(expected)
    refs = same_dtype_ref if same_dtype_ref is not None else [None] * len(actual)
    floors = list(floors) + [0.0] * (len(actual) - len(floors))
    for a, e, r, name, floor in zip(actual, expected, refs, names, floors):
        t = tol if r is None else max(tol, 2 * rel_error(r, e))
        assert_rel_close(a, e, t, name, floor)


def stats_objective(stats, g):
    lse, pos, rowsum = stats
    return (lse * g[0] + pos * g[1] + rowsum * g[2]).sum()


# float32 checks use positive upstream gradients / coefficients and positive-leaning scores, so
# that no checked quantity (the loss, rowsum, the b_out gradient) is small by cancellation: the
# relative error of such a value measures float32's limits, not the kernel.
def upstream(N, dtype, device, positive=False):
    def one():
        x = torch.rand(N, dtype=torch.float64) + 0.5 if positive else torch.randn(N).double()
        return x.to(device=device, dtype=dtype)

    return [one() for _ in range(3)]


def coefficients(pos_offset, positive=False):
    c = (torch.rand(3).double() + 0.5 if positive else torch.randn(3).double()).tolist()
    return {"c_lse": c[0], "c_pos": c[1] if pos_offset is not None else 0.0, "c_rowsum": c[2]}


def run_stats(p, backend, **kw):
    return fe.pair_mlp_stats(**p, backend=backend, **kw)


def ref_stats(p, activation, out_activation, pos_offset):
    return ref.pair_mlp_stats(
        p["A"], p["B"], p["hidden_weights"], p["hidden_biases"], p["w_out"],
        p["b_out"].reshape(()), activation, out_activation, pos_offset,
    )


def ref_loss(p, activation, out_activation, pos_offset, c_lse, c_pos, c_rowsum):
    lse, pos, rowsum = ref_stats(p, activation, out_activation, pos_offset)
    return (c_lse * lse + c_pos * pos + c_rowsum * rowsum).sum()


def ref_loss_floor(p, activation, out_activation, pos_offset, c_lse, c_pos, c_rowsum):
    """The size of ref_loss's terms (conftest.loss_floor): its coefficients have either sign."""
    return loss_floor((c_lse, c_pos, c_rowsum), ref_stats(p, activation, out_activation,
                                                          pos_offset))


def check_stats_against_reference(N, M, H, L, act, out_act, pos_offset, dtype, backend, device):
    """Values and every gradient of the stats op (through its backward) vs float64 reference."""
    base = make_core(N, M, H, L, score_shift=2.0 if dtype == torch.float32 else 0.0)
    check_stats(base, act, out_act, pos_offset, dtype, backend, device)


def check_stats(base, act, out_act, pos_offset, dtype, backend, device):
    """check_stats_against_reference on the core inputs ``base`` (float64)."""
    f32 = dtype == torch.float32
    N = base["A"].shape[0]
    p = cast(base, dtype, device, requires_grad=True)
    r = cast(base, torch.float64, "cpu", requires_grad=True)
    kw = dict(activation=act, out_activation=out_act, pos_offset=pos_offset)
    got = run_stats(p, backend, **kw)
    exp = ref_stats(r, act, out_act, pos_offset)
    tol = TOL[dtype]
    for a in got:
        assert a.dtype == dtype and a.device.type == torch.device(device).type
    g = upstream(N, torch.float64, "cpu", positive=f32)
    got_grads = grads_of(stats_objective(got, [x.to(device, dtype) for x in g]), p)
    exp_grads = grads_of(stats_objective(exp, g), r)
    same_vals = same_grads = None
    if dtype != torch.float64:
        r32 = cast(base, dtype, "cpu", requires_grad=True)
        same_vals = ref_stats(r32, act, out_act, pos_offset)
        same_grads = grads_of(stats_objective(same_vals, [x.to(dtype) for x in g]), r32)
    assert_all_close(got, exp, tol, ("lse", "pos", "rowsum"), same_vals)
    assert_all_close(got_grads, exp_grads, tol, leaf_names(p), same_grads)


def check_loss_against_reference(N, M, H, L, act, out_act, pos_offset, dtype, backend, device):
    base = make_core(N, M, H, L, score_shift=2.0 if dtype == torch.float32 else 0.0)
    check_loss(base, act, out_act, pos_offset, dtype, backend, device)


def check_loss(base, act, out_act, pos_offset, dtype, backend, device):
    """Value and every gradient of the fused loss op on ``base`` vs the float64 reference."""
    f32 = dtype == torch.float32
    p = cast(base, dtype, device, requires_grad=True)
    r = cast(base, torch.float64, "cpu", requires_grad=True)
    c = coefficients(pos_offset, positive=f32)
    kw = dict(activation=act, out_activation=out_act, pos_offset=pos_offset)
    got = fe.pair_mlp_loss(**p, backend=backend, **kw, **c)
    exp = ref_loss(r, act, out_act, pos_offset, **c)
    assert got.shape == () and got.dtype == dtype
    same = None
    if dtype != torch.float64:
        r32 = cast(base, dtype, "cpu", requires_grad=True)
        loss32 = ref_loss(r32, act, out_act, pos_offset, **c)
        same = [loss32, *grads_of(loss32, r32)]
    assert_all_close([got, *grads_of(got, p)], [exp, *grads_of(exp, r)], TOL[dtype],
                     ["loss", *leaf_names(p)], same,
                     [ref_loss_floor(r, act, out_act, pos_offset, **c)])


# ------------------------------------------------------------------------------------------------
# Against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,M,H,L,act,out_act,pos_offset", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_stats_small_matches_reference(N, M, H, L, act, out_act, pos_offset, dtype, backend,
                                       device):
    check_stats_against_reference(N, M, H, L, act, out_act, pos_offset, dtype, backend, device)


@pytest.mark.parametrize("N,M,H,L,act,out_act,pos_offset", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_loss_small_matches_reference(N, M, H, L, act, out_act, pos_offset, dtype, backend, device):
    check_loss_against_reference(N, M, H, L, act, out_act, pos_offset, dtype, backend, device)


# Bigger than the CPU kernel's default tiles (column-tiled strips, several strips and slots).
def test_inputs_on_another_gpu_than_the_current_one(backend, device):
    """The ops run on their inputs' GPU whichever device is current: the CUDA ops hold a device
    guard, and the Triton ops make the inputs' device current for their launches (Triton launches
    on the current device and stream)."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip("needs a GPU backend and two GPUs")
    other = torch.device("cuda", 1)
    with torch.cuda.device(0):
        check_stats_against_reference(37, 53, 29, 1, "relu", "none", 0, torch.float64, backend,
                                      other)
        check_loss_against_reference(37, 53, 29, 2, "tanh", "softplus", 3, torch.float64,
                                     backend, other)
        out = run_stats(cast(make_core(5, 6, 7, 1), torch.float64, other), backend)
        assert torch.cuda.current_device() == 0
    assert all(x.device == other for x in out)


LARGE = [
    pytest.param(9, 400, 128, 1, "relu", "none", 17, id="L1-relu"),
    pytest.param(40, 150, 48, 2, "tanh", "softplus", 3, id="L2-tanh"),
    pytest.param(33, 700, 64, 0, "relu", "softplus", None, id="L0-relu"),
]


@pytest.mark.parametrize("N,M,H,L,act,out_act,pos_offset", LARGE)
def test_stats_large_matches_reference(N, M, H, L, act, out_act, pos_offset, backend, device):
    check_stats_against_reference(N, M, H, L, act, out_act, pos_offset, torch.float64, backend,
                                  device)


@pytest.mark.parametrize("N,M,H,L,act,out_act,pos_offset", LARGE)
def test_loss_large_matches_reference(N, M, H, L, act, out_act, pos_offset, backend, device):
    check_loss_against_reference(N, M, H, L, act, out_act, pos_offset, torch.float64, backend,
                                 device)


def test_loss_large_float32(backend, device):
    check_loss_against_reference(64, 96, 128, 1, "relu", "none", 0, torch.float32, backend, device)


# A tiny buffer budget forces tiles of a few pairs (stats, recomputing backward) and, in the loss
# op, the column-chunked fallback with its recomputing second pass.
@pytest.mark.parametrize(
    "L,act,out_act", [(0, "relu", "none"), (0, "tanh", "softplus"), (1, "relu", "softplus"),
                      (2, "tanh", "none")],
)
@pytest.mark.parametrize("budget", [1, 700, 3000])
def test_small_budget_tiles_and_loss_fallback(L, act, out_act, budget, backend, device,
                                              monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, str(budget))
    check_loss_against_reference(7, 13, 19, L, act, out_act, 3, torch.float64, backend, device)
    check_stats_against_reference(7, 13, 19, L, act, out_act, 3, torch.float64, backend, device)


def test_bad_budget_env_rejected(backend, device, monkeypatch):
    if backend != "cpu":
        pytest.skip("the buffer budget is a CPU-kernel setting")
    monkeypatch.setenv(BUDGET_ENV, "lots")
    p = make_core(3, 4, 5, 1, device=device)
    with pytest.raises(ValueError, match=BUDGET_ENV):
        fe.pair_mlp_stats(**p, backend=backend)


def test_softplus_threshold(backend, device):
    # Scores straddle softplus' threshold 20 (x > 20 -> x) in both the forward and the backward.
    base = make_core(6, 11, 9, 1, score_shift=20.0)
    for check in (check_stats, check_loss):
        check(base, "relu", "softplus", 1, torch.float64, backend, device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_softplus_of_negative_scores(dtype, backend, device):
    # Scores about -10 to -4: softplus(t) = log(1 + e^t) with e^t ~ 1e-4..1e-2, where
    # log(1 + e) in float32 cancels (Triton's was 5e-4 off at t = -9 against torch's log1p).
    base = make_core(6, 11, 9, 1, score_shift=-7.0)
    for check in (check_stats, check_loss):
        check(base, "relu", "softplus", 1, dtype, backend, device)


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1e-8), (torch.float32, 1e-3)],
                         ids=["f64", "f32"])
@pytest.mark.parametrize("L", [0, 1])
def test_tanh_of_small_preactivations(L, dtype, scale, backend, device):
    # Every pre-activation and score ~scale: tanh(z) = (1 - e) / (1 + e), e = exp(-2|z|), cancels
    # there (relative error eps / 2|z|: Triton's was 3e-9 off in float64 at 1e-8, 3e-5 in float32
    # at 1e-3, where torch.tanh is exact). Small scores put the error in the statistics too.
    base = make_core(6, 11, 9, L)
    for key in ("A", "B", "b_out"):
        base[key] = base[key] * scale
    base["hidden_biases"] = [b * scale for b in base["hidden_biases"]]
    for check in (check_stats, check_loss):
        check(base, "tanh", "none", 1, dtype, backend, device)


@pytest.mark.parametrize("b_out", [float("inf"), float("-inf")])
def test_softplus_of_infinite_scores(b_out, backend, device):
    # softplus(-inf) = 0 (every score 0: finite statistics, zero gradients), softplus(inf) = inf.
    base = make_core(4, 6, 5, 1)
    base["b_out"] = torch.tensor(b_out, dtype=torch.float64)
    check_stats_nonfinite(base, "relu", "softplus", 0, backend, device)


@pytest.mark.parametrize("side", ["A", "B"])
@pytest.mark.parametrize("L", [0, 1])
def test_tanh_of_an_infinite_input(L, side, backend, device):
    # tanh(inf) = 1: an infinite entry of A or B leaves every score and gradient finite (tanh' = 0
    # there). A tile's padding pairs beside it must not turn it NaN (the Triton backward loaded
    # the padding as -inf, for relu's sake: inf + -inf).
    base = make_core(3, 5, 4, L)
    base[side][1, 2] = float("inf")
    exp_g = check_stats_nonfinite(base, "tanh", "none", 1, backend, device)
    assert all(torch.isfinite(g).all() for g in exp_g)  # not vacuous: the reference is finite
    check_loss_nonfinite(base, "tanh", "none", 1, backend, device)


def check_stats_nonfinite(base, act, out_act, pos_offset, backend, device):
    """The stats op and its gradients on ``base`` (float64) have the reference's NaN and Inf
    positions and finite values; returns the reference's gradients."""
    p = cast(base, torch.float64, device, requires_grad=True)
    r = cast(base, torch.float64, "cpu", requires_grad=True)
    got = run_stats(p, backend, activation=act, out_activation=out_act, pos_offset=pos_offset)
    exp = ref_stats(r, act, out_act, pos_offset)
    for a, e, name in zip(got, exp, ("lse", "pos", "rowsum")):
        assert_nonfinite_pattern_equal(a, e, name)
    g = upstream(base["A"].shape[0], torch.float64, "cpu")
    exp_g = grads_of(stats_objective(exp, g), r)
    for a, e, name in zip(grads_of(stats_objective(got, [x.to(device) for x in g]), p), exp_g,
                          leaf_names(p)):
        assert_nonfinite_pattern_equal(a, e, name)
    return exp_g


def check_loss_nonfinite(base, act, out_act, pos_offset, backend, device):
    """The loss op's gradients on ``base`` (float64) have the reference's NaN and Inf positions
    and finite values."""
    kw = dict(activation=act, out_activation=out_act, pos_offset=pos_offset)
    p = cast(base, torch.float64, device, requires_grad=True)
    r = cast(base, torch.float64, "cpu", requires_grad=True)
    c = coefficients(pos_offset)
    got_l = fe.pair_mlp_loss(**p, backend=backend, **kw, **c)
    exp_l = ref_loss(r, act, out_act, pos_offset, **c)
    for a, e, name in zip(grads_of(got_l, p), grads_of(exp_l, r), leaf_names(p)):
        assert_nonfinite_pattern_equal(a, e, "loss " + name)


# ------------------------------------------------------------------------------------------------
# Public critic-level functions (first layer u w_u^T, v w_v^T + b_0 included)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L,act,out_act,pos_offset", [
    (0, "relu", "none", 0), (1, "tanh", "softplus", 2), (2, "relu", "none", None),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_concat_critic_public_small(L, act, out_act, pos_offset, dtype, backend, device):
    N, M, du, dv, H = 7, 13, 5, 3, 19
    f32 = dtype == torch.float32
    base = make_concat(N, M, du, dv, H, L, b_out_shape=(1,), score_shift=2.0 if f32 else 0.0)
    p = cast(base, dtype, device, requires_grad=True)
    r = cast(base, torch.float64, "cpu", requires_grad=True)
    kw = dict(activation=act, out_activation=out_act, pos_offset=pos_offset)
    tol = TOL[dtype]
    names = leaf_names(p)

    r32 = cast(base, dtype, "cpu", requires_grad=True) if dtype != torch.float64 else None

    got = fe.concat_critic_stats(**p, backend=backend, **kw)
    assert isinstance(got, fe.CriticStats)
    g = upstream(N, torch.float64, "cpu", positive=f32)

    def ref_run(q):
        stats = ref.concat_critic_stats(**q, **kw)
        grads = grads_of(stats_objective(stats, [x.to(q["u"].dtype) for x in g]), q)
        return [*stats, *grads]

    got_all = [*got, *grads_of(stats_objective(got, [x.to(device, dtype) for x in g]), p)]
    assert_all_close(got_all, ref_run(r), tol, ["lse", "pos", "rowsum", *names],
                     ref_run(r32) if r32 is not None else None)

    c = coefficients(pos_offset, positive=f32)

    def ref_loss_run(q):
        lse, pos, rowsum = ref.concat_critic_stats(**q, **kw)
        loss = (c["c_lse"] * lse + c["c_pos"] * pos + c["c_rowsum"] * rowsum).sum()
        return [loss, *grads_of(loss, q)]

    got = fe.concat_critic_loss(**p, backend=backend, **kw, **c)
    got_all = [got, *grads_of(got, p)]
    assert got_all[1 + names.index("b_out")].shape == (1,)
    floor = loss_floor(c.values(), ref.concat_critic_stats(**r, **kw))
    assert_all_close(got_all, ref_loss_run(r), tol, ["loss", *names],
                     ref_loss_run(r32) if r32 is not None else None, [floor])


def test_infonce_and_club_bounds_from_fused_loss(backend, device):
    # The documented coefficient choices give the negative InfoNCE bound and NCE-CLUB.
    import math

    N, M = 8, 8
    base = make_concat(N, M, 5, 3, 19, 1)
    p = cast(base, torch.float64, device)
    r = cast(base, torch.float64, "cpu")
    lse, pos, rowsum = ref.concat_critic_stats(**r)
    nce = fe.concat_critic_loss(**p, c_lse=1 / N, c_pos=-1 / N, backend=backend) - math.log(M)
    assert_rel_close(nce, -fe.infonce_lower_bound(lse, pos, M), 1e-10, "-I_NCE",
                     infonce_floor(lse, pos, M))
    club = fe.concat_critic_loss(**p, c_pos=1 / N, c_rowsum=-1 / (N * M), backend=backend)
    assert_rel_close(club, fe.nce_club_upper_bound(pos, rowsum, M), 1e-10, "I_CLUB",
                     club_floor(pos, rowsum, M))


# ------------------------------------------------------------------------------------------------
# Loss op against the stats op; gradcheck; opcheck; torch.compile
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_first", [True, False], ids=["loss-first", "stats-first"])
@pytest.mark.parametrize("L,pos_offset", [(0, 1), (1, None), (2, 0)])
def test_loss_matches_stats_op(loss_first, L, pos_offset, backend, device):
    base = make_core(9, 14, 13, L)
    c = coefficients(pos_offset)
    kw = dict(activation="tanh", out_activation="softplus", pos_offset=pos_offset,
              backend=backend)

    def via_loss():
        p = cast(base, torch.float64, device, requires_grad=True)
        loss = fe.pair_mlp_loss(**p, **kw, **c)
        return loss, grads_of(loss, p)

    def via_stats():
        p = cast(base, torch.float64, device, requires_grad=True)
        lse, pos, rowsum = fe.pair_mlp_stats(**p, **kw)
        loss = (c["c_lse"] * lse + c["c_pos"] * pos + c["c_rowsum"] * rowsum).sum()
        return loss, grads_of(loss, p)

    if loss_first:
        a, b = via_loss(), via_stats()
    else:
        b, a = via_stats(), via_loss()
    floor = ref_loss_floor(cast(base, torch.float64, "cpu"), "tanh", "softplus", pos_offset, **c)
    assert_rel_close(a[0], b[0], 1e-12, "loss", floor)
    assert_all_close(a[1], b[1], 1e-12, leaf_names(base))


def test_loss_without_grad_mode(backend, device):
    p = make_core(5, 8, 7, 1, device=device)
    c = coefficients(2)
    with torch.no_grad():
        got = fe.pair_mlp_loss(**p, pos_offset=2, backend=backend, **c)
    r = cast(p, torch.float64, "cpu")
    exp = ref_loss(r, "relu", "none", 2, **c)
    assert_rel_close(got, exp, 1e-10, "loss", ref_loss_floor(r, "relu", "none", 2, **c))


@pytest.mark.parametrize("op", ["stats", "loss"])
def test_inference_mode_inputs_with_trainable_weights(op, backend, device):
    """A and B made under torch.inference_mode (features of a frozen encoder), weights that
    require grad: the recomputing backward needs A and B, which PyTorch cannot save as they are;
    the reference needs only the weights, and so must the fused ops."""
    base = make_core(9, 13, 11, 1)
    p = cast(base, torch.float64, device, requires_grad=True)
    with torch.inference_mode():
        p["A"], p["B"] = p["A"].detach().clone(), p["B"].detach().clone()
    assert p["A"].is_inference() and p["B"].is_inference()
    r = cast(base, torch.float64, "cpu", requires_grad=True)
    trained = {k: v for k, v in p.items() if k not in ("A", "B")}
    ref_trained = {k: v for k, v in r.items() if k not in ("A", "B")}
    kw = dict(activation="tanh", out_activation="softplus", pos_offset=3)
    stats = ref_stats(r, **kw)
    if op == "stats":
        g = upstream(9, torch.float64, "cpu")
        got = stats_objective(run_stats(p, backend, **kw), [x.to(device) for x in g])
        exp = stats_objective(stats, g)
        floor = signed_sum_floor(*(x * st for x, st in zip(g, stats)))
    else:
        c = coefficients(3)
        got = fe.pair_mlp_loss(**p, backend=backend, **kw, **c)
        exp = ref_loss(r, **kw, **c)
        floor = loss_floor(c.values(), stats)
    assert_all_close([got, *grads_of(got, trained)], [exp, *grads_of(exp, ref_trained)], 1e-10,
                     ["objective", *leaf_names(trained)], floors=[floor])


@pytest.mark.parametrize("L", [0, 1, 2])
def test_gradcheck_small(L, backend, device):
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("minutes under the Triton interpreter; tests/test_triton.py checks every "
                    "gradient against the float64 reference")
    base = make_core(3, 5, 4, L)
    p = cast(base, torch.float64, device, requires_grad=True)
    names = list(p)
    nw = len(p["hidden_weights"])

    def unpack(args):
        it = iter(args)
        out = {}
        for k in names:
            is_list = k in ("hidden_weights", "hidden_biases")
            out[k] = [next(it) for _ in range(nw)] if is_list else next(it)
        return out

    kw = dict(activation="tanh", out_activation="softplus", pos_offset=1, backend=backend)

    def stats_fn(*args):
        return tuple(fe.pair_mlp_stats(**unpack(args), **kw))

    def loss_fn(*args):
        return fe.pair_mlp_loss(**unpack(args), c_lse=0.7, c_pos=-1.3, c_rowsum=0.2, **kw)

    assert torch.autograd.gradcheck(stats_fn, tuple(leaves(p)), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(loss_fn, tuple(leaves(p)), eps=1e-6, atol=1e-7)


def _core_op(backend, name):
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.factorcl, name).default
    pytest.skip(f"opcheck covers the torch.ops.factorcl ops; backend {backend} has its own")


@pytest.mark.parametrize("L,pos_offset", [(0, 0), (2, None)])
def test_opcheck_stats(L, pos_offset, backend, device):
    op = _core_op(backend, "pair_mlp_stats")
    p = cast(make_core(4, 6, 5, L), torch.float64, device, requires_grad=True)
    args = (p["A"], p["B"], p["hidden_weights"], p["hidden_biases"], p["w_out"], p["b_out"],
            "tanh", "softplus", pos_offset)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("compute_grad", [True, False])
@pytest.mark.parametrize("L,pos_offset", [(0, 1), (1, None)])
def test_opcheck_loss(compute_grad, L, pos_offset, backend, device):
    op = _core_op(backend, "pair_mlp_loss")
    p = cast(make_core(4, 6, 5, L), torch.float64, device, requires_grad=compute_grad)
    c_pos = 0.0 if pos_offset is None else -0.5
    args = (p["A"], p["B"], p["hidden_weights"], p["hidden_biases"], p["w_out"], p["b_out"],
            "relu", "none", pos_offset, 0.25, c_pos, 0.125, compute_grad)
    torch.library.opcheck(op, args)


def test_opcheck_stats_backward(backend, device):
    op = _core_op(backend, "pair_mlp_stats_backward")
    p = cast(make_core(4, 6, 5, 1), torch.float64, device)
    lse = ref_stats(cast(p, torch.float64, "cpu"), "relu", "none", 0)[0].to(device)
    g = upstream(4, torch.float64, device)
    args = (*g, p["A"], p["B"], p["hidden_weights"], p["hidden_biases"], p["w_out"], p["b_out"],
            lse, "relu", "none", 0)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", ["pair_mlp_stats_backward", "pair_mlp_loss"])
def test_opcheck_strided_inputs(name, backend, device):
    # Gradients laid out like their inputs, as the fake kernels' empty_like says: torch.compile
    # of a critic with a transposed hidden weight failed on the CPU backend's contiguous ones.
    op = _core_op(backend, name)
    base = make_core(4, 6, 5, 1)
    v = strided_views(base, device)
    core = (v["A"], v["B"], v["hidden_weights"], v["hidden_biases"], v["w_out"], v["b_out"])
    if name == "pair_mlp_loss":
        args = (*core, "relu", "none", 0, 0.25, -0.5, 0.125, True)
    else:
        lse = ref_stats(base, "relu", "none", 0)[0].to(device)
        args = (*upstream(4, torch.float64, device), *core, lse, "relu", "none", 0)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backward_inside", [False, True], ids=["fwd", "fwd+bwd"])
def test_torch_compile_fullgraph(backward_inside, backend, device):
    # aot_eager: dynamo + AOTAutograd over the fake kernels and the autograd registration (what a
    # graph break would come from) without inductor's C++ compile time.
    base = make_concat(6, 9, 5, 3, 11, 1)
    kw = dict(c_lse=1 / 6, c_pos=-1 / 6, activation="relu", out_activation="none", pos_offset=2,
              backend=backend)

    def step(p):
        loss = fe.concat_critic_loss(**p, **kw)
        if backward_inside:
            loss.backward()
            return loss.detach()
        return loss

    p1 = cast(base, torch.float64, device, requires_grad=True)
    p2 = cast(base, torch.float64, device, requires_grad=True)
    eager = step(p1)
    if not backward_inside:
        eager.backward()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=backward_inside):
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(p2)
    if not backward_inside:
        got.backward()
    assert_rel_close(got, eager, 1e-12, "loss")
    for a, b, name in zip(leaves(p2), leaves(p1), leaf_names(p1)):
        assert a.grad is not None, name
        assert_rel_close(a.grad, b.grad, 1e-12, f"{name}.grad")


@pytest.mark.parametrize("op", ["stats", "loss"])
def test_second_derivative_raises_instead_of_zeros(op, backend, device):
    """The hand-written backward is first-order: with create_graph=True the gradient is the same,
    and differentiating it again raises (PyTorch would otherwise treat the backward kernels as
    constants and return zeros for their part of a second derivative)."""
    p = cast(make_concat(5, 8, 4, 3, 9, 1), torch.float64, device, requires_grad=True)

    def objective():
        if op == "stats":
            st = fe.concat_critic_stats(**p, pos_offset=1, backend=backend)
            return (st.lse - 0.5 * st.pos + 0.1 * st.rowsum).sum()
        return fe.concat_critic_loss(**p, c_lse=1.0, c_pos=-0.5, c_rowsum=0.1, pos_offset=1,
                                     backend=backend)

    plain = grads_of(objective(), p)
    graphed = torch.autograd.grad(objective(), leaves(p), create_graph=True)
    for a, b, name in zip(graphed, plain, leaf_names(p)):
        assert torch.equal(a.detach(), b), name
    penalty = sum((g**2).sum() for g in graphed[:2])  # d/du and d/dv: through the first layer too
    for wrt in (p["u"], p["hidden_weights"][0]):
        with pytest.raises(RuntimeError, match="first-order only.*backend='reference'"):
            torch.autograd.grad(penalty, wrt, retain_graph=True)
    # The reference backend differentiates twice: a finite, nonzero second derivative.
    st = fe.concat_critic_stats(**p, pos_offset=1, backend="reference")
    (gu,) = torch.autograd.grad(st.lse.sum(), p["u"], create_graph=True)
    (guu,) = torch.autograd.grad((gu**2).sum(), p["u"])
    assert torch.isfinite(guu).all() and guu.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Layout, NaN/Inf, determinism
# ------------------------------------------------------------------------------------------------


def strided_views(base, device):
    """``base``'s core arguments as the same values behind transposed and strided views."""
    M, H = base["B"].shape
    At = base["A"].t().contiguous().t()
    Bs = torch.zeros(2 * M, H + 3, dtype=torch.float64)
    Bs[::2, 1 : H + 1] = base["B"]
    wo = torch.zeros(3 * H, dtype=torch.float64)
    wo[::3] = base["w_out"]
    views = {
        "A": At.to(device), "B": Bs.to(device)[::2, 1 : H + 1],
        "hidden_weights": [w.t().contiguous().to(device).t() for w in base["hidden_weights"]],
        "hidden_biases": [torch.stack([b, b], 1).to(device)[:, 1] for b in base["hidden_biases"]],
        "w_out": wo.to(device)[::3], "b_out": base["b_out"].to(device),
    }
    assert not views["A"].is_contiguous() and not views["B"].is_contiguous()
    assert not views["hidden_weights"][0].is_contiguous() and not views["w_out"].is_contiguous()
    return views


def test_non_contiguous_inputs(backend, device):
    N, M, H, L = 7, 13, 19, 2
    base = make_core(N, M, H, L)
    views = strided_views(base, device)
    kw = dict(activation="relu", out_activation="softplus", pos_offset=4)
    exp = ref_stats(base, "relu", "softplus", 4)
    assert_all_close(fe.pair_mlp_stats(**views, backend=backend, **kw), exp, 1e-10,
                     ("lse", "pos", "rowsum"))
    c = coefficients(4)
    v = cast(views, torch.float64, device, requires_grad=True)  # .to keeps the strides
    r = cast(base, torch.float64, "cpu", requires_grad=True)
    got = fe.pair_mlp_loss(**v, backend=backend, **kw, **c)
    ex = ref_loss(r, "relu", "softplus", 4, **c)
    assert_rel_close(got, ex, 1e-10, "loss", ref_loss_floor(r, "relu", "softplus", 4, **c))
    assert_all_close(grads_of(got, v), grads_of(ex, r), 1e-10, leaf_names(base))


@pytest.mark.parametrize("L,act", [(0, "relu"), (0, "tanh"), (1, "relu"), (2, "tanh")])
def test_nan_in_a_row_propagates(L, act, backend, device):
    N, M, H, k = 6, 9, 7, 3
    base = make_core(N, M, H, L)
    base["A"][k, 2] = float("nan")
    kw = dict(activation=act, out_activation="none", pos_offset=1)
    p = cast(base, torch.float64, device, requires_grad=True)
    r = cast(base, torch.float64, "cpu", requires_grad=True)
    got, exp = run_stats(p, backend, **kw), ref_stats(r, act, "none", 1)
    for a, e, name in zip(got, exp, ("lse", "pos", "rowsum")):
        assert torch.isnan(a[k]) and torch.isfinite(torch.cat([a[:k], a[k + 1:]])).all(), name
        assert_nonfinite_pattern_equal(a, e, name)
    # Gradients: row k's dA is what the reference gives; the other rows stay finite.
    g = upstream(N, torch.float64, "cpu")
    got_g = grads_of(stats_objective(got, [x.to(device) for x in g]), p)
    exp_g = grads_of(stats_objective(exp, g), r)
    for a, e, name in zip(got_g, exp_g, leaf_names(p)):
        assert_nonfinite_pattern_equal(a, e, name)
    c = coefficients(1)
    got_l = fe.pair_mlp_loss(**p, backend=backend, **kw, **c)
    exp_l = ref_loss(r, act, "none", 1, **c)
    assert torch.isnan(got_l) and torch.isnan(exp_l)
    for a, e, name in zip(grads_of(got_l, p), grads_of(exp_l, r), leaf_names(p)):
        assert_nonfinite_pattern_equal(a, e, name)


@pytest.mark.parametrize("L,where", [(0, "w_out"), (1, "w_out"), (2, "w_out"), (1, "hidden"),
                                     (2, "hidden")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_weight_follows_relu_mask(L, where, bad, backend, device):
    # Every score is NaN; relu's backward keeps the NaN out of a unit that is off for every pair,
    # which a padding row of a tile turns on (conftest.nonfinite_weight_core): stats, gradients
    # and the loss op's gradients have the reference's NaN pattern and finite values.
    k = NONFINITE_UNIT
    base = nonfinite_weight_core(6, 9, 7, L, where, bad)
    exp_g = check_stats_nonfinite(base, "relu", "none", 1, backend, device)
    # not vacuous: the unit's gradients are finite zeros in the reference, dB[:, 0] NaN
    gate = nonfinite_gated_layer(L, where)
    unit = exp_g[1][:, k] if gate == 0 else exp_g[2 + gate - 1][k]
    assert torch.equal(unit, torch.zeros_like(unit)) and exp_g[1][:, 0].isnan().all()
    check_loss_nonfinite(base, "relu", "none", 1, backend, device)


@pytest.mark.parametrize("b_out", [float("inf"), float("-inf")])
def test_infinite_scores_keep_their_sign(b_out, backend, device):
    # All scores +-inf: logsumexp must be +-inf (never NaN or a finite number from max-shifting).
    base = make_core(4, 6, 5, 1)
    base["b_out"] = torch.tensor(b_out, dtype=torch.float64)
    got = run_stats(cast(base, torch.float64, device), backend, pos_offset=0)
    exp = ref_stats(base, "relu", "none", 0)
    for a, e, name in zip(got, exp, ("lse", "pos", "rowsum")):
        assert torch.isinf(e).all()
        assert_nonfinite_pattern_equal(a, e, name)
        assert torch.equal(torch.sign(a.cpu()), torch.sign(e)), name


@pytest.mark.parametrize("L", [0, 1, 2])
def test_deterministic_bitwise(L, backend, device):
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter runs one program at a time: nothing to race")
    # Enough rows for several strips and slots on the CPU kernel.
    base = make_core(66, 81, 24, L)
    c = coefficients(5)
    g = upstream(66, torch.float32, device)
    kw = dict(activation="relu", out_activation="softplus", pos_offset=5, backend=backend,
              deterministic=True)  # Triton's default dB reduction uses float32 atomics

    def once():
        p = cast(base, torch.float32, device, requires_grad=True)
        stats = fe.pair_mlp_stats(**p, **kw)
        sg = grads_of(stats_objective(stats, g), p)
        loss = fe.pair_mlp_loss(**p, **kw, **c)
        return [*stats, *sg, loss, *grads_of(loss, p)]

    first, second = once(), once()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i} differs between two runs"


# ------------------------------------------------------------------------------------------------
# Bad input: a ValueError / TypeError naming the argument (DESIGN.md section 6)
# ------------------------------------------------------------------------------------------------


def _set(key, fn):
    def mutate(p):
        p[key] = fn(p)

    return mutate


def _all_bf16(p):
    for k, v in p.items():
        p[k] = [t.bfloat16() for t in v] if isinstance(v, list) else v.bfloat16()


def _set_list(key, i, fn):
    def mutate(p):
        p[key] = list(p[key])
        p[key][i] = fn(p)

    return mutate


CORE_BAD = [
    ("A-rank", _set("A", lambda p: p["A"][0]), {}, ValueError, r"A must have 2 dimension"),
    ("B-rank", _set("B", lambda p: p["B"][None]), {}, ValueError, r"B must have 2 dimension"),
    ("A-not-tensor", _set("A", lambda p: p["A"].tolist()), {}, TypeError,
     r"A must be a torch.Tensor"),
    ("A-sparse", _set("A", lambda p: p["A"].to_sparse()), {}, TypeError,
     r"A must be a dense \(strided\) tensor, got layout torch.sparse_coo"),
    ("width-mismatch", _set("B", lambda p: torch.randn(6, 4, dtype=p["A"].dtype)), {}, ValueError,
     r"A has shape \(4, 5\) and B \(6, 4\)"),
    ("hidden-weight-shape", _set_list("hidden_weights", 0, lambda p: p["hidden_weights"][0][:, :4]),
     {}, ValueError, r"hidden layer 0"),
    ("hidden-count", _set("hidden_biases", lambda p: []), {}, ValueError,
     r"hidden_weights has 1 layers but hidden_biases has 0"),
    ("w_out-shape", _set("w_out", lambda p: p["w_out"][:3]), {}, ValueError, r"w_out"),
    ("b_out-shape", _set("b_out", lambda p: torch.zeros(2, dtype=p["A"].dtype)), {}, ValueError,
     r"b_out"),
    ("mixed-dtype", _set("B", lambda p: p["B"].float()), {}, TypeError,
     r"B has dtype torch.float32"),
    ("mixed-dtype-weight", _set_list("hidden_weights", 0, lambda p: p["hidden_weights"][0].float()),
     {}, TypeError, r"hidden_weights\[0\] has dtype"),
    ("bf16", _all_bf16, {}, TypeError, r"dtype torch.bfloat16"),
    ("empty-batch", _set("A", lambda p: p["A"][:0]), {}, ValueError, r"empty batch"),
    ("pos-too-big", None, {"pos_offset": 3}, ValueError, r"pos_offset=3 is out of range"),
    ("pos-negative", None, {"pos_offset": -1}, ValueError, r"pos_offset=-1"),
    ("pos-bool", None, {"pos_offset": True}, TypeError, r"pos_offset must be an int"),
    ("pos-float", None, {"pos_offset": 1.0}, TypeError, r"pos_offset must be an int"),
    ("activation", None, {"activation": "gelu"}, ValueError, r"activation must be one of"),
    ("out_activation", None, {"out_activation": "sigmoid"}, ValueError,
     r"out_activation must be one of"),
]


@pytest.mark.parametrize("fn_name", ["pair_mlp_stats", "pair_mlp_loss"])
@pytest.mark.parametrize("case", CORE_BAD, ids=[c[0] for c in CORE_BAD])
def test_bad_core_input_raises(case, fn_name, backend, device):
    _, mutate, kwargs, exc, match = case
    if case[0] == "bf16" and torch.device(device).type != "cpu":
        pytest.skip("bfloat16 is supported on GPU")
    p = make_core(4, 6, 5, 1, device=device)
    if mutate is not None:
        mutate(p)
    with pytest.raises(exc, match=match):
        getattr(fe, fn_name)(**p, backend=backend, **kwargs)


CONCAT_BAD = [
    ("u-rank", _set("u", lambda p: p["u"][0]), {}, ValueError, r"u must have 2 dimension"),
    ("w_u-shape", _set("w_u", lambda p: p["w_u"][:, :2]), {}, ValueError, r"w_u has shape"),
    ("w_v-shape", _set("w_v", lambda p: p["w_v"][:4]), {}, ValueError, r"w_v has shape"),
    ("b_0-shape", _set("b_0", lambda p: p["b_0"][:2]), {}, ValueError, r"b_0 must have shape"),
    ("empty-v", _set("v", lambda p: p["v"][:0]), {}, ValueError, r"empty batch"),
    ("mixed-dtype", _set("v", lambda p: p["v"].float()), {}, TypeError, r"v has dtype"),
    ("c_pos-without-positives", None, {"pos_offset": None, "c_pos": 1.0}, ValueError, r"c_pos"),
    ("c_lse-type", None, {"c_lse": "1"}, TypeError, r"c_lse must be a float"),
]


def test_bad_bound_input_raises():
    # the bounds take one batch's per-row statistics (a shorter rowsum averaged silently)
    pos = torch.randn(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"rowsum has shape \(2,\) but pos has \(3,\)"):
        fe.nce_club_upper_bound(pos, torch.randn(2, dtype=torch.float64), 5)
    with pytest.raises(ValueError, match=r"rowsum must have 1 dimension\(s\), got shape \(\)"):
        fe.nce_club_upper_bound(pos, torch.tensor(1.0), 5)
    with pytest.raises(TypeError, match="lse must be a torch.Tensor, got list"):
        fe.infonce_lower_bound([1.0, 2.0, 3.0], pos, 5)
    with pytest.raises(ValueError, match=r"pos has shape \(3,\) but lse has \(4,\)"):
        fe.infonce_lower_bound(torch.randn(4), pos, 5)


@pytest.mark.parametrize("case", CONCAT_BAD, ids=[c[0] for c in CONCAT_BAD])
def test_bad_concat_input_raises(case, backend, device):
    _, mutate, kwargs, exc, match = case
    p = make_concat(4, 6, 5, 3, 7, 1, device=device)
    if mutate is not None:
        mutate(p)
    with pytest.raises(exc, match=match):
        fe.concat_critic_loss(**p, backend=backend, **kwargs)


# The C++ kernels check again (second line) when called past the Python layer.
CPP_BAD = [
    ("A-rank", _set("A", lambda p: p["A"][0]), {}, ValueError, r"A must have 2 dimensions"),
    ("width", _set("B", lambda p: p["B"][:, :3]), {}, ValueError, r"widths must agree"),
    ("mixed-dtype", _set("w_out", lambda p: p["w_out"].float()), {}, TypeError, r"w_out has dtype"),
    ("bf16", _all_bf16, {}, TypeError, r"A has dtype"),
    ("empty", _set("B", lambda p: p["B"][:0]), {}, ValueError, r"empty batch"),
    ("pos", None, {"pos_offset": 5}, ValueError, r"pos_offset=5 is out of range"),
    ("activation", None, {"activation": "gelu"}, ValueError, r"activation must be one of"),
    ("out_activation", None, {"out_activation": "exp"}, ValueError, r"out_activation"),
    ("hidden", _set("hidden_biases", lambda p: [p["hidden_biases"][0][:2]]), {}, ValueError,
     r"hidden layer 0"),
]


@pytest.mark.parametrize("op_name", ["pair_mlp_stats", "pair_mlp_loss", "pair_mlp_stats_backward"])
@pytest.mark.parametrize("case", CPP_BAD, ids=[c[0] for c in CPP_BAD])
def test_bad_input_cpp_second_line(case, op_name, backend, device):
    if backend != "cpu":
        pytest.skip("checks of the C++ CPU kernels")
    _, mutate, kwargs, exc, match = case
    p = make_core(4, 6, 5, 1)
    if mutate is not None:
        mutate(p)
    cfg = {"activation": "relu", "out_activation": "none", "pos_offset": 1, **kwargs}
    core = (p["A"], p["B"], p["hidden_weights"], p["hidden_biases"], p["w_out"], p["b_out"],
            cfg["activation"], cfg["out_activation"], cfg["pos_offset"])
    op = getattr(torch.ops.factorcl, op_name)
    with pytest.raises(exc, match=match):
        if op_name == "pair_mlp_stats":
            op(*core)
        elif op_name == "pair_mlp_loss":
            op(*core, 1.0, 0.0, 0.0, True)
        else:
            g = torch.zeros(4, dtype=torch.float64)
            op(g, g, g, *core[:6], g, *core[6:])


@pytest.mark.parametrize("offset", [2**63 - 1, 2**63 - 4, 2**62])
def test_cpp_ops_refuse_offsets_whose_sum_overflows(backend, device, offset):
    """N + offset wrapped to a negative int64 and passed the range check: the CPU ops read out
    of bounds (a segmentation fault in pair_dot_stats with exclude_offset) or returned garbage.
    The Python wrappers refuse such offsets first; a direct torch.ops call meets the C++ check."""
    if backend != "cpu":
        pytest.skip("checks of the C++ CPU kernels")
    p = make_core(4, 6, 5, 1)
    core = (p["A"], p["B"], p["hidden_weights"], p["hidden_biases"], p["w_out"], p["b_out"])
    with pytest.raises(ValueError, match=f"pos_offset={offset} is out of range for 4 rows"):
        torch.ops.factorcl.pair_mlp_stats(*core, "relu", "none", offset)
    G, H = torch.randn(4, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    for pos, excl, name in ((offset, None, "pos_offset"), (None, offset, "exclude_offset")):
        with pytest.raises(ValueError, match=f"{name}={offset} is out of range for 4 rows"):
            torch.ops.factorcl.pair_dot_stats(G, H, pos, excl)


def test_bad_stats_backward_vectors_cpp(backend, device):
    if backend != "cpu":
        pytest.skip("checks of the C++ CPU kernels")
    p = make_core(4, 6, 5, 1)
    g = torch.zeros(4, dtype=torch.float64)
    core = (p["A"], p["B"], p["hidden_weights"], p["hidden_biases"], p["w_out"], p["b_out"])
    with pytest.raises(ValueError, match=r"grad_lse must have shape \(4,\)"):
        torch.ops.factorcl.pair_mlp_stats_backward(g[:3], g, g, *core, g, "relu", "none", 0)
    with pytest.raises(ValueError, match=r"lse must have shape \(4,\)"):
        torch.ops.factorcl.pair_mlp_stats_backward(g, g, g, *core, g[None], "relu", "none", 0)
