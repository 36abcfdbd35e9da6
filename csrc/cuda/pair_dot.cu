// Separable critic s = G H^T (DESIGN.md section 3): a tiled GEMM whose epilogue folds each score
// tile into an online logsumexp (forward; no N x M buffer, one BM x BN tile per block at a time,
// the work split and fixed-order partial sums of host_common.cuh), and a recomputing backward
//
//   ds_ij = [j != i + excl] (g_lse_i e^(s_ij - lse_i) + g_rowsum_i) + g_pos_i [j = i + pos]
//   dG_i  = sum_j ds_ij H_j          dH_j = sum_i ds_ij G_i
//
// that forms ds for a bounded chunk of whole rows at a time and leaves its three matrix products
// (the recompute, ds H, ds^T G) to cuBLAS (dot_backward_impl).
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

// ---- backward: the score gradients of a chunk of whole rows, their products by cuBLAS -----------
//
// ds[r][j] for rows row0 + r of a chunk from its recomputed scores s (accumulation type), times
// `*scale` where given (16-bit inputs: the power of two of dot_backward_impl), rounded to T. One
// block per row at a time (the row's upstream gradients and lse read once), threads over columns.
template <class T, class A>
__global__ void __launch_bounds__(kThreads)
    dot_ds_kernel(const A* s, T* ds, int64_t rows, int64_t M, int64_t row0,
                  const A* __restrict__ g_lse, const A* __restrict__ g_pos,
                  const A* __restrict__ g_rowsum, const A* __restrict__ lse,
                  const A* __restrict__ scale, int64_t pos_offset, int64_t exclude_offset) {
  const A sc = scale != nullptr ? *scale : A(1);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t i = row0 + r;
    const A gl = g_lse[i], gr = g_rowsum[i], gp = g_pos[i], li = lse[i];
    const A* srow = s + r * M;
    T* drow = ds + r * M;
    for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
      A d = 0;
      if (exclude_offset < 0 || j != i + exclude_offset) d = gl * dexp(srow[j] - li) + gr;
      if (pos_offset >= 0 && j == i + pos_offset) d += gp;
      drow[j] = Cvt<T>::from(d * sc);  // (s and ds may be one buffer: read before write)
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

// The products of the backward, summed in the accumulation type: float32 results for 16-bit a
// and b (cuBLAS with out_dtype; float32 copies in the emulation and with a torch that lacks it),
// float32 / float64 ones in their own type (float32 follows torch's matmul precision: TF32
// tensor cores when it is "high", as the mode choice does).
inline bool is_16bit(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

// out = a b
inline void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (!is_16bit(a)) {
    at::mm_out(out, a, b);
    return;
  }
#if defined(FACTORCL_EXT_MM_OUT_DTYPE) && !defined(FCL_EMULATION)
  at::mm_out(out, a, b, at::kFloat);
#else
  at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
#endif
}

// acc + a b, or a b when acc is undefined (acc updated in place where it can be)
inline at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b, at::Tensor acc) {
  if (!is_16bit(a)) return acc.defined() ? acc.addmm_(a, b) : at::mm(a, b);
#if defined(FACTORCL_EXT_MM_OUT_DTYPE) && !defined(FCL_EMULATION)
  return acc.defined() ? at::addmm(acc, a, b, at::kFloat) : at::mm(a, b, at::kFloat);
#else
  const at::Tensor a32 = a.to(at::kFloat), b32 = b.to(at::kFloat);
  return acc.defined() ? acc.addmm_(a32, b32) : at::mm(a32, b32);
#endif
}

