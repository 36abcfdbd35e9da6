// Separable critic s = G H^T (DESIGN.md section 3): a tiled GEMM whose epilogue folds each score
// tile into an online logsumexp (forward), and a recomputing backward
//
//   ds_ij = [j != i + excl] (g_lse_i e^(s_ij - lse_i) + g_rowsum_i) + g_pos_i [j = i + pos]
//   dG_i  = sum_j ds_ij H_j          dH_j = sum_i ds_ij G_i
//
// that forms each ds tile (in the input dtype, with a per-tile power-of-two scale so that fp16
// does not flush small softmax terms to zero) and multiplies it straight back with two block
// GEMMs. No N x M buffer: one BM x BN tile per block at a time. The work split and the fixed-order
// partial sums are those of common.cuh.
#include "host_common.cuh"

namespace factorcl_ext::cuda {

template <class T>
struct DotArgs {
  const T* __restrict__ G;  // [N, D]
  const T* __restrict__ H;  // [M, D]
  int64_t N, M;
  int D;
  int64_t pos_offset;      // -1: none
  int64_t exclude_offset;  // -1: none
  int R, S;
  int64_t nrt, nct;  // row / column tiles
};

template <class Md>
__global__ void __launch_bounds__(kThreads)
    dot_fwd_kernel(DotArgs<typename Md::T> a, typename Md::acc_t* __restrict__ part,
                   typename Md::acc_t* __restrict__ pos_out) {
  using T = typename Md::T;
  using acc_t = typename Md::acc_t;
  constexpr int TPR = kThreads / Md::BM;  // threads sharing one score row in the epilogue
  static_assert(TPR >= 1 && 32 % TPR == 0, "a row's threads must sit in one warp");
  FCL_DYNAMIC_SMEM(smem);
  const int g = blockIdx.x, r = g / a.S, s = g % a.S, tid = threadIdx.x;
  const int row = tid / TPR, sub = tid % TPR;
  const int D = a.D;
  acc_t* part_m = part;
  acc_t* part_l = part + int64_t(a.S) * a.N;
  acc_t* part_r = part + 2 * int64_t(a.S) * a.N;

  for (int64_t rt = r; rt < a.nrt; rt += a.R) {
    const int64_t i0 = rt * Md::BM;
    const int ni = int(min(int64_t(Md::BM), a.N - i0));
    acc_t run_m = -INFINITY, run_l = 0, run_r = 0;  // row i0 + row, kept by sub == 0
    for (int64_t ct = s; ct < a.nct; ct += a.S) {
      const int64_t j0 = ct * Md::BN;
      const int nj = int(min(int64_t(Md::BN), a.M - j0));
      const Strided<T> opA(a.G + i0 * D, D, 1);  // opA(m, k) = G[i0 + m][k]
      const Strided<T> opB(a.H + j0 * D, 1, D);  // opB(k, n) = H[j0 + n][k]
      auto epi = [&](int, int, int mlen, int nlen, const acc_t* Cs) {
        acc_t m = -INFINITY, l = 0, rs = 0;
        if (row < mlen) {
          const int64_t i = i0 + row;
          for (int nc = sub; nc < nlen; nc += TPR) {
            const int64_t j = j0 + nc;
            const acc_t x = Cs[row * Md::LDC + nc];
            if (a.pos_offset >= 0 && j == i + a.pos_offset) pos_out[i] = x;
            if (a.exclude_offset < 0 || j != i + a.exclude_offset) {
              lse_push(m, l, x);
              rs += x;
            }
          }
        }
        // Fold the TPR partial states of a row into its sub == 0 thread, in a fixed order.
#pragma unroll
        for (int off = 1; off < TPR; off <<= 1) {
          const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, off);
          const acc_t l2 = __shfl_xor_sync(0xffffffffu, l, off);
          const acc_t r2 = __shfl_xor_sync(0xffffffffu, rs, off);
          lse_merge(m, l, m2, l2);
          rs += r2;
        }
        if (sub == 0 && row < mlen) {
          lse_merge(run_m, run_l, m, l);
          run_r += rs;
        }
      };
      BlockGemm<Md>::run(smem, ni, nj, D, /*a_k_fastest=*/true, opA, /*b_n_fastest=*/false, opB,
                         epi);
    }
    if (sub == 0 && row < ni) {
      const int64_t k = int64_t(s) * a.N + i0 + row;
      part_m[k] = run_m;
      part_l[k] = run_l;
      part_r[k] = run_r;
    }
  }
}

