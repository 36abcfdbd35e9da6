"""Triton kernels of the separable critic's core op (DESIGN.md section 3): ``s = G H^T``.

Forward: row-block programs walk all column blocks (or a share of them, for small N:
_config.column_splits); each [BI, BJ] score tile is a tl.dot over BD-wide slices of the
embedding, consumed at once by the online logsumexp, the positive and the row sum (column
``i + exclude_offset`` left out of the last two). Nothing of size N*M is stored.

Plain tiles: a tile inside the matrix that holds no positive and no excluded pair (all but the
edge and diagonal tiles) takes an epilogue without masks (_plain_tile). Masks were most of a
tile's epilogue: per score an index compare, selects for -inf, 0 and the positive (sm_90 bf16,
128 x 128 tiles: about 1440 instructions per thread per tile after the K loop, against about
850 in the K loop itself); the masked epilogue remains for the other tiles.

Backward (recompute): ``dS_ij = (g_lse_i exp(s_ij - lse_i) + g_rowsum_i) [j not excluded]
+ g_pos_i [j == i + pos_offset]``, then ``dG = dS H`` and ``dH = dS^T G``, in one of two ways
(factorcl_ext/triton/_config.py, DOT_BWD_MODES):

- ``dot_ds_kernel`` writes dS for a chunk of rows (every column) into a bounded buffer in the
  input dtype, and cuBLAS forms both products from it (ops.py): the gradient products run at
  the dense matmul rate, with no read-modify-write of an accumulator per score tile;
- ``dot_bwd_kernel``: row-block programs that own their dG rows add ``dS H`` into them tile by
  tile, and ``dS^T G`` goes into dH by float32 atomics from the same pass or (deterministic
  mode) by a column pass whose programs own their dH rows.
"""

import triton
import triton.language as tl

from ._common import _column_range, _lse_step, _row_offsets


@triton.jit
def _dot_scores(G_ptr, H_ptr, i0, j0, N, M, D, ACC: tl.constexpr, PREC: tl.constexpr,
                I64: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr):
    ri = i0 + tl.arange(0, BI)
    rj = j0 + tl.arange(0, BJ)
    s = tl.zeros((BI, BJ), ACC)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        md = rd < D
        g = tl.load(G_ptr + _row_offsets(ri[:, None], D, I64) + rd[None, :],
                    mask=(ri < N)[:, None] & md[None, :], other=0.0)
        h = tl.load(H_ptr + _row_offsets(rj[None, :], D, I64) + rd[:, None],
                    mask=(rj < M)[None, :] & md[:, None], other=0.0)
        s = tl.dot(g, h, s, input_precision=PREC, out_dtype=ACC)
    return s


