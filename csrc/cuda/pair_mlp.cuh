// The concat critic's per-chunk forward, shared by the forward kernel and the recomputing
// backward kernel so that both see bit-identical scores (DESIGN.md section 2).
#pragma once

#include "common.cuh"

namespace factorcl_ext::cuda {

template <class T>
struct MlpArgs {
  const T* __restrict__ A;      // [N, H]
  const T* __restrict__ B;      // [M, H], first-layer bias included
  const T* __restrict__ W;      // [L, H, H] stacked hidden weights (W[l][o][k])
  const T* __restrict__ bias;   // [L, H]
  const T* __restrict__ w_out;  // [H]
  const T* __restrict__ b_out;  // [1]
  int64_t N, M;
  int H, L;
  int act, out_act;
  bool has_pos;        // positives at j = i + pos_offset (row and column indices of A and B;
  int64_t pos_offset;  // a band of the pair grid shifts the offset, which may then be negative)
  int R, S;            // work split (common.cuh)
  int64_t nrc, ncc;    // number of row / column chunks
};

// h_0 of one pair and feature, act(A_i[k] + B_j[k]) in the accumulation type: the one definition
// that the forward, the recomputing backward and both operand forms below share (they must agree
// bit for bit).
template <class T>
__device__ __forceinline__ auto pair_act(T a, T b, int act) {
  return act_fwd(to_acc(a) + to_acc(b), act);
}

// The input of a hidden layer as a GEMM operand X(p, k), k contiguous: h_(l-1)(p, k) read from
// hin ([np, H] row-major), or with hin == nullptr h_0(p, k) = act(A_i + B_j) formed on the fly
// for pair p = ii * nj + jj of the chunk whose rows start at Ab and columns at Bb. The scalar
// and vector forms compute identical values (the backward's recomputation relies on it).
template <class Md>
__device__ auto layer_input(int act, const typename Md::T* Ab, const typename Md::T* Bb, int H,
                            int nj, const typename Md::T* hin) {
  using T = typename Md::T;
  using acc_t = typename Md::acc_t;
  constexpr int V = kVec<T>;
  const bool ok = hin != nullptr ? vec_aligned(hin, H) : vec_aligned(Ab, H) && vec_aligned(Bb, H);
  auto scalar = [=](int p, int k) -> acc_t {
    if (hin != nullptr) return to_acc(hin[int64_t(p) * H + k]);
    return pair_act(Ab[int64_t(p / nj) * H + k], Bb[int64_t(p % nj) * H + k], act);
  };
  auto vec = [=](int p, int k, T* out) {
    if (hin != nullptr) {
      fcl_load16(out, hin + int64_t(p) * H + k);
      return;
    }
    alignas(16) T av[V];
    alignas(16) T bv[V];
    fcl_load16(av, Ab + int64_t(p / nj) * H + k);
    fcl_load16(bv, Bb + int64_t(p % nj) * H + k);
#pragma unroll
    for (int t = 0; t < V; ++t) out[t] = Cvt<T>::from(pair_act(av[t], bv[t], act));
  };
  return computed(ok, scalar, vec);
}

// Scores of one chunk: rows [i0, i0 + ni) x columns [j0, j0 + nj), pair p = ii * nj + jj.
// Leaves the pre-activation output t_p = w_out . h_L(p) (without b_out) in t_acc[p].
// hstore(l) is where h_l (l = 1..L) goes, [np, H] row-major in type T, or nullptr for "not
// needed"; layer l >= 2 reads h_(l-1) back from hstore(l - 1), which must then be non-null.
// h_0 = act(A_i + B_j) is never stored: it is formed in registers as the first GEMM's operand.
template <class Md, class HStore>
__device__ void mlp_chunk_scores(char* smem, const MlpArgs<typename Md::T>& a, int64_t i0,
                                 int64_t j0, int ni, int nj, typename Md::acc_t* t_acc,
                                 HStore&& hstore) {
  using T = typename Md::T;
  using acc_t = typename Md::acc_t;
  const int np = ni * nj, H = a.H, L = a.L;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const T* __restrict__ Ab = a.A + i0 * H;
  const T* __restrict__ Bb = a.B + j0 * H;

  if (L == 0) {  // element-wise critic: one warp per pair, fixed-order sum
    for (int p = warp; p < np; p += kWarps) {
      const T* ai = Ab + int64_t(p / nj) * H;
      const T* bj = Bb + int64_t(p % nj) * H;
      acc_t sum = 0;
      for (int k = lane; k < H; k += 32) sum += to_acc(a.w_out[k]) * pair_act(ai[k], bj[k], a.act);
      sum = warp_sum(sum);
      if (lane == 0) t_acc[p] = sum;
    }
    __syncthreads();
    return;
  }

  for (int l = 1; l <= L; ++l) {
    const T* __restrict__ Wl = a.W + int64_t(l - 1) * H * H;
    const T* __restrict__ bl = a.bias + int64_t(l - 1) * H;
    const T* hin = l >= 2 ? hstore(l - 1) : nullptr;
    T* hout = hstore(l);
    const bool last = l == L;
    if (last)
      for (int p = tid; p < np; p += kThreads) t_acc[p] = acc_t(0);
    // (the GEMM's first barrier orders these stores before the epilogue's updates)
    const auto opA = layer_input<Md>(a.act, Ab, Bb, H, nj, hin);  // opA(p, k)
    const Strided<T> opB(Wl, 1, H);                               // opB(k, n) = W_l[n][k]
    auto epi = [&](int m0, int n0, int mlen, int nlen, const acc_t* Cs) {
      // One warp per pair row: lanes walk the columns (coalesced h stores), then a fixed
      // butterfly adds the row's share of w_out . h_L. Tiles arrive in increasing n0 for a
      // given m0, so t_acc[p] accumulates in a fixed order. A lane's columns are the same in
      // every row: their biases and output weights are loaded once per tile.
      constexpr int CPL = (Md::BN + 31) / 32;  // columns per lane
      acc_t bias_c[CPL], wo_c[CPL];
#pragma unroll
      for (int t = 0; t < CPL; ++t) {
        const int nc = lane + 32 * t;
        bias_c[t] = nc < nlen ? to_acc(bl[n0 + nc]) : acc_t(0);
        wo_c[t] = last && nc < nlen ? to_acc(a.w_out[n0 + nc]) : acc_t(0);
      }
      for (int mr = warp; mr < mlen; mr += kWarps) {
        const int p = m0 + mr;
        acc_t part = 0;
#pragma unroll
        for (int t = 0; t < CPL; ++t) {
          const int nc = lane + 32 * t;
          if (nc >= nlen) continue;
          const int n = n0 + nc;
          const acc_t h = act_fwd(Cs[mr * Md::LDC + nc] + bias_c[t], a.act);
          if (hout != nullptr) hout[int64_t(p) * H + n] = Cvt<T>::from(h);
          if (last) part += h * wo_c[t];
        }
        if (last) {
          part = warp_sum(part);
          if (lane == 0) t_acc[p] += part;
        }
      }
    };
    BlockGemm<Md>::run(smem, np, H, H, /*a_k_fastest=*/true, opA, /*b_n_fastest=*/false, opB, epi);
  }
}

}  // namespace factorcl_ext::cuda