template <class A>
struct DotGrads {
  const A* __restrict__ g_lse;
  const A* __restrict__ g_pos;
  const A* __restrict__ g_rowsum;
  const A* __restrict__ lse;
  A* dG_part;  // [S, N, D]
  A* dH_part;  // [R, M, D]
};

// Which gradients a backward launch forms (from the same recomputed ds tiles).
constexpr int kDotGradG = 1, kDotGradH = 2;

template <class Md>
__global__ void __launch_bounds__(kThreads)
    dot_bwd_kernel(DotArgs<typename Md::T> a, DotGrads<typename Md::acc_t> gr,
                   typename Md::T* scratch, int parts) {
  using T = typename Md::T;
  using acc_t = typename Md::acc_t;
  using Gemm = BlockGemm<Md>;
  constexpr int BM = Md::BM, BN = Md::BN;
  FCL_DYNAMIC_SMEM(smem);
  acc_t* red = reinterpret_cast<acc_t*>(smem + Gemm::kSmemBytes);  // [kWarps + 2]
  const int g = blockIdx.x, r = g / a.S, s = g % a.S;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int D = a.D;
  T* dst = scratch + int64_t(g) * BM * BN;  // scaled ds tile, GEMM operand type
  // the ds tile in the accumulation type stays where the recompute GEMM left its scores: its
  // epilogue rewrites them in place, and the barrier after it keeps them for the code below
  const acc_t* ds_acc = reinterpret_cast<const acc_t*>(smem);  // row stride Md::LDC
  acc_t* dG_part = gr.dG_part + int64_t(s) * a.N * D;
  acc_t* dH_part = gr.dH_part + int64_t(r) * a.M * D;

  for (int64_t rt = r; rt < a.nrt; rt += a.R) {
    const int64_t i0 = rt * BM;
    const int ni = int(min(int64_t(BM), a.N - i0));
    for (int64_t ct = s; ct < a.nct; ct += a.S) {
      const int64_t j0 = ct * BN;
      const int nj = int(min(int64_t(BN), a.M - j0));

      // ---- recompute the score tile, turn it into ds ------------------------------------------
      acc_t local_max = 0;
      {
        const Strided<T> opA(a.G + i0 * D, D, 1);  // opA(m, k) = G[i0 + m][k]
        const Strided<T> opB(a.H + j0 * D, 1, D);  // opB(k, n) = H[j0 + n][k]
        auto epi = [&](int, int, int mlen, int nlen, acc_t* Cs) {
          for (int e = tid; e < BM * BN; e += kThreads) {
            const int mr = e / BN, nc = e % BN;
            if (mr < mlen && nc < nlen) {
              const int64_t i = i0 + mr, j = j0 + nc;
              const acc_t x = Cs[mr * Md::LDC + nc];
              acc_t ds = 0;
              if (a.exclude_offset < 0 || j != i + a.exclude_offset)
                ds = gr.g_lse[i] * dexp(x - gr.lse[i]) + gr.g_rowsum[i];
              if (a.pos_offset >= 0 && j == i + a.pos_offset) ds += gr.g_pos[i];
              Cs[mr * Md::LDC + nc] = ds;
              const acc_t ad = ds < acc_t(0) ? -ds : ds;
              local_max = ad > local_max ? ad : local_max;
            }
          }
        };
        Gemm::run(smem, ni, nj, D, /*a_k_fastest=*/true, opA, /*b_n_fastest=*/false, opB, epi);
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
      }
      __syncthreads();
      const acc_t scale = red[kWarps], inv_scale = red[kWarps + 1];
      for (int e = tid; e < BM * BN; e += kThreads) {
        const int mr = e / BN, nc = e % BN;
        if (mr < ni && nc < nj) dst[e] = Cvt<T>::from(ds_acc[mr * Md::LDC + nc] * scale);
      }
      __syncthreads();

      // ---- dG_i += sum_j ds_ij H_j: M = rows, N = D, K = columns ------------------------------
      if (parts & kDotGradG) {
        const Strided<T> opA(dst, BN, 1);          // opA(m, n) = ds[m][n], scaled
        const Strided<T> opB(a.H + j0 * D, D, 1);  // opB(n, d) = H[j0 + n][d]
        auto epi = [&](int m0, int n0, int mlen, int nlen, const acc_t* Cs) {
          for (int e = tid; e < BM * BN; e += kThreads) {
            const int mr = e / BN, nc = e % BN;
            if (mr < mlen && nc < nlen)
              dG_part[(i0 + m0 + mr) * D + n0 + nc] += Cs[mr * Md::LDC + nc] * inv_scale;
          }
        };
        Gemm::run(smem, ni, D, nj, /*a_k_fastest=*/true, opA, /*b_n_fastest=*/true, opB, epi);
      }
      // ---- dH_j += sum_i ds_ij G_i: M = columns, N = D, K = rows -------------------------------
      if (parts & kDotGradH) {
        const Strided<T> opA(dst, 1, BN);          // opA(n, m) = ds[m][n], scaled
        const Strided<T> opB(a.G + i0 * D, D, 1);  // opB(m, d) = G[i0 + m][d]
        auto epi = [&](int m0, int n0, int mlen, int nlen, const acc_t* Cs) {
          for (int e = tid; e < BM * BN; e += kThreads) {
            const int mr = e / BN, nc = e % BN;
            if (mr < mlen && nc < nlen)
              dH_part[(j0 + m0 + mr) * D + n0 + nc] += Cs[mr * Md::LDC + nc] * inv_scale;
          }
        };
        Gemm::run(smem, nj, D, ni, /*a_k_fastest=*/false, opA, /*b_n_fastest=*/true, opB, epi);
      }
      // (the last GEMM's closing barrier protects dst / red from the next tile; `parts`
      // is the same for the whole block, so at least one GEMM runs)
    }
  }
}

