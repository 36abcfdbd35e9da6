// Concat critic backward by recomputation (DESIGN.md section 2): for each chunk of pairs, redo
// the forward keeping h_1..h_L in per-block scratch, form dL/ds from the saved lse, and
// back-propagate through the MLP with block GEMMs:
//
//   dt_p   = ds_p * out_act'(t_p)                 ds_p = g_lse e^(s_p - lse_i) + g_pos [j = i + off] + g_rowsum
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
#include "host_common.cuh"
#include "pair_mlp.cuh"

namespace factorcl_ext::cuda {

template <class A>
struct MlpGrads {
  const A* __restrict__ g_lse;
  const A* __restrict__ g_pos;
  const A* __restrict__ g_rowsum;
  const A* __restrict__ lse;
  A* dA_part;    // [S, N, H]
  A* dB_part;    // [R, M, H]
  A* dW_part;    // [G, L, H, H]
  A* db_part;    // [G, L, H]
  A* dwo_part;   // [G, H]
  A* dbo_part;   // [G]
};

template <class Md>
__global__ void __launch_bounds__(kThreads)
    mlp_bwd_kernel(MlpArgs<typename Md::T> a, MlpGrads<typename Md::acc_t> gr,
                   typename Md::T* scratch, int64_t scratch_stride,
                   typename Md::acc_t* acc_scratch, int64_t acc_scratch_stride) {
  using T = typename Md::T;
  using acc_t = typename Md::acc_t;
  using Gemm = BlockGemm<Md>;
  constexpr int C = Md::CHUNK;
  FCL_DYNAMIC_SMEM(smem);
  acc_t* t_acc = reinterpret_cast<acc_t*>(smem + Gemm::kSmemBytes);
  acc_t* dt = t_acc + C;
  acc_t* red = dt + C;  // [kWarps] block-reduction scratch, then [kWarps] = scale, [+1] = 1/scale

  const int g = blockIdx.x, r = g / a.S, s = g % a.S;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int H = a.H, L = a.L;
  const int64_t CH = int64_t(C) * H;
  T* hbuf = scratch != nullptr ? scratch + int64_t(g) * scratch_stride : nullptr;  // L x [C, H]
  T* dzbuf = hbuf != nullptr ? hbuf + L * CH : nullptr;  // 1 or 2 x [C, H]
  acc_t* dz0 = acc_scratch + int64_t(g) * acc_scratch_stride;  // [C, H], float32 / float64
  auto hptr = [&](int l) -> T* { return hbuf + (l - 1) * CH; };  // h_l, l = 1..L

  acc_t* dW_part = gr.dW_part + int64_t(g) * L * H * H;
  acc_t* db_part = gr.db_part + int64_t(g) * L * H;
  acc_t* dwo_part = gr.dwo_part + int64_t(g) * H;
  acc_t* dbo_part = gr.dbo_part + g;
  acc_t* dA_part = gr.dA_part + int64_t(s) * a.N * H;
  acc_t* dB_part = gr.dB_part + int64_t(r) * a.M * H;
  const acc_t bout = to_acc(a.b_out[0]);

  for (int64_t rc = r; rc < a.nrc; rc += a.R) {
    const int64_t i0 = rc * Md::TI;
    const int ni = int(min(int64_t(Md::TI), a.N - i0));
    for (int64_t cc = s; cc < a.ncc; cc += a.S) {
      const int64_t j0 = cc * Md::TJ;
      const int nj = int(min(int64_t(Md::TJ), a.M - j0));
      const int np = ni * nj;
      const T* __restrict__ Ab = a.A + i0 * H;
      const T* __restrict__ Bb = a.B + j0 * H;
      // (h_0 = act(A_i + B_j) is formed again wherever it is needed, by pair_act; never stored)

      mlp_chunk_scores<Md>(smem, a, i0, j0, ni, nj, t_acc, hptr);  // ends with a barrier

      // ---- dt_p and the per-chunk scale of the stored dz -------------------------------------
      acc_t local_max = 0;
      for (int p = tid; p < np; p += kThreads) {
        const int64_t i = i0 + p / nj, j = j0 + p % nj;
        const acc_t t = t_acc[p] + bout;
        const acc_t sc = out_act_fwd(t, a.out_act);
        acc_t ds = gr.g_lse[i] * dexp(sc - gr.lse[i]) + gr.g_rowsum[i];
        if (a.pos_offset >= 0 && j == i + a.pos_offset) ds += gr.g_pos[i];
        const acc_t d = ds * out_act_grad(t, a.out_act);
        dt[p] = d;
        const acc_t ad = d < acc_t(0) ? -d : d;
        local_max = ad > local_max ? ad : local_max;  // NaN never wins: scale falls back to 1
      }
      local_max = warp_max(local_max);
      if (lane == 0) red[warp] = local_max;
      __syncthreads();
      if (tid == 0) {
        acc_t mx = 0;
        for (int w = 0; w < kWarps; ++w) mx = red[w] > mx ? red[w] : mx;
        const acc_t scale = pow2_scale_for(mx);
        red[kWarps] = scale;
        red[kWarps + 1] = acc_t(1) / scale;
        // output bias: sum of dt over the chunk, in pair order
        acc_t sb = 0;
        for (int p = 0; p < np; ++p) sb += dt[p];
        dbo_part[0] += sb;
      }
      __syncthreads();
      const acc_t scale = red[kWarps], inv_scale = red[kWarps + 1];

      // ---- output layer: dw_out[n] += sum_p dt_p h_L(p, n) -----------------------------------
      for (int n = tid; n < H; n += kThreads) {
        acc_t sw = 0;
        if (L > 0) {
          const T* hL = hptr(L);
          for (int p = 0; p < np; ++p) sw += dt[p] * to_acc(hL[int64_t(p) * H + n]);
        } else {
          for (int ii = 0, p = 0; ii < ni; ++ii)
            for (int jj = 0; jj < nj; ++jj, ++p)
              sw += dt[p] * pair_act(Ab[int64_t(ii) * H + n], Bb[int64_t(jj) * H + n], a.act);
        }
        dwo_part[n] += sw;
      }

      // (element loops over the chunk's [np, H] run one warp per pair, lanes along H: no
      // division per element)
      if (L == 0) {
        for (int p = warp; p < np; p += kWarps) {
          const T* ai = Ab + int64_t(p / nj) * H;
          const T* bj = Bb + int64_t(p % nj) * H;
          acc_t* dzp = dz0 + int64_t(p) * H;
          for (int k = lane; k < H; k += 32)
            dzp[k] = dt[p] * to_acc(a.w_out[k]) *
                     act_grad_from_out(pair_act(ai[k], bj[k], a.act), a.act);
        }
        __syncthreads();
      } else {
        // dz_L = dt_p * w_out * act'(h_L), scaled, into dz buffer 0
        {
          const T* hL = hptr(L);
          for (int p = warp; p < np; p += kWarps) {
            const acc_t dts = dt[p] * scale;
            for (int k = lane; k < H; k += 32) {
              const int64_t e = int64_t(p) * H + k;
              dzbuf[e] = Cvt<T>::from(dts * to_acc(a.w_out[k]) *
                                      act_grad_from_out(to_acc(hL[e]), a.act));
            }
          }
        }
        __syncthreads();
        int cur = 0;
        for (int l = L; l >= 1; --l) {
          const T* dzc = dzbuf + cur * CH;
          T* dzn = dzbuf + (1 - cur) * CH;  // only touched when l >= 2 (then 2 buffers exist)
          const T* hprev = l >= 2 ? hptr(l - 1) : nullptr;
          const T* __restrict__ Wl = a.W + int64_t(l - 1) * H * H;

          // db_l[o] += sum_p dz_l(p, o)
          for (int o = tid; o < H; o += kThreads) {
            acc_t sb = 0;
            for (int p = 0; p < np; ++p) sb += to_acc(dzc[int64_t(p) * H + o]);
            db_part[int64_t(l - 1) * H + o] += sb * inv_scale;
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
            auto epi = [&](int m0, int n0, int mlen, int nlen, const acc_t* Cs) {
              // one warp per pair row, lanes along k (h_0's row pointers once per pair)
              for (int mr = warp; mr < mlen; mr += kWarps) {
                const int p = m0 + mr;
                const T* ai = Ab + int64_t(p / nj) * H;
                const T* bj = Bb + int64_t(p % nj) * H;
                for (int nc = lane; nc < nlen; nc += 32) {
                  const int k = n0 + nc;
                  const int64_t idx = int64_t(p) * H + k;
                  const acc_t dh = Cs[mr * Md::LDC + nc];
                  if (l >= 2) {
                    dzn[idx] = Cvt<T>::from(dh * act_grad_from_out(to_acc(hprev[idx]), a.act));
                  } else {
                    const acc_t h = pair_act(ai[k], bj[k], a.act);
                    dz0[idx] = dh * inv_scale * act_grad_from_out(h, a.act);
                  }
                }
              }
            };
            Gemm::run(smem, np, H, H, /*a_k_fastest=*/true, opA, /*b_n_fastest=*/true, opB, epi);
          }
          cur = 1 - cur;
        }
      }

      // ---- dA_i += sum_j dz_0(i, j), dB_j += sum_i dz_0(i, j), in pair order ------------------
      for (int e = tid; e < ni * H; e += kThreads) {
        const int ii = e / H, k = e % H;
        acc_t sa = 0;
        for (int jj = 0; jj < nj; ++jj) sa += dz0[int64_t(ii * nj + jj) * H + k];
        dA_part[(i0 + ii) * H + k] += sa;
      }
      for (int e = tid; e < nj * H; e += kThreads) {
        const int jj = e / H, k = e % H;
        acc_t sb = 0;
        for (int ii = 0; ii < ni; ++ii) sb += dz0[int64_t(ii * nj + jj) * H + k];
        dB_part[(j0 + jj) * H + k] += sb;
      }
      __syncthreads();  // scratch, t_acc and dt are rewritten by the next chunk
    }
  }
}

using MlpGradsOut = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>,
                               std::vector<at::Tensor>, at::Tensor, at::Tensor>;

template <class Md>
static MlpGradsOut mlp_backward_impl(const at::Tensor& g_lse, const at::Tensor& g_pos, const at::Tensor& g_rowsum,
                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& W,
                  const at::Tensor& bias, const at::Tensor& w_out, const at::Tensor& b_out,
                  const at::Tensor& lse, int64_t L, int act, int out_act, int64_t pos_offset) {
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
  a.pos_offset = pos_offset;
  a.nrc = ceil_div(N, Md::TI);
  a.ncc = ceil_div(M, Md::TJ);

  const int64_t n_dz = L >= 2 ? 2 : (L == 1 ? 1 : 0);
  const int64_t scratch_stride = (L + n_dz) * C * H;            // elements of T per block
  const int64_t acc_scratch_stride = int64_t(C) * H;            // dz_0
  const int64_t weight_part = L * H * H + L * H + H + 1;         // acc elements per block
  const int64_t per_block = scratch_stride * int64_t(sizeof(T)) +
                            (acc_scratch_stride + weight_part) * int64_t(sizeof(acc_t));
  const Split sp = plan_square(a.nrc, a.ncc, [&](int64_t R, int64_t S) {
    return R * S * per_block + (S * N + R * M) * H * int64_t(sizeof(acc_t));
  });
  a.R = sp.R;
  a.S = sp.S;
  const int64_t G = sp.blocks();

  // Partials start at zero: every block adds into its own slices.
  at::Tensor dA_part = at::zeros({a.S, N, H}, acc_opts);
  at::Tensor dB_part = at::zeros({a.R, M, H}, acc_opts);
  at::Tensor dW_part = L > 0 ? at::zeros({G, L * H * H}, acc_opts) : at::Tensor();
  at::Tensor db_part = L > 0 ? at::zeros({G, L * H}, acc_opts) : at::Tensor();
  at::Tensor dwo_part = at::zeros({G, H}, acc_opts);
  at::Tensor dbo_part = at::zeros({G}, acc_opts);
  at::Tensor scratch;
  if (scratch_stride > 0) scratch = at::empty({G * scratch_stride}, A.options());
  at::Tensor acc_scratch = at::empty({G * acc_scratch_stride}, acc_opts);

  MlpGrads<acc_t> gr{};
  gr.g_lse = ptr<acc_t>(g_lse);
  gr.g_pos = ptr<acc_t>(g_pos);
  gr.g_rowsum = ptr<acc_t>(g_rowsum);
  gr.lse = ptr<acc_t>(lse);
  gr.dA_part = ptr<acc_t>(dA_part);
  gr.dB_part = ptr<acc_t>(dB_part);
  gr.dW_part = ptr<acc_t>(dW_part);
  gr.db_part = ptr<acc_t>(db_part);
  gr.dwo_part = ptr<acc_t>(dwo_part);
  gr.dbo_part = ptr<acc_t>(dbo_part);

  const size_t smem =
      BlockGemm<Md>::kSmemBytes + (2 * size_t(C) + kWarps + 2) * sizeof(acc_t);
  launch_kernel(mlp_bwd_kernel<Md>, G, smem, a, gr, ptr<T>(scratch), scratch_stride,
                ptr<acc_t>(acc_scratch), acc_scratch_stride);

  at::Tensor dA = at::empty({N, H}, A.options());
  at::Tensor dB = at::empty({M, H}, A.options());
  at::Tensor dwo = at::empty({H}, A.options());
  at::Tensor dbo = at::empty({1}, A.options());
  reduce_partials<acc_t, T>(dA_part, 0, a.S, N * H, N * H, dA);
  reduce_partials<acc_t, T>(dB_part, 0, a.R, M * H, M * H, dB);
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

MlpGradsOut mlp_backward(
    ModeId mode, const at::Tensor& grad_lse, const at::Tensor& grad_pos,
    const at::Tensor& grad_rowsum, const at::Tensor& A, const at::Tensor& B, const at::Tensor& W,
    const at::Tensor& bias, const at::Tensor& w_out, const at::Tensor& b_out,
    const at::Tensor& lse, int64_t L, int act, int out_act, int64_t pos_offset) {
  return dispatch_mode(mode, [&](auto tag) {
    using Md = typename decltype(tag)::type;
    return mlp_backward_impl<Md>(grad_lse, grad_pos, grad_rowsum, A, B, W, bias, w_out, b_out,
                                 lse, L, act, out_act, pos_offset);
  });
}

}  // namespace factorcl_ext::cuda