// dG = ds H and dH = ds^T G, with ds formed from the recomputed scores s = G H^T chunk by chunk
// of whole rows: s of the chunk by cuBLAS, ds by dot_ds_kernel, then the chunk's rows of dG (each
// complete: every column is in the chunk) and its share of dH (summed over chunks in the
// accumulation type) by cuBLAS. The chunk buffers are bounded by the workspace budget (one row at
// least), so memory stays O((N + M) D) plus a constant; no atomics, and the chunking depends on
// the shapes only, so results are bit-identical run to run. 16-bit inputs: ds is multiplied by
// the power of two that puts the largest finite bound |g_lse_i| + |g_pos_i| + |g_rowsum_i| on
// |ds_ij| into (2^13, 2^14] before it is rounded to the input type (InfoNCE's 1/N times softmax
// terms near 1/M would otherwise fall below float16's smallest normal number), and the float32
// products are multiplied back; computed on the device, no host sync.
template <class Md>
static std::tuple<at::Tensor, at::Tensor> dot_backward_impl(
    const at::Tensor& g_lse, const at::Tensor& g_pos, const at::Tensor& g_rowsum,
    const at::Tensor& G, const at::Tensor& H, const at::Tensor& lse, int64_t pos_offset,
    int64_t exclude_offset) {
  using T = typename Md::T;
  using acc_t = typename Md::acc_t;
  const int64_t N = G.size(0), M = H.size(0), D = G.size(1);
  const bool low = sizeof(T) < sizeof(acc_t);  // 16-bit inputs: separate ds buffer, scaled
  const auto acc_opts = G.options().dtype(acc_scalar_type<Md>());
  at::Tensor scale, inv_scale;
  if (low) {
    const at::Tensor bound = g_lse.abs() + g_pos.abs() + g_rowsum.abs();
    const at::Tensor top = at::where(at::isfinite(bound), bound, at::zeros_like(bound)).amax();
    scale = at::exp2(14.0 - at::ceil(at::log2(top.clamp_min(std::ldexp(1.0, -100)))));
    inv_scale = at::reciprocal(scale);
  }
  const int64_t per_row = M * int64_t(sizeof(acc_t) + (low ? sizeof(T) : 0));
  const int64_t rows =
      std::clamp<int64_t>(workspace_budget() / std::max<int64_t>(per_row, 1), 1, N);
  at::Tensor s_buf = at::empty({rows, M}, acc_opts);
  at::Tensor ds_buf = low ? at::empty({rows, M}, G.options()) : s_buf;
  at::Tensor dG = at::empty({N, D}, G.options());
  at::Tensor dH;  // accumulation type, summed over the chunks
  const at::Tensor Ht = H.t();
  for (int64_t row0 = 0; row0 < N; row0 += rows) {
    const int64_t c = std::min(rows, N - row0);
    const at::Tensor Gc = G.narrow(0, row0, c);
    at::Tensor s = s_buf.narrow(0, 0, c);
    at::Tensor ds = ds_buf.narrow(0, 0, c);
    mm_into(s, Gc, Ht);
    const int64_t blocks = std::min<int64_t>(c, 8 * int64_t(sm_count()));
    launch_kernel(dot_ds_kernel<T, acc_t>, blocks, 0, ptr<acc_t>(s), ptr<T>(ds), c, M, row0,
                  ptr<acc_t>(g_lse), ptr<acc_t>(g_pos), ptr<acc_t>(g_rowsum), ptr<acc_t>(lse),
                  low ? ptr<acc_t>(scale) : static_cast<acc_t*>(nullptr), pos_offset,
                  exclude_offset);
    at::Tensor rows_dG = dG.narrow(0, row0, c);
    if (low) {
      rows_dG.copy_(mm_acc(ds, H, at::Tensor()).mul_(inv_scale));
    } else {
      at::mm_out(rows_dG, ds, H);
    }
    dH = mm_acc(ds.t(), Gc, dH);
  }
  if (low) dH = dH.mul_(inv_scale).to(H.scalar_type());
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
                                                const at::Tensor& grad_rowsum, const at::Tensor& G,
                                                const at::Tensor& H, const at::Tensor& lse,
                                                int64_t pos_offset, int64_t exclude_offset) {
  return dispatch_mode(mode, [&](auto tag) {
    using Md = typename decltype(tag)::type;
    return dot_backward_impl<Md>(grad_lse, grad_pos, grad_rowsum, G, H, lse, pos_offset,
                                 exclude_offset);
  });
}

}  // namespace factorcl_ext::cuda