template <class Md>
static DotArgs<typename Md::T> dot_args(const at::Tensor& G, const at::Tensor& H,
                                        int64_t pos_offset, int64_t exclude_offset) {
  DotArgs<typename Md::T> a{};
  a.G = ptr<typename Md::T>(G);
  a.H = ptr<typename Md::T>(H);
  a.N = G.size(0);
  a.M = H.size(0);
  a.D = int(G.size(1));
  a.pos_offset = pos_offset;
  a.exclude_offset = exclude_offset;
  a.nrt = ceil_div(a.N, Md::BM);
  a.nct = ceil_div(a.M, Md::BN);
  return a;
}

template <class Md>
static Stats dot_forward_impl(const at::Tensor& G, const at::Tensor& H, int64_t pos_offset,
                              int64_t exclude_offset) {
  using acc_t = typename Md::acc_t;
  auto a = dot_args<Md>(G, H, pos_offset, exclude_offset);
  const Split sp = plan_rows_first(a.nrt, a.nct, 0);
  a.R = sp.R;
  a.S = sp.S;
  const int64_t N = a.N;
  const auto acc_opts = G.options().dtype(acc_scalar_type<Md>());
  at::Tensor part = at::empty({3, a.S, N}, acc_opts);
  at::Tensor lse = at::empty({N}, acc_opts);
  at::Tensor rowsum = at::empty({N}, acc_opts);
  at::Tensor pos = pos_offset >= 0 ? at::empty({N}, acc_opts) : at::zeros({N}, acc_opts);
  const size_t smem = BlockGemm<Md>::kSmemBytes;
  launch_kernel(dot_fwd_kernel<Md>, sp.blocks(), smem, a, ptr<acc_t>(part), ptr<acc_t>(pos));
  merge_stats<acc_t>(part, a.S, N, lse, rowsum);
  return {lse, pos, rowsum};
}