@triton.jit
def _plain_tile(i0, j0, row_end, M, pos_offset, exclude_offset, HAS_POS: tl.constexpr,
                HAS_EXCL: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Whether tile [i0, i0 + BI) x [j0, j0 + BJ) lies inside rows < row_end and columns < M and
    holds no pair (i, i + pos_offset) or (i, i + exclude_offset): every score of it counts in
    the logsumexp and the row sum, none in the positive. Its diagonals j - i run from
    j0 - i0 - BI + 1 to j0 - i0 + BJ - 1."""
    plain = (i0 + BI <= row_end) & (j0 + BJ <= M)
    if HAS_POS:
        plain = plain & ((pos_offset < j0 - i0 - BI + 1) | (pos_offset > j0 - i0 + BJ - 1))
    if HAS_EXCL:
        plain = plain & ((exclude_offset < j0 - i0 - BI + 1)
                         | (exclude_offset > j0 - i0 + BJ - 1))
    return plain


@triton.jit
def dot_fwd_kernel(G_ptr, H_ptr, Lse_ptr, Pos_ptr, Row_ptr, N, M, D, pos_offset, exclude_offset,
                   HAS_POS: tl.constexpr, HAS_EXCL: tl.constexpr, PREC: tl.constexpr,
                   I64: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr):
    """Program (p, c) walks row blocks p, p + num_programs(0), ... over column range c of
    num_programs(1) (_column_range) and writes that range's statistics to row c of the
    [num_programs(1), N] outputs."""
    ACC: tl.constexpr = Lse_ptr.dtype.element_ty
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    j_lo, j_hi = _column_range(M, BJ)
    out = tl.program_id(1).to(tl.int64) * N
    Lse_ptr += out
    Pos_ptr += out
    Row_ptr += out
    for rb in range(pid, tl.cdiv(N, BI), nprog):
        i0 = rb * BI
        ri = i0 + tl.arange(0, BI)
        mi = ri < N
        m_run = tl.full((BI,), float("-inf"), ACC)
        shift = tl.zeros((BI,), ACC)
        l_run = tl.zeros((BI,), ACC)
        rsum = tl.zeros((BI,), ACC)
        pos = tl.zeros((BI,), ACC)
        for j0 in range(j_lo, j_hi, BJ):
            s = _dot_scores(G_ptr, H_ptr, i0, j0, N, M, D, ACC, PREC, I64, BI, BJ, BD)
            if _plain_tile(i0, j0, N, M, pos_offset, exclude_offset, HAS_POS, HAS_EXCL, BI, BJ):
                m_run, shift, l_run = _lse_step(m_run, shift, l_run, s)
                rsum += tl.sum(s, axis=1)
            else:
                rj = j0 + tl.arange(0, BJ)
                valid = mi[:, None] & (rj < M)[None, :]
                if HAS_POS:
                    hit = valid & (rj[None, :] == ri[:, None] + pos_offset)
                    pos += tl.sum(tl.where(hit, s, 0.0), axis=1)
                if HAS_EXCL:
                    valid = valid & (rj[None, :] != ri[:, None] + exclude_offset)
                s_lse = tl.where(valid, s, float("-inf"))
                m_run, shift, l_run = _lse_step(m_run, shift, l_run, s_lse)
                rsum += tl.sum(tl.where(valid, s, 0.0), axis=1)
        tl.store(Lse_ptr + ri, shift + tl.log(tl.where(mi, l_run, 1.0)), mask=mi)
        tl.store(Row_ptr + ri, rsum, mask=mi)
        tl.store(Pos_ptr + ri, pos, mask=mi)


@triton.jit
def _dot_ds(s, ri, rj, mi, mj, Lse_ptr, Glse_ptr, Gpos_ptr, Grow_ptr, Scale_ptr, pos_offset,
            exclude_offset, HAS_POS: tl.constexpr, HAS_EXCL: tl.constexpr, SCALED: tl.constexpr,
            PLAIN: tl.constexpr):
    """dS of a [BI, BJ] score tile (rows ri, columns rj; zero outside mi x mj), times the power
    of two at Scale_ptr when SCALED (16-bit inputs: keeps dS in the 16-bit range; ops.py).
    PLAIN: a tile that _plain_tile accepted, so no masks (every row and column is in range and
    no pair of it is a positive or excluded)."""
    if PLAIN:
        lse = tl.load(Lse_ptr + ri)
        ds = tl.load(Glse_ptr + ri)[:, None] * tl.exp(s - lse[:, None]) \
            + tl.load(Grow_ptr + ri)[:, None]
    else:
        valid = mi[:, None] & mj[None, :]
        keep = valid
        if HAS_EXCL:
            keep = keep & (rj[None, :] != ri[:, None] + exclude_offset)
        lse = tl.load(Lse_ptr + ri, mask=mi, other=0.0)
        g_lse = tl.load(Glse_ptr + ri, mask=mi, other=0.0)
        g_row = tl.load(Grow_ptr + ri, mask=mi, other=0.0)
        ds = tl.where(keep, g_lse[:, None] * tl.exp(s - lse[:, None]) + g_row[:, None], 0.0)
        if HAS_POS:
            hit = valid & (rj[None, :] == ri[:, None] + pos_offset)
            g_pos = tl.load(Gpos_ptr + ri, mask=mi, other=0.0)
            ds += tl.where(hit, g_pos[:, None], 0.0)
    if SCALED:
        ds = ds * tl.load(Scale_ptr)
    return ds


@triton.jit
def dot_ds_kernel(G_ptr, H_ptr, Lse_ptr, Glse_ptr, Gpos_ptr, Grow_ptr, dS_ptr, Scale_ptr,
                  N, M, D, pos_offset, exclude_offset, row0, row1,
                  HAS_POS: tl.constexpr, HAS_EXCL: tl.constexpr, PREC: tl.constexpr,
                  SCALED: tl.constexpr, I64: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                  BD: tl.constexpr):
    """dS of rows [row0, row1) and every column into dS_ptr, a row-major [row1 - row0, M]
    buffer in dS_ptr's dtype (the input dtype): [BI, BJ] tiles, programs taking every
    num_programs-th tile (consecutive programs: the same rows, neighbouring columns)."""
    ACC: tl.constexpr = Lse_ptr.dtype.element_ty
    n_j = tl.cdiv(M, BJ)
    for t in range(tl.program_id(0), tl.cdiv(row1 - row0, BI) * n_j, tl.num_programs(0)):
        i0 = row0 + (t // n_j) * BI
        j0 = (t % n_j) * BJ
        s = _dot_scores(G_ptr, H_ptr, i0, j0, N, M, D, ACC, PREC, I64, BI, BJ, BD)
        ri = i0 + tl.arange(0, BI)
        rj = j0 + tl.arange(0, BJ)
        mi = ri < row1
        mj = rj < M
        # int64 offsets: a chunk may hold more than 2^31 elements
        off = (ri - row0).to(tl.int64)[:, None] * M + rj[None, :]
        if _plain_tile(i0, j0, row1, M, pos_offset, exclude_offset, HAS_POS, HAS_EXCL, BI, BJ):
            ds = _dot_ds(s, ri, rj, mi, mj, Lse_ptr, Glse_ptr, Gpos_ptr, Grow_ptr, Scale_ptr,
                         pos_offset, exclude_offset, HAS_POS, HAS_EXCL, SCALED, True)
            tl.store(dS_ptr + off, ds.to(dS_ptr.dtype.element_ty))
        else:
            ds = _dot_ds(s, ri, rj, mi, mj, Lse_ptr, Glse_ptr, Gpos_ptr, Grow_ptr, Scale_ptr,
                         pos_offset, exclude_offset, HAS_POS, HAS_EXCL, SCALED, False)
            tl.store(dS_ptr + off, ds.to(dS_ptr.dtype.element_ty),
                     mask=mi[:, None] & mj[None, :])


@triton.jit
def dot_bwd_kernel(G_ptr, H_ptr, Lse_ptr, Glse_ptr, Gpos_ptr, Grow_ptr, dG_ptr, dH_ptr,
                   Scale_ptr, N, M, D, pos_offset, exclude_offset,
                   HAS_POS: tl.constexpr, HAS_EXCL: tl.constexpr, PREC: tl.constexpr,
                   SCALED: tl.constexpr, COL_PASS: tl.constexpr, ATOMIC_DH: tl.constexpr,
                   I64: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BD: tl.constexpr):
    """Row pass: dG (owned rows) and, when ATOMIC_DH, dH by atomics. Column pass: dH (owned
    rows). dG and dH are float32 (float64) accumulators that start at zero; when SCALED they
    receive the gradients times the scale at Scale_ptr."""
    ACC: tl.constexpr = Lse_ptr.dtype.element_ty
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if COL_PASS:
        n_outer = tl.cdiv(M, BJ)
        n_inner = tl.cdiv(N, BI)
    else:
        n_outer = tl.cdiv(N, BI)
        n_inner = tl.cdiv(M, BJ)
    for ob in range(pid, n_outer, nprog):
        for ib in range(0, n_inner):
            if COL_PASS:
                i0 = ib * BI
                j0 = ob * BJ
            else:
                i0 = ob * BI
                j0 = ib * BJ
            s = _dot_scores(G_ptr, H_ptr, i0, j0, N, M, D, ACC, PREC, I64, BI, BJ, BD)
            ri = i0 + tl.arange(0, BI)
            rj = j0 + tl.arange(0, BJ)
            mi = ri < N
            mj = rj < M
            if _plain_tile(i0, j0, N, M, pos_offset, exclude_offset, HAS_POS, HAS_EXCL, BI, BJ):
                ds = _dot_ds(s, ri, rj, mi, mj, Lse_ptr, Glse_ptr, Gpos_ptr, Grow_ptr, Scale_ptr,
                             pos_offset, exclude_offset, HAS_POS, HAS_EXCL, SCALED, True)
            else:
                ds = _dot_ds(s, ri, rj, mi, mj, Lse_ptr, Glse_ptr, Gpos_ptr, Grow_ptr, Scale_ptr,
                             pos_offset, exclude_offset, HAS_POS, HAS_EXCL, SCALED, False)
            for d0 in range(0, D, BD):
                rd = d0 + tl.arange(0, BD)
                md = rd < D
                if COL_PASS:
                    g = tl.load(G_ptr + _row_offsets(ri[:, None], D, I64) + rd[None, :],
                                mask=mi[:, None] & md[None, :], other=0.0)
                    dh = tl.dot(tl.trans(ds.to(g.dtype)), g, input_precision=PREC, out_dtype=ACC)
                    ph = dH_ptr + _row_offsets(rj[:, None], D, I64) + rd[None, :]
                    mh = mj[:, None] & md[None, :]
                    tl.store(ph, tl.load(ph, mask=mh, other=0.0) + dh, mask=mh)
                else:
                    h = tl.load(H_ptr + _row_offsets(rj[:, None], D, I64) + rd[None, :],
                                mask=mj[:, None] & md[None, :], other=0.0)
                    dg = tl.dot(ds.to(h.dtype), h, input_precision=PREC, out_dtype=ACC)
                    pg = dG_ptr + _row_offsets(ri[:, None], D, I64) + rd[None, :]
                    mg = mi[:, None] & md[None, :]
                    tl.store(pg, tl.load(pg, mask=mg, other=0.0) + dg, mask=mg)
                    if ATOMIC_DH:
                        g = tl.load(G_ptr + _row_offsets(ri[:, None], D, I64) + rd[None, :],
                                    mask=mi[:, None] & md[None, :], other=0.0)
                        dh = tl.dot(tl.trans(ds.to(g.dtype)), g, input_precision=PREC,
                                    out_dtype=ACC)
                        # relaxed: no ordering needed (read after the kernel); the default
                        # acq_rel adds MEMBAR.ALL.GPU and CCTL.IVALL around each atomic (SASS)
                        tl.atomic_add(dH_ptr + _row_offsets(rj[:, None], D, I64) + rd[None, :],
                                      dh, mask=mj[:, None] & md[None, :], sem="relaxed")
