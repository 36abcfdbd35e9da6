"""Triton kernels of the concat critic's core op (DESIGN.md section 2).

Scores ``s_ij = out_act(w_out . h_L + b_out)``, ``h_0 = act(A_i + B_j)``,
``h_l = act(W_l h_(l-1) + b_l)``. A program takes a pair tile of ``P = BI*BJ`` pairs (BI rows x
BJ columns, pair p = (i0 + p // BJ, j0 + p % BJ)) and runs the MLP on it:

- the first-layer activations ``act(A_i + B_j)`` are formed in registers, one ``BK``-wide feature
  slice at a time, directly as the left operand of the next layer's tl.dot; they never reach
  memory (L = 0: they are dotted with ``w_out`` right away);
- hidden weights are streamed in [BK, BN] slices; the output slice of a layer accumulates in
  registers over the K loop;
- the last hidden layer is folded into the score (``act(z) . w_out``) slice by slice, so for
  L <= 1 nothing of the pair tile is stored. For L >= 2 the intermediate pre-activations of the
  tile go to a program-private scratch slot ([L, P, H] per program, P*H per layer: bounded by
  the grid size, never N*M*H), which the next layer streams back.

Forward: row-block programs walk all column blocks (or a share of them, for small N:
_config.column_splits) with an online logsumexp, and also form the positive and the row sum in
the same pass. Nothing of size N*M is stored.

Backward (recompute): the same tile forward (pre-activations of every layer kept in the scratch
slot), ``ds`` from the saved lse, then the chain back through the layers slice by slice:
``dh_(l-1)[:, k] = sum_n dz_l[:, n] W_l[n, k]`` and ``dW_l[n, k] += dz_l[:, n]^T h_(l-1)[:, k]``
in one pass over (k, n) slices. Races are avoided by ownership:

- row pass (grid over row blocks, times the shares of their columns for small N): dA rows are
  owned by the program (plain read-modify-write into its share's partial, the partials summed
  afterwards); bias gradients go to the program's own float32 slot, summed over slots
  afterwards in a fixed order (torch.sum), so they are deterministic;
- hidden weights' gradients, two forms (_config.DW_MODES). ``chunk`` (default): the row pass runs
  over chunks of pairs (rows x columns, a bounded buffer) and leaves each tile's ``dz_l`` (and the
  inputs of layers >= 2) in the chunk buffer instead of a per-program slot; ``mlp_dw_kernel`` then
  reduces the chunk as one GEMM over its pairs, ``dW_l += dz_l^T h_(l-1)``, with ``act(A_i + B_j)``
  formed again for the first layer: [BN, BK] output tiles stay in registers over thousands of
  pairs, in a fixed split into float32 partials summed in order. ``slots``: every pair tile adds
  its ``dz^T h`` into the program's own float32 H x H slot (a read-modify-write of the whole slot
  per P pairs);
- dB: either float32 atomics from the row pass (fast, order not fixed), or, in deterministic
  mode, a second column pass (grid over column blocks, recomputing) that owns dB rows.

Programs are persistent (grid = min(#SMs, #blocks)); block b goes to program b mod grid.
Scratch writes are followed by tl.debug_barrier() because a later read of the same slot is done
by other threads of the program (different register layouts).
"""

import triton
import triton.language as tl

from ._common import (
    _act,
    _act_bwd,
    _block_range,
    _column_range,
    _lse_step,
    _out_act,
    _out_act_grad,
    _row_offsets,
)


@triton.jit
def _z0(A_ptr, B_ptr, i0, j0, k0, n_rows, n_cols, H, ACC: tl.constexpr, I64: tl.constexpr,
        BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, PAD: tl.constexpr):
    """First-layer pre-activations A_i + B_j of the tile's pairs on one feature slice: [P, BK].
    Rows from n_rows and columns from n_cols on are padding, loaded as PAD: 0.0, or -inf in the
    relu backward, whose relu then keeps their dz at 0 (_act_bwd); the tanh backward keeps 0.0
    (a real +inf beside a -inf padding would make the pair NaN, and tanh' a NaN dz where the
    reference's tanh(inf) = 1 has a finite gradient). The backward passes N, M too,
    not its launch's row1, col1: no tile straddles a chunk edge (_config.dw_chunk's chunks are
    whole tiles), and those bounds cost L = 0 tiles 34 more registers (compile check)."""
    ri = i0 + tl.arange(0, BI)
    rj = j0 + tl.arange(0, BJ)
    rk = k0 + tl.arange(0, BK)
    mk = rk < H
    a = tl.load(A_ptr + _row_offsets(ri[:, None], H, I64) + rk[None, :],
                mask=(ri < n_rows)[:, None] & mk[None, :], other=PAD).to(ACC)
    b = tl.load(B_ptr + _row_offsets(rj[:, None], H, I64) + rk[None, :],
                mask=(rj < n_cols)[:, None] & mk[None, :], other=PAD).to(ACC)
    return tl.reshape(a[:, None, :] + b[None, :, :], (BI * BJ, BK))


