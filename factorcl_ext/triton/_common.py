"""Element-wise helpers shared by the Triton kernels (inlined into them by @triton.jit).

Activation codes: ``ACT`` 0 = relu, 1 = tanh; ``OUT`` 0 = none, 1 = softplus. Only core
``tl`` functions are used (no libdevice), so the same code runs under the interpreter.
"""

import triton
import triton.language as tl

ACT_CODES = {"relu": 0, "tanh": 1}
OUT_CODES = {"none": 0, "softplus": 1}
# 1/3 as a float32 value and the float32 value of the rest (tanh's series)
_THIRD_HI = tl.constexpr(0.3333333432674408)
_THIRD_LO = tl.constexpr(-9.934107758624577e-09)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        # NaN stays NaN, as in torch.relu; one max.NaN instruction on sm80+ where tl.where took
        # a compare and a select per element (the forward's K loop forms act(A_i + B_j) for every
        # pair and feature slice)
        return tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        # tanh through e = exp(-2|z|) <= 1 (no overflow for large |z|): (1 - e) / (1 + e). Below
        # |z| = 1/16, 1 - e cancels (relative error eps / 2|z|: 3e-5 at |z| = 1e-3 in float32),
        # so the Taylor series takes over there: to z^5 in float32 (next term 3e-9 relative at
        # 1/16), to z^9 in float64 (8e-15), whose literals, float32 constants, are float64-exact
        # where it matters: 1/3 goes in as two (high and low part); the later ones' rounding is
        # below 2e-13 of the result.
        a = tl.abs(z)
        e = tl.exp(-2.0 * a)
        a2 = a * a
        if z.dtype == tl.float64:
            q = 2.0 / 15.0 - a2 * (17.0 / 315.0 - a2 * (62.0 / 2835.0))
            p = (_THIRD_HI - a2 * q) + _THIRD_LO
        else:
            p = _THIRD_HI - a2 * (2.0 / 15.0)
        y = tl.where(a < 0.0625, a - a * a2 * p, (1.0 - e) / (1.0 + e))
        return tl.where(z < 0, -y, y)


@triton.jit
def _act_bwd(g, z, ACT: tl.constexpr):
    """Gradient through act at pre-activation z, as torch computes it (and so with its NaN
    pattern): relu selects, ``where(relu(z) <= 0, 0, g)``, so a NaN upstream gradient stays out of
    units that are off and a NaN unit passes it on; tanh multiplies by 1 - tanh(z)^2. The relu
    backward gives the padding pairs of a tile z = -inf (their g is 0 times a weight: NaN for a
    non-finite one, where the reference has no such pair), so relu keeps them out at no cost;
    with tanh a non-finite weight makes every gradient NaN in the reference too, and the first
    layer's padding stays 0 (_z0)."""
    if ACT == 0:
        return tl.where(z <= 0, 0.0, g)
    else:
        y = _act(z, 1)
        return g * (1.0 - y * y)


@triton.jit
def _out_act(t, OUT: tl.constexpr):
    if OUT == 0:
        return t
    else:
        # nn.Softplus(beta=1, threshold=20): identity above 20, log1p(exp(t)) below. log1p is
        # not a core tl function and log(1 + e) cancels for small e (5e-4 relative at t = -9 in
        # float32), so Goldberg's form log(u) * e / (u - 1), u = 1 + e: a few ulps given an
        # accurate log (tl.log is libdevice's, not lg2.approx), and e itself where u rounds to 1.
        e = tl.exp(tl.minimum(t, 20.0))
        u = 1.0 + e
        lp = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
        # a NaN score passes through (tl.minimum may drop it); -inf gives 0, as torch's
        return tl.where((t > 20.0) | (t != t), t, lp)


@triton.jit
def _out_act_grad(t, OUT: tl.constexpr):
    if OUT == 0:
        return tl.full(t.shape, 1.0, t.dtype)
    else:
        e = tl.exp(tl.minimum(t, 20.0))
        return tl.where(t > 20.0, 1.0, tl.where(t != t, t, e / (1.0 + e))).to(t.dtype)


@triton.jit
def _lse_step(m_run, shift, l_run, s_lse):
    """One column tile of the online logsumexp (masked scores are -inf): returns the running
    max, the shift of the running sum, and the sum of exp(s - shift); lse = shift + log(sum).
    The shift is the running max, or 0 when that is +-inf, as in torch.logsumexp, so a row of
    +inf (or -inf) scores gives +inf (-inf), not NaN."""
    m_new = tl.maximum(m_run, tl.max(s_lse, axis=1))
    shift_new = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)
    # nothing summed yet: skip the rescale, whose exp may overflow (0 * inf)
    scale = tl.where(l_run == 0.0, 0.0, tl.exp(shift - shift_new))
    l_new = l_run * scale + tl.sum(tl.exp(s_lse - shift_new[:, None]), axis=1)
    return m_new, shift_new, l_new


@triton.jit
def _block_range(n_blocks):
    """Blocks [lo, hi) of this program's share of ``n_blocks``: dealt out in num_programs(1)
    consecutive runs of equal length (the last ones may be short or empty). Programs of a
    forward or a backward row pass split their rows' columns so (_config.column_splits)."""
    per = tl.cdiv(n_blocks, tl.num_programs(1))
    lo = tl.program_id(1) * per
    return lo, tl.minimum(n_blocks, lo + per)


@triton.jit
def _column_range(M, BJ: tl.constexpr):
    """Columns [lo, hi) of this program's share of the column blocks of width BJ."""
    lo, hi = _block_range(tl.cdiv(M, BJ))
    return lo * BJ, tl.minimum(M, hi * BJ)


@triton.jit
def _row_offsets(r, width, I64: tl.constexpr):
    """Offsets ``r * width`` of rows r (a scalar, or indices shaped as the tile needs them) of a
    row-major matrix whose rows hold ``width`` elements. I64 (ops.py sets it for operands of
    2^31 elements or more: 4.2M rows of 512): in 64 bits, since r * width passes 2^31 there
    though r and width fit 32 bits (in 32 bits it wrapped to a negative address); else in 32
    bits, as before I64 (the same SASS for 381 of 388 variants, sm_90 / sm_80 compile check;
    benchmarks/README.md, session 21)."""
    if I64:
        return tl.cast(r, tl.int64) * width
    else:
        return r * width
