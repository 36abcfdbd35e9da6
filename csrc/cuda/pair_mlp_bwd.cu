// Concat critic backward by recomputation (DESIGN.md section 2): for each chunk of pairs, redo
// the forward keeping h_1..h_L in per-block scratch, form dL/ds from the saved lse, and
// back-propagate through the MLP with block GEMMs:
//
//   ds_p   = g_lse e^(s_p - lse_i) + g_pos [j = i + off] + g_rowsum
//   dt_p   = ds_p * out_act'(t_p)
//   dz_L   = dt_p w_out * act'(h_L)
//   dW_l  += dz_l^T h_(l-1)      db_l += sum_p dz_l        dh_(l-1) = dz_l W_l
//   dz_(l-1) = dh_(l-1) * act'(h_(l-1)),   h_0 = act(A_i + B_j) recomputed, never stored
//   dA_i  += sum_j dz_0(i, j)    dB_j += sum_i dz_0(i, j)
//
// No atomics: block g accumulates its weight-gradient partials in its own float32 slice
// [g, ...], row gradients in the slice of its column split s, column gradients in the slice of
// its row split r (common.cuh); reduce_partials_kernel then sums the slices in fixed order.
// dz_l is stored in the input dtype (it is a tensor-core operand) with a per-chunk power-of-two
// scale, removed again wherever it is summed into a float32 partial.
//
// Sums over a chunk's pairs (db_l, dw_out, dA, dB) are spread over the block, never one thread
// walking hundreds of pairs: column_sums gives each thread a group of features and a share of
// the pairs, and dz_0 never leaves shared memory for L >= 1 (add_pair_sums reduces it in the last
// GEMM's epilogue). Every sum still has one fixed order for a given shape.
#include "host_common.cuh"
#include "pair_mlp.cuh"