@triton.jit
def _mlp_scores(A_ptr, B_ptr, W_ptr, Bias_ptr, Wout_ptr, zp, zls, zr, i0, j0, N, M, H,
                ACC: tl.constexpr, L: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
                I64: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
                BN: tl.constexpr, STORE_LAST: tl.constexpr):
    """``w_out . h_L`` for the tile's P pairs ([P], before b_out and out_act).

    Layer l's pre-activations z_(l+1) go to scratch ``zp + l*zls``, pair p in row ``zr[p]``
    (row stride H), when a later layer needs them, and for the last layer when STORE_LAST
    (backward)."""
    P: tl.constexpr = BI * BJ
    t = tl.zeros((P,), ACC)
    if L == 0:
        for k0 in range(0, H, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < H
            h = _act(_z0(A_ptr, B_ptr, i0, j0, k0, N, M, H, ACC, I64, BI, BJ, BK, 0.0), ACT)
            wo = tl.load(Wout_ptr + rk, mask=mk, other=0.0).to(ACC)
            t += tl.sum(h * wo[None, :], axis=1)
    else:
        for l in tl.static_range(L):
            for n0 in range(0, H, BN):
                rn = n0 + tl.arange(0, BN)
                mn = rn < H
                acc = tl.zeros((P, BN), ACC)
                for k0 in range(0, H, BK):
                    rk = k0 + tl.arange(0, BK)
                    mk = rk < H
                    # W_l[n, k] read transposed: the [BK, BN] right operand of h @ W_l^T
                    w = tl.load(W_ptr + _row_offsets(l * H, H, I64)
                                + _row_offsets(rn[None, :], H, I64) + rk[:, None],
                                mask=mk[:, None] & mn[None, :], other=0.0)
                    if l == 0:
                        x = _act(_z0(A_ptr, B_ptr, i0, j0, k0, N, M, H, ACC, I64, BI, BJ, BK,
                                     0.0), ACT)
                    else:
                        x = tl.load(zp + (l - 1) * zls + zr[:, None] * H + rk[None, :],
                                    mask=mk[None, :], other=0.0).to(ACC)
                        x = _act(x, ACT)
                    acc = tl.dot(x.to(w.dtype), w, acc, input_precision=PREC, out_dtype=ACC)
                z = acc + tl.load(Bias_ptr + l * H + rn, mask=mn, other=0.0).to(ACC)[None, :]
                if l == L - 1:
                    wo = tl.load(Wout_ptr + rn, mask=mn, other=0.0).to(ACC)
                    t += tl.sum(_act(z, ACT) * wo[None, :], axis=1)
                    if STORE_LAST:
                        tl.store(zp + l * zls + zr[:, None] * H + rn[None, :],
                                 z.to(zp.dtype.element_ty), mask=mn[None, :])
                else:
                    tl.store(zp + l * zls + zr[:, None] * H + rn[None, :],
                             z.to(zp.dtype.element_ty), mask=mn[None, :])
            tl.debug_barrier()
    return t


@triton.jit
def mlp_fwd_kernel(A_ptr, B_ptr, W_ptr, Bias_ptr, Wout_ptr, Bout_ptr, Z_ptr,
                   Lse_ptr, Pos_ptr, Row_ptr,
                   N, M, H, pos_offset, z_prog_stride, z_layer_stride,
                   L: tl.constexpr, ACT: tl.constexpr, OUT: tl.constexpr,
                   HAS_POS: tl.constexpr, PREC: tl.constexpr, I64: tl.constexpr,
                   BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """(lse, pos, rowsum) of every row: one pass over the columns per row block. Program
    (p, c) walks row blocks p, p + num_programs(0), ... over column range c of num_programs(1)
    (_column_range) and writes that range's statistics to row c of the [num_programs(1), N]
    outputs; its scratch slot is p + c * num_programs(0)."""
    ACC: tl.constexpr = Lse_ptr.dtype.element_ty
    P: tl.constexpr = BI * BJ
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    j_lo, j_hi = _column_range(M, BJ)
    out = tl.program_id(1).to(tl.int64) * N
    Lse_ptr += out
    Pos_ptr += out
    Row_ptr += out
    # int64: slot offsets (program x layer x H x H) can pass 2^31 for wide layers
    zp = Z_ptr + (pid + tl.program_id(1) * nprog).to(tl.int64) * z_prog_stride
    bout = tl.load(Bout_ptr).to(ACC)
    rp = tl.arange(0, P)
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
            t = _mlp_scores(A_ptr, B_ptr, W_ptr, Bias_ptr, Wout_ptr, zp, z_layer_stride, rp,
                            i0, j0, N, M, H, ACC, L, ACT, PREC, I64, BI, BJ, BK, BN, False)
            s = tl.reshape(_out_act(t + bout, OUT), (BI, BJ))
            rj = j0 + tl.arange(0, BJ)
            valid = mi[:, None] & (rj < M)[None, :]
            s_lse = tl.where(valid, s, float("-inf"))
            m_run, shift, l_run = _lse_step(m_run, shift, l_run, s_lse)
            rsum += tl.sum(tl.where(valid, s, 0.0), axis=1)
            if HAS_POS:
                hit = valid & (rj[None, :] == ri[:, None] + pos_offset)
                pos += tl.sum(tl.where(hit, s, 0.0), axis=1)
        tl.store(Lse_ptr + ri, shift + tl.log(tl.where(mi, l_run, 1.0)), mask=mi)
        tl.store(Row_ptr + ri, rsum, mask=mi)
        tl.store(Pos_ptr + ri, pos, mask=mi)
        # the next row block rewrites the scratch slot that slow threads may still read
        tl.debug_barrier()


@triton.jit
def _reduce_dz0(dz0, dA_ptr, dB_ptr, i0, j0, k0, N, M, H, COL_PASS: tl.constexpr,
                ATOMIC_DB: tl.constexpr, I64: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                BK: tl.constexpr):
    """dA_i += sum_j dz0_ij and dB_j += sum_i dz0_ij on one feature slice."""
    d3 = tl.reshape(dz0, (BI, BJ, BK))
    rk = k0 + tl.arange(0, BK)
    mk = rk < H
    rj = j0 + tl.arange(0, BJ)
    mb = (rj < M)[:, None] & mk[None, :]
    pb = dB_ptr + _row_offsets(rj[:, None], H, I64) + rk[None, :]
    if COL_PASS:
        tl.store(pb, tl.load(pb, mask=mb, other=0.0) + tl.sum(d3, axis=0), mask=mb)
    else:
        ri = i0 + tl.arange(0, BI)
        ma = (ri < N)[:, None] & mk[None, :]
        pa = dA_ptr + _row_offsets(ri[:, None], H, I64) + rk[None, :]
        tl.store(pa, tl.load(pa, mask=ma, other=0.0) + tl.sum(d3, axis=1), mask=ma)
        if ATOMIC_DB:
            # relaxed: a sum read only after the kernel ends needs no ordering; the default
            # acq_rel puts a GPU-wide memory barrier and an L1 invalidation around every atomic
            tl.atomic_add(pb, tl.sum(d3, axis=0), mask=mb, sem="relaxed")


@triton.jit
def mlp_bwd_kernel(A_ptr, B_ptr, W_ptr, Bias_ptr, Wout_ptr, Bout_ptr, Z_ptr, Hin_ptr,
                   Lse_ptr, Glse_ptr, Gpos_ptr, Grow_ptr,
                   dA_ptr, dB_ptr, dW_ptr, dBias_ptr, dWout_ptr, dBout_ptr, Scale_ptr,
                   N, M, H, pos_offset, z_prog_stride, z_layer_stride,
                   row0, row1, col0, col1, chunk_w,
                   L: tl.constexpr, ACT: tl.constexpr, OUT: tl.constexpr,
                   HAS_POS: tl.constexpr, PREC: tl.constexpr, SCALED: tl.constexpr,
                   COL_PASS: tl.constexpr, ATOMIC_DB: tl.constexpr, DW_CHUNK: tl.constexpr,
                   I64: tl.constexpr,
                   BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """Recomputing backward over the pairs of rows [row0, row1) x columns [col0, col1) (row0 a
    multiple of BI, col0 of BJ). Row pass (COL_PASS False): dA, bias slots of this program, dB by
    atomics when ATOMIC_DB, and the hidden weights' gradients: DW_CHUNK False, into this
    program's float32 slot, tile by tile; DW_CHUNK True, not here: every layer's dz (and, for
    layers >= 2, their input h) is left in the chunk buffers Z_ptr / Hin_ptr (pair (i, j) in row
    (i - row0) * chunk_w + j - col0, layer stride z_layer_stride) for mlp_dw_kernel.
    Column pass (COL_PASS True): dB only.

    Row pass programs (p, c) take the row blocks p, p + num_programs(0), ... and share c of
    their column blocks (_block_range); dA_ptr holds one [N, H] partial per share c, and the
    per-program slots are indexed by p + c * num_programs(0). The column pass has one share.

    Accumulators (dA [N, H], dB [M, H], dW [G, L, H, H], dBias [G, L, H], dWout [G, H],
    dBout [G]) are float32 (float64 for float64 inputs) and are added to; when SCALED, every
    gradient is formed from ds times the power of two at Scale_ptr (16-bit dz in range; ops.py),
    and the accumulators receive it scaled."""
    ACC: tl.constexpr = Lse_ptr.dtype.element_ty
    P: tl.constexpr = BI * BJ
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    # int64: slot offsets (program x layer x H x H) can pass 2^31 for wide layers
    gp = (pid + tl.program_id(1) * nprog).to(tl.int64)
    dA_ptr += tl.program_id(1).to(tl.int64) * N * H
    zls = z_layer_stride
    if DW_CHUNK:
        zp = Z_ptr
    else:
        zp = Z_ptr + gp * z_prog_stride
    bout = tl.load(Bout_ptr).to(ACC)
    rp = tl.arange(0, P)
    # slots owned by this program
    dWp = dW_ptr + gp * L * H * H
    dBiasp = dBias_ptr + gp * L * H
    dWoutp = dWout_ptr + gp * H
    rb0 = row0 // BI
    cb0 = col0 // BJ
    if COL_PASS:
        n_outer = tl.cdiv(col1, BJ) - cb0
        n_inner = tl.cdiv(row1, BI) - rb0
    else:
        n_outer = tl.cdiv(row1, BI) - rb0
        n_inner = tl.cdiv(col1, BJ) - cb0
    ib_lo, ib_hi = _block_range(n_inner)
    dbout = tl.zeros((P,), ACC)
    for ob in range(pid, n_outer, nprog):
        for ib in range(ib_lo, ib_hi):
            if COL_PASS:
                i0 = (rb0 + ib) * BI
                j0 = (cb0 + ob) * BJ
            else:
                i0 = (rb0 + ob) * BI
                j0 = (cb0 + ib) * BJ
            if DW_CHUNK:
                zr = (((i0 - row0) + rp // BJ).to(tl.int64) * chunk_w + (j0 - col0)) + rp % BJ
            else:
                zr = rp
            t = _mlp_scores(A_ptr, B_ptr, W_ptr, Bias_ptr, Wout_ptr, zp, zls, zr, i0, j0,
                            N, M, H, ACC, L, ACT, PREC, I64, BI, BJ, BK, BN, True) + bout
            # ds_ij = g_lse_i exp(s_ij - lse_i) + g_pos_i [j == i + off] + g_rowsum_i, times
            # out_act'(t); zero on padding pairs, whose z are -inf below, so that relu keeps
            # their dz at 0 too (0 times a non-finite weight is NaN): nothing flows from them
            pi = i0 + rp // BJ
            pj = j0 + rp % BJ
            valid = (pi < row1) & (pj < col1)
            lse = tl.load(Lse_ptr + pi, mask=pi < N, other=0.0)
            ds = (tl.load(Glse_ptr + pi, mask=pi < N, other=0.0) * tl.exp(_out_act(t, OUT) - lse)
                  + tl.load(Grow_ptr + pi, mask=pi < N, other=0.0))
            if HAS_POS:
                ds += tl.where(pj == pi + pos_offset,
                               tl.load(Gpos_ptr + pi, mask=pi < N, other=0.0), 0.0)
            ds = tl.where(valid, ds * _out_act_grad(t, OUT), 0.0)
            if SCALED:
                ds = ds * tl.load(Scale_ptr)
            if not COL_PASS:
                dbout += ds
            if L == 0:
                for k0 in range(0, H, BK):
                    rk = k0 + tl.arange(0, BK)
                    mk = rk < H
                    z0 = _z0(A_ptr, B_ptr, i0, j0, k0, N, M, H, ACC, I64, BI, BJ, BK,
                             float("-inf") if ACT == 0 else 0.0)
                    wo = tl.load(Wout_ptr + rk, mask=mk, other=0.0).to(ACC)
                    if not COL_PASS:
                        g = tl.sum(ds[:, None] * _act(z0, ACT), axis=0)
                        tl.store(dWoutp + rk, tl.load(dWoutp + rk, mask=mk, other=0.0) + g, mask=mk)
                    dz0 = _act_bwd(ds[:, None] * wo[None, :], z0, ACT)
                    _reduce_dz0(dz0, dA_ptr, dB_ptr, i0, j0, k0, N, M, H, COL_PASS, ATOMIC_DB,
                                I64, BI, BJ, BK)
            else:
                # top: dz_L = ds w_out act'(z_L), written over z_L in the scratch
                for n0 in range(0, H, BN):
                    rn = n0 + tl.arange(0, BN)
                    mn = rn < H
                    pz = zp + (L - 1) * zls + zr[:, None] * H + rn[None, :]
                    # padding pairs' z as -inf (_act_bwd)
                    z = tl.load(pz, mask=valid[:, None] & mn[None, :], other=float("-inf")).to(ACC)
                    wo = tl.load(Wout_ptr + rn, mask=mn, other=0.0).to(ACC)
                    dz = _act_bwd(ds[:, None] * wo[None, :], z, ACT)
                    if not COL_PASS:
                        g = tl.sum(ds[:, None] * _act(z, ACT), axis=0)
                        tl.store(dWoutp + rn, tl.load(dWoutp + rn, mask=mn, other=0.0) + g, mask=mn)
                        pb = dBiasp + (L - 1) * H + rn
                        tl.store(pb, tl.load(pb, mask=mn, other=0.0) + tl.sum(dz, axis=0), mask=mn)
                    tl.store(pz, dz.to(zp.dtype.element_ty), mask=mn[None, :])
                tl.debug_barrier()
                for li in tl.static_range(L):
                    l = L - 1 - li  # constexpr: layers walk backwards
                    for k0 in range(0, H, BK):
                        rk = k0 + tl.arange(0, BK)
                        mk = rk < H
                        if l == 0:
                            z_in = _z0(A_ptr, B_ptr, i0, j0, k0, N, M, H, ACC, I64, BI, BJ,
                                       BK, float("-inf") if ACT == 0 else 0.0)
                        else:
                            z_in = tl.load(zp + (l - 1) * zls + zr[:, None] * H + rk[None, :],
                                           mask=valid[:, None] & mk[None, :],
                                           other=float("-inf")).to(ACC)
                        h_in = _act(z_in, ACT)
                        if DW_CHUNK and not COL_PASS and l > 0:
                            # the layer's input, for mlp_dw_kernel (its slot is about to take dz)
                            tl.store(Hin_ptr + (l - 1) * zls + zr[:, None] * H + rk[None, :],
                                     h_in.to(Hin_ptr.dtype.element_ty), mask=mk[None, :])
                        dh = tl.zeros((P, BK), ACC)
                        for n0 in range(0, H, BN):
                            rn = n0 + tl.arange(0, BN)
                            mn = rn < H
                            w = tl.load(W_ptr + _row_offsets(l * H, H, I64)
                                        + _row_offsets(rn[:, None], H, I64) + rk[None, :],
                                        mask=mn[:, None] & mk[None, :], other=0.0)
                            dz = tl.load(zp + l * zls + zr[:, None] * H + rn[None, :],
                                         mask=mn[None, :], other=0.0).to(w.dtype)
                            dh = tl.dot(dz, w, dh, input_precision=PREC, out_dtype=ACC)
                            if not COL_PASS and not DW_CHUNK:
                                gw = tl.dot(tl.trans(dz), h_in.to(w.dtype), input_precision=PREC,
                                            out_dtype=ACC)
                                pw = (dWp + _row_offsets(l * H, H, I64)
                                      + _row_offsets(rn[:, None], H, I64) + rk[None, :])
                                mw = mn[:, None] & mk[None, :]
                                tl.store(pw, tl.load(pw, mask=mw, other=0.0) + gw, mask=mw)
                        dz_in = _act_bwd(dh, z_in, ACT)
                        if l == 0:
                            _reduce_dz0(dz_in, dA_ptr, dB_ptr, i0, j0, k0, N, M, H, COL_PASS,
                                        ATOMIC_DB, I64, BI, BJ, BK)
                        else:
                            if not COL_PASS:
                                pb = dBiasp + (l - 1) * H + rk
                                tl.store(pb, tl.load(pb, mask=mk, other=0.0)
                                         + tl.sum(dz_in, axis=0), mask=mk)
                            tl.store(zp + (l - 1) * zls + zr[:, None] * H + rk[None, :],
                                     dz_in.to(zp.dtype.element_ty), mask=mk[None, :])
                    tl.debug_barrier()
    if not COL_PASS:
        tl.store(dBout_ptr + gp, tl.load(dBout_ptr + gp) + tl.sum(dbout, axis=0))


@triton.jit
def mlp_dw_kernel(A_ptr, B_ptr, Dz_ptr, Hin_ptr, Part_ptr,
                  N, M, H, row0, row1, col0, col1, chunk_w, n_split,
                  FIRST: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
                  I64: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BQI: tl.constexpr,
                  BQJ: tl.constexpr):
    """One layer's weight gradient over a chunk of pairs, ``dW[n, k] += sum_p dz[p, n] h[p, k]``,
    as a GEMM whose reduction dimension is the chunk's pairs (rows [row0, row1) x columns
    [col0, col1), laid out as mlp_bwd_kernel leaves them in Dz_ptr). ``h`` is the layer's input:
    ``act(A_i + B_j)``, formed here, for the first layer (FIRST), else read from Hin_ptr.

    Program ``(tile, s)`` owns one [BN, BK] tile of split ``s`` of the float32 partial sums
    ``Part [n_split, H, H]`` and adds the chunk's pair blocks s, s + n_split, ... to it: every
    element has one writer and a fixed order, and the splits are summed in order afterwards."""
    ACC: tl.constexpr = Part_ptr.dtype.element_ty
    BQ: tl.constexpr = BQI * BQJ
    pid = tl.program_id(0)
    tile = pid // n_split
    s = pid % n_split
    n_k_tiles = tl.cdiv(H, BK)
    rn = (tile // n_k_tiles) * BN + tl.arange(0, BN)
    k0 = (tile % n_k_tiles) * BK
    rk = k0 + tl.arange(0, BK)
    mn = rn < H
    mk = rk < H
    rq = tl.arange(0, BQ)
    nbj = tl.cdiv(col1 - col0, BQJ)
    n_blocks = tl.cdiv(row1 - row0, BQI) * nbj
    acc = tl.zeros((BN, BK), ACC)
    for b in range(s, n_blocks, n_split):
        i0 = row0 + (b // nbj) * BQI
        j0 = col0 + (b % nbj) * BQJ
        pi = i0 + rq // BQJ
        pj = j0 + rq % BQJ
        valid = (pi < row1) & (pj < col1)
        zr = (pi - row0).to(tl.int64) * chunk_w + (pj - col0)
        dz = tl.load(Dz_ptr + zr[:, None] * H + rn[None, :], mask=valid[:, None] & mn[None, :],
                     other=0.0)
        if FIRST:
            h = _act(_z0(A_ptr, B_ptr, i0, j0, k0, N, M, H, ACC, I64, BQI, BQJ, BK, 0.0), ACT)
            h = tl.where(valid[:, None], h, 0.0)
        else:
            h = tl.load(Hin_ptr + zr[:, None] * H + rk[None, :],
                        mask=valid[:, None] & mk[None, :], other=0.0)
        acc = tl.dot(tl.trans(dz), h.to(dz.dtype), acc, input_precision=PREC, out_dtype=ACC)
    pp = (Part_ptr + s.to(tl.int64) * H * H + _row_offsets(rn[:, None], H, I64)
          + rk[None, :])
    mw = mn[:, None] & mk[None, :]
    tl.store(pp, tl.load(pp, mask=mw, other=0.0) + acc, mask=mw)