template <class Md>
static std::tuple<at::Tensor, at::Tensor> dot_backward_impl(
    const at::Tensor& g_lse, const at::Tensor& g_pos, const at::Tensor& g_rowsum,
    const at::Tensor& G, const at::Tensor& H, const at::Tensor& lse, int64_t pos_offset,
    int64_t exclude_offset) {
  using T = typename Md::T;
  using acc_t = typename Md::acc_t;
  auto a = dot_args<Md>(G, H, pos_offset, exclude_offset);
  const int64_t N = a.N, M = a.M, D = a.D;
  const int64_t tile = int64_t(Md::BM) * Md::BN;
  const int64_t per_block = tile * int64_t(sizeof(T));  // the scaled ds tile
  const auto acc_opts = G.options().dtype(acc_scalar_type<Md>());
  DotGrads<acc_t> gr{};
  gr.g_lse = ptr<acc_t>(g_lse);
  gr.g_pos = ptr<acc_t>(g_pos);
  gr.g_rowsum = ptr<acc_t>(g_rowsum);
  gr.lse = ptr<acc_t>(lse);
  const size_t smem = BlockGemm<Md>::kSmemBytes + (kWarps + 2) * sizeof(acc_t);

  // One pass forms dG and dH from each ds tile, with [S, N, D] and [R, M, D] partials for an
  // R x S split of the tile grid. Those partials are what the workspace budget bounds, so at
  // large N * D the split shrinks far below the GPU (N = M = 65536, D = 512: 134 MB per float32
  // slice, a handful of blocks). Then two passes run instead, each over the whole grid with no
  // partials at all: blocks own row tiles and form dG, then own column tiles and form dH, each
  // recomputing ds (four tile products instead of three).
  const int64_t two_per_sm = 2 * int64_t(sm_count());
  const Split one = plan_square(a.nrt, a.nct, N, M, [&](int64_t R, int64_t S) {
    return R * S * per_block + (S * N + R * M) * D * int64_t(sizeof(acc_t));
  });
  const int64_t scratch_blocks = std::max<int64_t>(1, workspace_budget() / per_block);
  Split rows, cols;  // the two passes' splits: R x 1 and 1 x S
  rows.R = int(std::min({a.nrt, two_per_sm, scratch_blocks}));
  cols.S = int(std::min({a.nct, two_per_sm, scratch_blocks}));
  const bool two_pass = one.blocks() < std::min(two_per_sm, a.nrt * a.nct) &&
                        std::min(rows.blocks(), cols.blocks()) > one.blocks();
  // (split, gradients it forms) per launch; partial slices: S of dG and R of dH in one pass,
  // one of each in two
  const std::vector<std::pair<Split, int>> passes =
      two_pass ? std::vector<std::pair<Split, int>>{{rows, kDotGradG}, {cols, kDotGradH}}
               : std::vector<std::pair<Split, int>>{{one, kDotGradG | kDotGradH}};
  at::Tensor dG_part = at::zeros({two_pass ? 1 : one.S, N, D}, acc_opts);
  at::Tensor dH_part = at::zeros({two_pass ? 1 : one.R, M, D}, acc_opts);
  gr.dG_part = ptr<acc_t>(dG_part);
  gr.dH_part = ptr<acc_t>(dH_part);
  int64_t Gb = 1;
  for (const auto& pass : passes) Gb = std::max<int64_t>(Gb, pass.first.blocks());
  at::Tensor scratch = at::empty({Gb * tile}, G.options());
  for (const auto& [sp, parts] : passes) {
    a.R = sp.R;
    a.S = sp.S;
    launch_kernel(dot_bwd_kernel<Md>, sp.blocks(), smem, a, gr, ptr<T>(scratch), parts);
  }

  at::Tensor dG = at::empty({N, D}, G.options());
  at::Tensor dH = at::empty({M, D}, H.options());
  reduce_partials<acc_t, T>(dG_part, 0, dG_part.size(0), N * D, N * D, dG);
  reduce_partials<acc_t, T>(dH_part, 0, dH_part.size(0), M * D, M * D, dH);
  return {dG, dH};
}

Stats dot_forward(ModeId mode, const at::Tensor& G, const at::Tensor& H, int64_t pos_offset,
                  int64_t exclude_offset) {
  return dispatch_mode(mode, [&](auto tag) {
    using Md = typename decltype(tag)::type;
    return dot_forward_impl<Md>(G, H, pos_offset, exclude_offset);
  });
}

std::tuple<at::Tensor, at::Tensor> dot_backward(ModeId mode, const at::Tensor& grad_lse,
                                                const at::Tensor& grad_pos,
                                                const at::Tensor& grad_rowsum,
                                                const at::Tensor& G, const at::Tensor& H,
                                                const at::Tensor& lse, int64_t pos_offset,
                                                int64_t exclude_offset) {
  return dispatch_mode(mode, [&](auto tag) {
    using Md = typename decltype(tag)::type;
    return dot_backward_impl<Md>(grad_lse, grad_pos, grad_rowsum, G, H, lse, pos_offset,
                                 exclude_offset);
  });
}

}  // namespace factorcl_ext::cuda
