// Concat critic forward: lse, pos, rowsum of s_ij = out_act(w_out . MLP(act(A_i + B_j)) + b_out)
// without materialising the pairs (DESIGN.md section 2).
//
// Block g owns row chunks r, r + R, ... and column chunks s, s + S, ... (common.cuh). For each of
// its row chunks it walks its column chunks, keeps an online logsumexp and row sum per row in
// registers (thread ii owns row ii of the chunk), and writes one (max, scaled sum, row sum)
// partial per row for its split s; merge_stats_kernel combines the S partials in order.
#include "host_common.cuh"
#include "pair_mlp.cuh"

namespace factorcl_ext::cuda {

template <class Md>
__global__ void __launch_bounds__(kThreads)
    mlp_fwd_kernel(MlpArgs<typename Md::T> a, typename Md::acc_t* __restrict__ part,
                   typename Md::acc_t* __restrict__ pos_out, typename Md::T* scratch,
                   int64_t scratch_stride) {
  using T = typename Md::T;
  using acc_t = typename Md::acc_t;
  FCL_DYNAMIC_SMEM(smem);
  acc_t* t_acc = reinterpret_cast<acc_t*>(smem + BlockGemm<Md>::kSmemBytes);
  const int g = blockIdx.x, r = g / a.S, s = g % a.S, tid = threadIdx.x;
  // Hidden layers 1..L-1 ping-pong between two scratch buffers; h_L only feeds the w_out dot.
  T* hbuf = scratch != nullptr ? scratch + int64_t(g) * scratch_stride : nullptr;
  const int64_t hstride = int64_t(Md::CHUNK) * a.H;
  auto hstore = [&](int l) -> T* { return l >= a.L ? nullptr : hbuf + ((l - 1) % 2) * hstride; };
  const acc_t bout = to_acc(a.b_out[0]);
  acc_t* part_m = part;
  acc_t* part_l = part + int64_t(a.S) * a.N;
  acc_t* part_r = part + 2 * int64_t(a.S) * a.N;

  for (int64_t rc = r; rc < a.nrc; rc += a.R) {
    const int64_t i0 = rc * Md::TI;
    const int ni = int(min(int64_t(Md::TI), a.N - i0));
    acc_t run_m = -INFINITY, run_l = 0, run_r = 0;  // row i0 + tid, for tid < ni
    for (int64_t cc = s; cc < a.ncc; cc += a.S) {
      const int64_t j0 = cc * Md::TJ;
      const int nj = int(min(int64_t(Md::TJ), a.M - j0));
      mlp_chunk_scores<Md>(smem, a, i0, j0, ni, nj, t_acc, hstore);  // ends with a barrier
      if (tid < ni) {
        const int64_t i = i0 + tid;
        for (int jj = 0; jj < nj; ++jj) {
          const acc_t sc = out_act_fwd(t_acc[tid * nj + jj] + bout, a.out_act);
          lse_push(run_m, run_l, sc);
          run_r += sc;
          if (a.has_pos && j0 + jj == i + a.pos_offset) pos_out[i] = sc;
        }
      }
      __syncthreads();  // t_acc is rewritten by the next chunk
    }
    if (tid < ni) {
      const int64_t k = int64_t(s) * a.N + i0 + tid;
      part_m[k] = run_m;
      part_l[k] = run_l;
      part_r[k] = run_r;
    }
  }
}

template <class Md>
static Stats mlp_forward_impl(const at::Tensor& A, const at::Tensor& B, const at::Tensor& W,
                              const at::Tensor& bias, const at::Tensor& w_out,
                              const at::Tensor& b_out, int64_t L, int act, int out_act,
                              int64_t pos_offset) {
  using T = typename Md::T;
  using acc_t = typename Md::acc_t;
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
  a.nrc = ceil_div(N, Md::TI);
  a.ncc = ceil_div(M, Md::TJ);
  const int64_t scratch_stride = L >= 2 ? 2 * int64_t(Md::CHUNK) * H : 0;
  const Split sp = plan_rows_first(a.nrc, a.ncc, scratch_stride * int64_t(sizeof(T)));
  a.R = sp.R;
  a.S = sp.S;
  const int G = sp.blocks();

  at::Tensor part = at::empty({3, a.S, N}, acc_opts);
  at::Tensor lse = at::empty({N}, acc_opts);
  at::Tensor rowsum = at::empty({N}, acc_opts);
  at::Tensor pos = pos_offset >= 0 ? at::empty({N}, acc_opts) : at::zeros({N}, acc_opts);
  at::Tensor scratch;
  if (scratch_stride > 0) scratch = at::empty({G * scratch_stride}, A.options());

  const size_t smem = BlockGemm<Md>::kSmemBytes + Md::CHUNK * sizeof(acc_t);
  launch_kernel(mlp_fwd_kernel<Md>, G, smem, a, ptr<acc_t>(part), ptr<acc_t>(pos), ptr<T>(scratch),
                scratch_stride);
  merge_stats<acc_t>(part, a.S, N, lse, rowsum);
  return {lse, pos, rowsum};
}

Stats mlp_forward(ModeId mode, const at::Tensor& A, const at::Tensor& B, const at::Tensor& W,
                  const at::Tensor& bias, const at::Tensor& w_out, const at::Tensor& b_out,
                  int64_t L, int act, int out_act, int64_t pos_offset) {
  return dispatch_mode(mode, [&](auto tag) {
    using Md = typename decltype(tag)::type;
    return mlp_forward_impl<Md>(A, B, W, bias, w_out, b_out, L, act, out_act, pos_offset);
  });
}

}  // namespace factorcl_ext::cuda