namespace factorcl_ext::cuda {

template <class A>
struct MlpGrads {
  const A* __restrict__ g_lse;
  const A* __restrict__ g_pos;
  const A* __restrict__ g_rowsum;
  const A* __restrict__ lse;
  A* dA_part;   // [S, N, H]
  A* dB_part;   // [R, M, H]
  A* dW_part;   // [G, L, H, H]
  A* db_part;   // [G, L, H]
  A* dwo_part;  // [G, H]
  A* dbo_part;  // [G]
};

// NS sums over the pairs of a chunk, feature by feature, for every feature k < H. Thread (q, f)
// of a Q x F layout takes feature group f (V = 16 / sizeof(T) consecutive features, so a caller
// can move them with one 16-byte access), and walk(k, n, q, Q, sums) adds the pairs q, q + Q, ...
// of features k .. k + n - 1 (n <= V) into sums[s][0 .. n). The Q partial sums of a feature meet
// in shared memory (the GEMM tile's, free between GEMMs) and emit(s, k, total) gets them added in
// order of q. Called by every thread of the block (barriers inside).
template <class Md, int NS, class Walk, class Emit>
__device__ void column_sums(char* smem, int H, Walk&& walk, Emit&& emit) {
  using acc_t = typename Md::acc_t;
  constexpr int V = kVec<typename Md::T>;
  static_assert(size_t(NS) * kThreads * V * sizeof(acc_t) <= BlockGemm<Md>::kSmemBytes,
                "column_sums' partials must fit the GEMM tile's shared memory");
  acc_t* part = reinterpret_cast<acc_t*>(smem);
  const int tid = threadIdx.x;
  const int NG = (H + V - 1) / V;  // feature groups
  const int F = NG < kThreads ? NG : kThreads;
  const int Q = kThreads / F;
  const int q = tid / F, f = tid % F;
  for (int g0 = 0; g0 < NG; g0 += F) {
    const int gi = g0 + f, k = gi * V;
    const bool mine = q < Q && gi < NG;
    const int n = mine ? min(V, H - k) : 0;
    acc_t sums[NS][V];
#pragma unroll
    for (int s = 0; s < NS; ++s)
#pragma unroll
      for (int t = 0; t < V; ++t) sums[s][t] = acc_t(0);
    if (mine) walk(k, n, q, Q, sums);
    if (q < Q)
#pragma unroll
      for (int s = 0; s < NS; ++s)
#pragma unroll
        for (int t = 0; t < V; ++t) part[((s * Q + q) * F + f) * V + t] = sums[s][t];
    __syncthreads();
    if (q == 0 && gi < NG)
      for (int s = 0; s < NS; ++s)
        for (int t = 0; t < n; ++t) {
          acc_t tot = part[(s * Q * F + f) * V + t];
          for (int qq = 1; qq < Q; ++qq) tot += part[((s * Q + qq) * F + f) * V + t];
          emit(s, k + t, tot);
        }
    __syncthreads();
  }
}

// dA_i += sum_j dz0(i, j) and dB_j += sum_i dz0(i, j) over the pairs p in [m0, m0 + mlen) of a
// chunk with nj columns (p = ii * nj + jj), for the features [k0, k0 + nlen) (nlen <= BN): dz0 of
// pair p, feature k0 + c at Z[(p - m0) * ldz + c]. dA_rows / dB_rows: the partial slices' rows
// of the chunk's first row / column (row stride H). One item per (row or column, feature): the
// chunk has at most TI rows and TJ columns, so a thread has at most kItems items; it reads a
// batch of its partials before it writes any of them, so their latencies overlap. Sums in pair
// order.
template <class Md>
__device__ void add_pair_sums(const typename Md::acc_t* Z, int ldz, int m0, int mlen, int nj,
                              int k0, int nlen, typename Md::acc_t* dA_rows,
                              typename Md::acc_t* dB_rows, int H) {
  using acc_t = typename Md::acc_t;
  constexpr int BN = Md::BN;
  constexpr int kItems = ((Md::TI + Md::TJ) * BN + kThreads - 1) / kThreads;
  constexpr int kBatch = 32 / int(sizeof(acc_t));  // partials read ahead at a time (registers)
  const int tid = threadIdx.x;
  const int ii0 = m0 / nj, rows = (m0 + mlen - 1) / nj - ii0 + 1;  // rows the pairs touch
  const int n_items = (rows + nj) * BN;
  auto first_in_col = [&](int jj) { return m0 + ((jj - m0 % nj) % nj + nj) % nj; };
  // item e: the partial it adds to, or nullptr (beyond the items, or a column without pairs here)
  auto target = [&](int e) -> acc_t* {
    const int r = e / BN, c = e % BN;
    if (e >= n_items || c >= nlen) return nullptr;
    if (r < rows) return dA_rows + int64_t(ii0 + r) * H + k0 + c;
    const int jj = r - rows;
    return first_in_col(jj) < m0 + mlen ? dB_rows + int64_t(jj) * H + k0 + c : nullptr;
  };
  for (int b0 = 0; b0 < kItems; b0 += kBatch) {
    acc_t old[kBatch];
#pragma unroll
    for (int it = 0; it < kBatch; ++it) {
      const acc_t* d = target(tid + (b0 + it) * kThreads);
      old[it] = d != nullptr ? *d : acc_t(0);
    }
#pragma unroll
    for (int it = 0; it < kBatch; ++it) {
      const int e = tid + (b0 + it) * kThreads, r = e / BN, c = e % BN;
      acc_t* d = target(e);
      if (d == nullptr) continue;
      acc_t s = 0;
      if (r < rows) {
        const int ii = ii0 + r;
        const int p1 = min(m0 + mlen, (ii + 1) * nj);
        for (int p = max(m0, ii * nj); p < p1; ++p) s += Z[int64_t(p - m0) * ldz + c];
      } else {
        for (int p = first_in_col(r - rows); p < m0 + mlen; p += nj)
          s += Z[int64_t(p - m0) * ldz + c];
      }
      *d = old[it] + s;
    }
  }
}

template <class Md>
__global__ void __launch_bounds__(kThreads)
    mlp_bwd_kernel(MlpArgs<typename Md::T> a, MlpGrads<typename Md::acc_t> gr,
                   typename Md::T* scratch, int64_t scratch_stride, typename Md::acc_t* acc_scratch,
                   int64_t acc_scratch_stride) {
  using T = typename Md::T;
  using acc_t = typename Md::acc_t;
  using Gemm = BlockGemm<Md>;
  constexpr int C = Md::CHUNK;
  constexpr int V = kVec<T>;
  FCL_DYNAMIC_SMEM(smem);
  acc_t* t_acc = reinterpret_cast<acc_t*>(smem + Gemm::kSmemBytes);
  acc_t* dt = t_acc + C;
  // [kWarps] maxima, [kWarps] sums (block reductions), then scale, 1 / scale
  acc_t* red = dt + C;

  const int g = blockIdx.x, r = g / a.S, s = g % a.S;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int H = a.H, L = a.L;
  const int64_t CH = int64_t(C) * H;
  T* hbuf = scratch != nullptr ? scratch + int64_t(g) * scratch_stride : nullptr;  // L x [C, H]
  T* dzbuf = hbuf != nullptr ? hbuf + L * CH : nullptr;  // 1 or 2 x [C, H]
  // L = 0 only: dz_0 of the chunk, [C, H] (for L >= 1 it stays in shared memory)
  acc_t* dz0 = acc_scratch != nullptr ? acc_scratch + int64_t(g) * acc_scratch_stride : nullptr;
  auto hptr = [&](int l) -> T* { return hbuf + (l - 1) * CH; };  // h_l, l = 1..L

  acc_t* dW_part = gr.dW_part + int64_t(g) * L * H * H;
  acc_t* db_part = gr.db_part + int64_t(g) * L * H;
  acc_t* dwo_part = gr.dwo_part + int64_t(g) * H;
  acc_t* dbo_part = gr.dbo_part + g;
  acc_t* dA_part = gr.dA_part + int64_t(s) * a.N * H;
  acc_t* dB_part = gr.dB_part + int64_t(r) * a.M * H;
  const acc_t bout = to_acc(a.b_out[0]);
  // w_out[k .. k + n) for a column_sums group (zero beyond n)
  auto w_out_group = [&](int k, int n, acc_t* wo) {
#pragma unroll
    for (int t = 0; t < V; ++t) wo[t] = t < n ? to_acc(a.w_out[k + t]) : acc_t(0);
  };

  for (int64_t rc = r; rc < a.nrc; rc += a.R) {
    const int64_t i0 = rc * Md::TI;
    const int ni = int(min(int64_t(Md::TI), a.N - i0));
    for (int64_t cc = s; cc < a.ncc; cc += a.S) {
      const int64_t j0 = cc * Md::TJ;
      const int nj = int(min(int64_t(Md::TJ), a.M - j0));
      const int np = ni * nj;
      const T* __restrict__ Ab = a.A + i0 * H;
      const T* __restrict__ Bb = a.B + j0 * H;
      acc_t* dA_rows = dA_part + i0 * H;
      acc_t* dB_rows = dB_part + j0 * H;
      // (h_0 = act(A_i + B_j) is formed again wherever it is needed, by pair_act; never stored)

      mlp_chunk_scores<Md>(smem, a, i0, j0, ni, nj, t_acc, hptr);  // ends with a barrier

      // ---- dt_p, the per-chunk scale of the stored dz, and db_out ------------------------------
      acc_t local_max = 0, local_sum = 0;
      for (int p = tid; p < np; p += kThreads) {
        const int64_t i = i0 + p / nj, j = j0 + p % nj;
        const acc_t t = t_acc[p] + bout;
        const acc_t sc = out_act_fwd(t, a.out_act);
        acc_t ds = gr.g_lse[i] * dexp(sc - gr.lse[i]) + gr.g_rowsum[i];
        if (a.has_pos && j == i + a.pos_offset) ds += gr.g_pos[i];
        const acc_t d = ds * out_act_grad(t, a.out_act);
        dt[p] = d;
        local_sum += d;
        const acc_t ad = d < acc_t(0) ? -d : d;
        local_max = ad > local_max ? ad : local_max;  // NaN never wins: scale falls back to 1
      }
      local_max = warp_max(local_max);
      local_sum = warp_sum(local_sum);
      if (lane == 0) {
        red[warp] = local_max;
        red[kWarps + warp] = local_sum;
      }
      __syncthreads();
      if (tid == 0) {
        acc_t mx = 0, sb = 0;
        for (int w = 0; w < kWarps; ++w) {
          mx = red[w] > mx ? red[w] : mx;
          sb += red[kWarps + w];
        }
        const acc_t scale = pow2_scale_for(mx);
        red[2 * kWarps] = scale;
        red[2 * kWarps + 1] = acc_t(1) / scale;
        dbo_part[0] += sb;  // output bias: sum of dt over the chunk
      }
      __syncthreads();
      const acc_t scale = red[2 * kWarps], inv_scale = red[2 * kWarps + 1];

      if (L == 0) {
        // dw_out[k] += sum_p dt_p h_0(p, k);  dz_0 = dt_p * w_out * act'(h_0), into dz0
        const bool vec = vec_aligned(Ab, H) && vec_aligned(Bb, H);
        column_sums<Md, 1>(
            smem, H,
            [&](int k, int n, int q, int Q, acc_t(&sum)[1][V]) {
              acc_t wo[V];
              w_out_group(k, n, wo);
              for (int p = q; p < np; p += Q) {
                const acc_t d = dt[p];
                alignas(16) T av[V];
                alignas(16) T bv[V];
                load_group(av, Ab + int64_t(p / nj) * H + k, n, vec);
                load_group(bv, Bb + int64_t(p % nj) * H + k, n, vec);
                acc_t* dzp = dz0 + int64_t(p) * H + k;
#pragma unroll
                for (int t = 0; t < V; ++t)
                  if (t < n) {
                    const acc_t h = pair_act(av[t], bv[t], a.act);
                    dzp[t] = act_bwd_from_out(d * wo[t], h, a.act);
                    sum[0][t] += d * h;
                  }
              }
            },
            [&](int, int k, acc_t tot) { dwo_part[k] += tot; });
        for (int k0 = 0; k0 < H; k0 += Md::BN)  // (column_sums ended with a barrier)
          add_pair_sums<Md>(dz0 + k0, H, 0, np, nj, k0, min(Md::BN, H - k0), dA_rows, dB_rows, H);
      } else {
        // One pass over h_L: dz_L = dt_p * w_out * act'(h_L), scaled, into dz buffer 0, and the
        // sums dw_out[k] += sum_p dt_p h_L(p, k), db_L[k] += sum_p dz_L(p, k)
        {
          const T* hL = hptr(L);
          const bool vec = vec_aligned(hL, H);  // dzbuf has the same layout and alignment
          column_sums<Md, 2>(
              smem, H,
              [&](int k, int n, int q, int Q, acc_t(&sum)[2][V]) {
                acc_t wo[V];
                w_out_group(k, n, wo);
                for (int p = q; p < np; p += Q) {
                  const acc_t d = dt[p];
                  const int64_t e = int64_t(p) * H + k;
                  alignas(16) T hv[V];
                  alignas(16) T out[V];
                  load_group(hv, hL + e, n, vec);
#pragma unroll
                  for (int t = 0; t < V; ++t)
                    if (t < n) {
                      const acc_t h = to_acc(hv[t]);
                      const acc_t dz = act_bwd_from_out(d * wo[t], h, a.act);
                      out[t] = Cvt<T>::from(dz * scale);
                      sum[0][t] += d * h;
                      sum[1][t] += dz;
                    }
                  store_group(dzbuf + e, out, n, vec);
                }
              },
              [&](int which, int k, acc_t tot) {
                if (which == 0)
                  dwo_part[k] += tot;
                else
                  db_part[int64_t(L - 1) * H + k] += tot;
              });
        }
        int cur = 0;
        for (int l = L; l >= 1; --l) {
          const T* dzc = dzbuf + cur * CH;
          T* dzn = dzbuf + (1 - cur) * CH;  // only touched when l >= 2 (then 2 buffers exist)
          const T* hprev = l >= 2 ? hptr(l - 1) : nullptr;
          const T* __restrict__ Wl = a.W + int64_t(l - 1) * H * H;

          // db_l[o] += sum_p dz_l(p, o), for the layers below the top (whose came with dz_L)
          if (l < L) {
            const bool vec = vec_aligned(dzc, H);
            column_sums<Md, 1>(
                smem, H,
                [&](int k, int n, int q, int Q, acc_t(&sum)[1][V]) {
                  for (int p = q; p < np; p += Q) {
                    alignas(16) T v[V];
                    load_group(v, dzc + int64_t(p) * H + k, n, vec);
#pragma unroll
                    for (int t = 0; t < V; ++t)
                      if (t < n) sum[0][t] += to_acc(v[t]);
                  }
                },
                [&](int, int k, acc_t tot) { db_part[int64_t(l - 1) * H + k] += tot * inv_scale; });
          }

          // dW_l[o, k] += sum_p dz_l(p, o) h_(l-1)(p, k): M = H (o), N = H (k), K = pairs
          {
            acc_t* dWl = dW_part + int64_t(l - 1) * H * H;
            const Strided<T> opA(dzc, 1, H);  // opA(o, p) = dz_l[p][o]
            const auto opB = layer_input<Md>(a.act, Ab, Bb, H, nj, hprev);  // h_(l-1)(p, k)
            auto epi = [&](int m0, int n0, int mlen, int nlen, const acc_t* Cs) {
              for (int e = tid; e < Md::BM * Md::BN; e += kThreads) {
                const int mr = e / Md::BN, nc = e % Md::BN;
                if (mr < mlen && nc < nlen)
                  dWl[int64_t(m0 + mr) * H + n0 + nc] += Cs[mr * Md::LDC + nc] * inv_scale;
              }
            };
            Gemm::run(smem, H, H, np, /*a_k_fastest=*/false, opA, /*b_n_fastest=*/true, opB, epi);
          }

          // dh_(l-1)[p, k] = sum_o dz_l(p, o) W_l[o, k]: M = pairs, N = H (k), K = H (o)
          {
            const Strided<T> opA(dzc, H, 1);  // opA(p, o) = dz_l[p][o]
            const Strided<T> opB(Wl, H, 1);   // opB(o, k) = W_l[o][k]
            auto epi = [&](int m0, int n0, int mlen, int nlen, acc_t* Cs) {
              // one warp per pair row, lanes along k (h_0's row pointers once per pair):
              // l >= 2: dz_(l-1) into the other dz buffer; l = 1: dz_0 in place in the tile
              for (int mr = warp; mr < mlen; mr += kWarps) {
                const int p = m0 + mr;
                const T* ai = Ab + int64_t(p / nj) * H;
                const T* bj = Bb + int64_t(p % nj) * H;
                for (int nc = lane; nc < nlen; nc += 32) {
                  const int k = n0 + nc;
                  const acc_t dh = Cs[mr * Md::LDC + nc];
                  if (l >= 2) {
                    const int64_t idx = int64_t(p) * H + k;
                    dzn[idx] = Cvt<T>::from(act_bwd_from_out(dh, to_acc(hprev[idx]), a.act));
                  } else {
                    const acc_t h = pair_act(ai[k], bj[k], a.act);
                    Cs[mr * Md::LDC + nc] = act_bwd_from_out(dh * inv_scale, h, a.act);
                  }
                }
              }
              if (l == 1) {  // dA, dB from this tile's dz_0
                __syncthreads();
                add_pair_sums<Md>(Cs, Md::LDC, m0, mlen, nj, n0, nlen, dA_rows, dB_rows, H);
              }
            };
            Gemm::run(smem, np, H, H, /*a_k_fastest=*/true, opA, /*b_n_fastest=*/true, opB, epi);
          }
          cur = 1 - cur;
        }
      }
      __syncthreads();  // scratch, t_acc and dt are rewritten by the next chunk
    }
  }
}

using MlpGradsOut = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>,
                               std::vector<at::Tensor>, at::Tensor, at::Tensor>;

template <class Md>
static MlpGradsOut mlp_backward_impl(const at::Tensor& g_lse, const at::Tensor& g_pos,
                                     const at::Tensor& g_rowsum, const at::Tensor& A,
                                     const at::Tensor& B, const at::Tensor& W,
                                     const at::Tensor& bias, const at::Tensor& w_out,
                                     const at::Tensor& b_out, const at::Tensor& lse, int64_t L,
                                     int act, int out_act, int64_t pos_offset) {
  using T = typename Md::T;
  using acc_t = typename Md::acc_t;
  constexpr int C = Md::CHUNK;
  const int64_t N = A.size(0), M = B.size(0), H = A.size(1);
  const auto acc_opts = A.options().dtype(acc_scalar_type<Md>());

  MlpArgs<T> a{};
  a.A = ptr<T>(A);
  a.B = ptr<T>(B);
  a.W = L > 0 ? ptr<T>(W) : nullptr;
  a.bias = L > 0 ? ptr<T>(bias) : nullptr;
  a.w_out = ptr<T>(w_out);
  a.b_out = ptr<T>(b_out);
  a.N = N;
  a.M = M;
  a.H = int(H);
  a.L = int(L);
  a.act = act;
  a.out_act = out_act;
  a.has_pos = pos_offset >= 0;
  a.pos_offset = pos_offset;

  const int64_t n_dz = L >= 2 ? 2 : (L == 1 ? 1 : 0);
  const int64_t scratch_stride = (L + n_dz) * C * H;               // elements of T per block
  const int64_t acc_scratch_stride = L == 0 ? int64_t(C) * H : 0;  // dz_0 (L >= 1: in smem)
  const int64_t weight_part = L * H * H + L * H + H + 1;           // acc elements per block
  const int64_t per_block = scratch_stride * int64_t(sizeof(T)) +
                            (acc_scratch_stride + weight_part) * int64_t(sizeof(acc_t));
  const int64_t acc_bytes = sizeof(acc_t);

  // Bands. The split's [S, rows, H] and [R, cols, H] partials grow with N and M, so at large
  // N * M the budget shrinks the grid below the GPU (N = M = 32768, H = 512: 49 blocks on 132
  // SMs). Then the pair grid is cut into bands of nb rows x mb columns, launched one after
  // another with the same R x S split, each with partials the size of its band: dA's partials
  // add up over a row of bands and are reduced at its end, dB's are added into a float32 [M, H]
  // sum after every band. Bands halve (the longer side) while that gives more blocks and
  // leaves each band at least two waves' worth of chunks.
  auto plan_for = [&](int64_t nb, int64_t mb) {
    const bool banded = nb < N || mb < M;
    return plan_square(ceil_div(nb, Md::TI), ceil_div(mb, Md::TJ), nb, mb,
                       [&](int64_t R, int64_t S) {
                         return R * S * per_block + (S * nb + R * mb) * H * acc_bytes +
                                (banded ? M * H * acc_bytes : 0);
                       });
  };
  const int64_t target = std::min<int64_t>(sm_count(), ceil_div(N, Md::TI) * ceil_div(M, Md::TJ));
  int64_t nb = N, mb = M;
  Split sp = plan_for(nb, mb);
  for (int64_t tb = nb, tm = mb; sp.blocks() < target;) {
    if (tb >= tm && tb > Md::TI)
      tb = ceil_div(ceil_div(tb, 2), Md::TI) * Md::TI;
    else if (tm > Md::TJ)
      tm = ceil_div(ceil_div(tm, 2), Md::TJ) * Md::TJ;
    else
      break;
    if (ceil_div(tb, Md::TI) * ceil_div(tm, Md::TJ) < 2 * target) break;
    const Split t = plan_for(tb, tm);
    if (t.blocks() > sp.blocks()) {
      sp = t;
      nb = tb;
      mb = tm;
    }
  }
#ifdef FCL_EMULATION
  int64_t fb = 0, fm = 0;
  if (emu::forced_bands(fb, fm)) {
    nb = std::min(N, ceil_div(fb, Md::TI) * Md::TI);
    mb = std::min(M, ceil_div(fm, Md::TJ) * Md::TJ);
    sp = plan_for(nb, mb);
  }
#endif
  const bool banded = nb < N || mb < M;
  a.R = sp.R;
  a.S = sp.S;
  const int64_t G = sp.blocks();

  // Partials start at zero: every block adds into its own slices.
  at::Tensor dA_part = at::zeros({a.S, nb, H}, acc_opts);
  at::Tensor dB_part = at::zeros({a.R, mb, H}, acc_opts);
  at::Tensor dB_sum = banded ? at::zeros({M, H}, acc_opts) : at::Tensor();
  at::Tensor dW_part = L > 0 ? at::zeros({G, L * H * H}, acc_opts) : at::Tensor();
  at::Tensor db_part = L > 0 ? at::zeros({G, L * H}, acc_opts) : at::Tensor();
  at::Tensor dwo_part = at::zeros({G, H}, acc_opts);
  at::Tensor dbo_part = at::zeros({G}, acc_opts);
  at::Tensor scratch;
  if (scratch_stride > 0) scratch = at::empty({G * scratch_stride}, A.options());
  at::Tensor acc_scratch;
  if (acc_scratch_stride > 0) acc_scratch = at::empty({G * acc_scratch_stride}, acc_opts);

  MlpGrads<acc_t> gr{};
  gr.dA_part = ptr<acc_t>(dA_part);
  gr.dB_part = ptr<acc_t>(dB_part);
  gr.dW_part = ptr<acc_t>(dW_part);
  gr.db_part = ptr<acc_t>(db_part);
  gr.dwo_part = ptr<acc_t>(dwo_part);
  gr.dbo_part = ptr<acc_t>(dbo_part);

  const size_t smem = BlockGemm<Md>::kSmemBytes + (2 * size_t(C) + 2 * kWarps + 2) * sizeof(acc_t);
  at::Tensor dA = at::empty({N, H}, A.options());
  at::Tensor dB = at::empty({M, H}, A.options());
  for (int64_t r0 = 0; r0 < N; r0 += nb) {
    const int64_t n_r = std::min(nb, N - r0);
    if (r0 > 0) dA_part.zero_();
    for (int64_t c0 = 0; c0 < M; c0 += mb) {
      const int64_t m_c = std::min(mb, M - c0);
      if (r0 > 0 || c0 > 0) dB_part.zero_();
      MlpArgs<T> band = a;  // the band as a problem of its own: rows r0.., columns c0..
      band.A = a.A + r0 * H;
      band.B = a.B + c0 * H;
      band.N = n_r;
      band.M = m_c;
      band.nrc = ceil_div(n_r, Md::TI);
      band.ncc = ceil_div(m_c, Md::TJ);
      band.pos_offset = pos_offset + r0 - c0;  // j = i + off in the band's own indices
      gr.g_lse = ptr<acc_t>(g_lse) + r0;
      gr.g_pos = ptr<acc_t>(g_pos) + r0;
      gr.g_rowsum = ptr<acc_t>(g_rowsum) + r0;
      gr.lse = ptr<acc_t>(lse) + r0;
      launch_kernel(mlp_bwd_kernel<Md>, G, smem, band, gr, ptr<T>(scratch), scratch_stride,
                    ptr<acc_t>(acc_scratch), acc_scratch_stride);
      if (banded)
        reduce_partials<acc_t, acc_t>(dB_part, 0, a.R, m_c * H, m_c * H, dB_sum.narrow(0, c0, m_c),
                                      /*accumulate=*/true);
    }
    reduce_partials<acc_t, T>(dA_part, 0, a.S, n_r * H, n_r * H, dA.narrow(0, r0, n_r));
  }
  if (banded)
    reduce_partials<acc_t, T>(dB_sum, 0, 1, M * H, M * H, dB);
  else
    reduce_partials<acc_t, T>(dB_part, 0, a.R, M * H, M * H, dB);
  at::Tensor dwo = at::empty({H}, A.options());
  at::Tensor dbo = at::empty({1}, A.options());
  std::vector<at::Tensor> dW, db;
  for (int64_t l = 0; l < L; ++l) {
    dW.push_back(at::empty({H, H}, A.options()));
    db.push_back(at::empty({H}, A.options()));
    reduce_partials<acc_t, T>(dW_part, l * H * H, G, L * H * H, H * H, dW.back());
    reduce_partials<acc_t, T>(db_part, l * H, G, L * H, H, db.back());
  }
  reduce_partials<acc_t, T>(dwo_part, 0, G, H, H, dwo);
  reduce_partials<acc_t, T>(dbo_part, 0, G, 1, 1, dbo);
  return {dA, dB, dW, db, dwo, dbo};
}

MlpGradsOut mlp_backward(ModeId mode, const at::Tensor& grad_lse, const at::Tensor& grad_pos,
                         const at::Tensor& grad_rowsum, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& W, const at::Tensor& bias, const at::Tensor& w_out,
                         const at::Tensor& b_out, const at::Tensor& lse, int64_t L, int act,
                         int out_act, int64_t pos_offset) {
  return dispatch_mode(mode, [&](auto tag) {
    using Md = typename decltype(tag)::type;
    return mlp_backward_impl<Md>(grad_lse, grad_pos, grad_rowsum, A, B, W, bias, w_out, b_out, lse,
                                 L, act, out_act, pos_offset);
  });
}

}  // namespace factorcl_ext::cuda
