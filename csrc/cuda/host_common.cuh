// Host-side helpers of the launchers: mode dispatch, work-split planning, and the two small
// fixed-order reduction kernels (per-split statistics, per-block gradient partials).
#pragma once

#include <ATen/ATen.h>
#ifndef FCL_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#endif

#include <algorithm>
#include <cmath>
#include <functional>

#include "common.cuh"
#include "launch.h"

namespace factorcl_ext::cuda {

template <class Md>
struct ModeTag {
  using type = Md;
};

// Calls f(ModeTag<Md>{}) for the kernel family of `mode`.
template <class F>
auto dispatch_mode(ModeId mode, F&& f) {
  switch (mode) {
    case ModeId::BF16:
      return f(ModeTag<ModeBF16>{});
    case ModeId::F16:
      return f(ModeTag<ModeF16>{});
    case ModeId::TF32:
      return f(ModeTag<ModeTF32>{});
    case ModeId::F32:
      return f(ModeTag<ModeF32>{});
    case ModeId::F64:
      break;
  }
  return f(ModeTag<ModeF64>{});
}

template <class T>
inline T* ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

template <class Md>
inline at::ScalarType acc_scalar_type() {
  return std::is_same_v<typename Md::acc_t, double> ? at::kDouble : at::kFloat;
}

#ifdef FCL_EMULATION
inline int sm_count() { return emu::sm_count(); }
#else
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
#endif

// Memory the per-block scratch and partial buffers of one launch may take: bounded, so that no
// buffer grows with N * M; the grid shrinks (and the kernel slows) before memory grows.
constexpr int64_t kWorkspaceBudget = int64_t(1) << 30;
#ifdef FCL_EMULATION
inline int64_t workspace_budget() { return emu::workspace_budget(kWorkspaceBudget); }
#else
inline int64_t workspace_budget() { return kWorkspaceBudget; }
#endif

struct Split {
  int R = 1, S = 1;
  int blocks() const { return R * S; }
};

// Forward kernels: row quantities only, partials are [S, N] scalars; prefer splitting rows.
inline Split plan_rows_first(int64_t nrc, int64_t ncc, int64_t per_block_bytes) {
  int64_t target = 2 * int64_t(sm_count());
  if (per_block_bytes > 0)
    target = std::max<int64_t>(1, std::min(target, workspace_budget() / per_block_bytes));
  Split sp;
  sp.R = int(std::max<int64_t>(1, std::min(nrc, target)));
  sp.S = int(std::max<int64_t>(1, std::min(ncc, ceil_div(target, sp.R))));
  return sp;
}

// Backward kernels: row partials [S, N, D] and column partials [R, M, D] both exist, so split the
// pair grid into R x S with R / S = N / M, which for a given R * S makes S * N + R * M, the
// partials' size, smallest (N and M in rows, not chunks: the concat critic's chunks are 16 rows
// by 32 columns); shrink until `bytes(R, S)` fits the budget. The first
// step down is to one block per SM: the tensor-core kernels use 255 registers, so one 8-warp
// block fits an SM, and a grid between one and two SMs' worth runs a second wave part-empty
// (the concat backward at N = 4096, H = 512, bf16 got 180 blocks on an H100's 132 SMs: by
// arithmetic, not measured, two rounds of the same length for 1.4 rounds of work).
inline Split plan_square(int64_t nrc, int64_t ncc, int64_t N, int64_t M,
                         const std::function<int64_t(int64_t, int64_t)>& bytes) {
  const int64_t sms = sm_count();
  int64_t G = std::min<int64_t>(2 * sms, nrc * ncc);
  Split sp;
  while (true) {
    int64_t R = std::llround(std::sqrt(double(G) * double(N) / double(M)));
    R = std::clamp<int64_t>(R, 1, nrc);
    int64_t S = std::clamp<int64_t>(G / R, 1, ncc);
    R = std::clamp<int64_t>(G / S, 1, nrc);  // S capped by the column chunks: rows take the rest
    sp.R = int(R);
    sp.S = int(S);
    if (G <= 1 || bytes(R, S) <= workspace_budget()) return sp;
    G = G > sms ? sms : std::max<int64_t>(1, G * 3 / 4);
  }
}

// Launches kernel<<<grid, kThreads, smem>>> on the current stream and checks the launch.
template <class... KArgs, class... Args>
inline void launch_kernel(void (*kernel)(KArgs...), int64_t grid, size_t smem, Args&&... args) {
  TORCH_CHECK(grid >= 1 && grid < (int64_t(1) << 31), "factorcl CUDA: bad grid size ", grid);
#ifdef FCL_EMULATION
  emu::launch(kernel, unsigned(grid), kThreads, smem, KArgs(std::forward<Args>(args))...);
#else
  if (smem > 48 * 1024)  // dynamic shared memory beyond 48 KB must be asked for
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  kernel<<<unsigned(grid), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      KArgs(std::forward<Args>(args))...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// lse / rowsum from S per-split partials (max, scaled sum, row sum), split 0 first.
template <class A>
__global__ void __launch_bounds__(kThreads)
    merge_stats_kernel(const A* __restrict__ part, int S, int64_t N, A* __restrict__ lse,
                       A* __restrict__ rowsum) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const A* pm = part;
  const A* pl = part + int64_t(S) * N;
  const A* pr = part + 2 * int64_t(S) * N;
  A m = pm[i], l = pl[i], r = pr[i];
  for (int s = 1; s < S; ++s) {
    lse_merge(m, l, pm[s * N + i], pl[s * N + i]);
    r += pr[s * N + i];
  }
  lse[i] = m + dlog(l);
  rowsum[i] = r;
}

template <class A>
inline void merge_stats(const at::Tensor& part, int S, int64_t N, const at::Tensor& lse,
                        const at::Tensor& rowsum) {
  launch_kernel(merge_stats_kernel<A>, ceil_div(N, kThreads), 0, ptr<A>(part), S, N, ptr<A>(lse),
                ptr<A>(rowsum));
}

// out[k] = sum_p part[p * stride + k] for p = 0, 1, ..., P - 1, cast to the output type; with
// `accumulate`, out[k] + that sum instead (the sum first, then the addition: a fixed order).
template <class A, class O>
__global__ void __launch_bounds__(kThreads)
    reduce_partials_kernel(const A* __restrict__ part, int64_t P, int64_t stride, int64_t K,
                           O* __restrict__ out, bool accumulate) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < K;
       k += int64_t(gridDim.x) * blockDim.x) {
    A s = 0;
    for (int64_t p = 0; p < P; ++p) s += part[p * stride + k];
    out[k] = Cvt<O>::from(accumulate ? A(to_acc(out[k])) + s : s);
  }
}

// Sums the P partials of K elements that start at part.data + offset, rows `stride` apart, into
// out (added to it with `accumulate`).
template <class A, class O>
inline void reduce_partials(const at::Tensor& part, int64_t offset, int64_t P, int64_t stride,
                            int64_t K, const at::Tensor& out, bool accumulate = false) {
  if (K == 0) return;
  TORCH_CHECK(out.is_contiguous() && out.numel() == K, "reduce_partials: bad output");
  const int64_t blocks = std::min<int64_t>(ceil_div(K, kThreads), 8 * int64_t(sm_count()));
  launch_kernel(reduce_partials_kernel<A, O>, blocks, 0, ptr<A>(part) + offset, P, stride, K,
                ptr<O>(out), accumulate);
}

}  // namespace factorcl_ext::cuda
