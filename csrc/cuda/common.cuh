// Device building blocks shared by the CUDA kernels of both critics (DESIGN.md sections 2, 3, 6).
//
// The one piece of real machinery is BlockGemm: a whole thread block computes
// C[Mdim x Ndim] = sum_k opA(m, k) * opB(k, n) tile by tile, where the operands are produced by
// caller functors element by element (so act(A_i + B_j) is formed straight into the tensor-core
// operand tile and never stored) and each finished output tile is handed to a caller epilogue in
// shared memory. Five "modes" instantiate it:
//
//   bf16 / fp16 : WMMA m16n16k16 tensor cores, fp32 accumulators
//   fp32 (TF32) : WMMA m16n16k8 TF32 tensor cores, when float32 matmul precision allows it
//   fp32 (IEEE) : SIMT FMA, fp32
//   fp64        : SIMT FMA, fp64
//
// Determinism: nothing here uses atomics; every sum has a fixed order given the problem shape
// and the number of SMs (which fixes the grid), so reruns are bit-identical.
#pragma once

#ifdef FCL_EMULATION
// tests/cuda_emu: the same kernels run on the CPU, one std::thread per CUDA thread.
#include "fcl_cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#define FCL_DYNAMIC_SMEM(name) extern __shared__ __align__(128) char name[]

// 16-byte moves: an operand group from memory into registers (fcl_load16), registers into the
// shared tile (fcl_store16). Both addresses 16-byte aligned, which the emulation asserts.
__device__ __forceinline__ void fcl_load16(void* regs, const void* src) {
  *reinterpret_cast<uint4*>(regs) = *reinterpret_cast<const uint4*>(src);
}
__device__ __forceinline__ void fcl_store16(void* dst, const void* regs) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(regs);
}
#endif

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace factorcl_ext::cuda {

constexpr int kThreads = 256;  // every kernel of this package runs 8 warps per block
constexpr int kWarps = kThreads / 32;

enum class Kind { Wmma16, WmmaTf32, Simt };
enum Act : int { kRelu = 0, kTanh = 1 };
enum OutAct : int { kOutNone = 0, kOutSoftplus = 1 };

// ---- scalar helpers -----------------------------------------------------------------------------

__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <class T>
struct Cvt;
template <>
struct Cvt<__nv_bfloat16> {
  __device__ static __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16(x); }
};
template <>
struct Cvt<__half> {
  __device__ static __forceinline__ __half from(float x) { return __float2half(x); }
};
template <>
struct Cvt<float> {
  __device__ static __forceinline__ float from(float x) { return x; }
  __device__ static __forceinline__ float from(double x) { return static_cast<float>(x); }
};
template <>
struct Cvt<double> {
  __device__ static __forceinline__ double from(double x) { return x; }
};

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
__device__ __forceinline__ float dlog1p(float x) { return log1pf(x); }
__device__ __forceinline__ double dlog1p(double x) { return log1p(x); }
__device__ __forceinline__ float dtanh(float x) { return tanhf(x); }
__device__ __forceinline__ double dtanh(double x) { return tanh(x); }

template <class A>
__device__ __forceinline__ A act_fwd(A z, int act) {
  // `z < 0 ? 0 : z` (not `z > 0 ? z : 0`) so that NaN propagates as torch.relu does.
  if (act == kRelu) return z < A(0) ? A(0) : z;
  return dtanh(z);
}

// Gradient g through the hidden activation, expressed through its output h = act(z), as torch's
// relu / tanh backward compute it: relu selects, `h <= 0 ? 0 : g` (threshold_backward), so a NaN
// or Inf upstream gradient stays out of units that are off (a product g * [h > 0] made it NaN
// there) and a NaN unit passes g on; tanh multiplies by 1 - h^2.
template <class A>
__device__ __forceinline__ A act_bwd_from_out(A g, A h, int act) {
  if (act == kRelu) return h <= A(0) ? A(0) : g;
  return g * (A(1) - h * h);
}

// nn.Softplus() (beta 1, threshold 20) and its derivative, as torch computes them.
template <class A>
__device__ __forceinline__ A out_act_fwd(A t, int out_act) {
  if (out_act == kOutNone) return t;
  return t > A(20) ? t : dlog1p(dexp(t));
}
template <class A>
__device__ __forceinline__ A out_act_grad(A t, int out_act) {
  if (out_act == kOutNone) return A(1);
  if (t > A(20)) return A(1);
  A e = dexp(t);
  return e / (e + A(1));
}

// ---- online logsumexp ---------------------------------------------------------------------------
// State (m, l) stands for sum = l * exp(m). exp_diff(a, m) = exp(a - m) for a <= m, with a == m
// giving exactly 1 so that m = +-inf never forms inf - inf. m = -inf with any l means an empty
// (or all -inf) sum and yields lse = -inf, like torch.logsumexp; NaN inputs turn l into NaN.

template <class A>
__device__ __forceinline__ A exp_diff(A a, A m) {
  return a == m ? A(1) : dexp(a - m);
}

template <class A>
__device__ __forceinline__ void lse_push(A& m, A& l, A x) {
  if (x > m) {
    l = l * exp_diff(m, x) + A(1);
    m = x;
  } else {
    l += exp_diff(x, m);
  }
}

template <class A>
__device__ __forceinline__ void lse_merge(A& m, A& l, A m2, A l2) {
  if (m >= m2) {
    l += l2 * exp_diff(m2, m);
  } else if (m2 > m) {
    l = l * exp_diff(m, m2) + l2;
    m = m2;
  } else {  // m2 is NaN (cannot happen: lse_push never stores NaN in m), keep it visible
    l = l2;
  }
}

// Deterministic warp sum: a fixed butterfly, every lane ends with the same value.
template <class A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <class A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    A o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// A power of two s with |maxabs * s| in [0.5, 1): gradients stored in 16-bit operands are scaled
// per chunk so that softmax-sized values (1e-6 and below) do not flush to zero in fp16; the
// scale is removed again in fp32. Exact in every dtype (a power of two), 1 for 0 / inf / NaN.
template <class A>
__device__ __forceinline__ A pow2_scale_for(A maxabs) {
  if (!(maxabs > A(0)) || !(maxabs < A(INFINITY))) return A(1);
  int e = 0;
  (void)frexp(maxabs, &e);
  e = e < -100 ? -100 : (e > 100 ? 100 : e);
  return ldexp(A(1), -e);
}

// ---- modes --------------------------------------------------------------------------------------

template <class T_, Kind K_>
struct Mode {
  using T = T_;  // element type of the inputs, the per-block scratch and the gradients
  static constexpr Kind kind = K_;
  using acc_t = std::conditional_t<std::is_same_v<T_, double>, double, float>;
  using op_t = std::conditional_t<K_ == Kind::Simt, acc_t, T_>;  // shared-memory operand type
  static constexpr bool tc = K_ != Kind::Simt;
  // Output tile of the block GEMM. Tensor cores: 128 x 128 over 8 warps (4 x 2, 32 x 64 each).
  // SIMT: 64 x 64, 4 x 4 per thread.
  static constexpr int BM = tc ? 128 : 64;
  static constexpr int BN = tc ? 128 : 64;
  static constexpr int BK = tc ? 32 : 16;
  // Padding keeps WMMA's ldm a multiple of 16 bytes and fragment pointers 32-byte aligned while
  // breaking the power-of-two row stride that would put every row on the same banks.
  static constexpr int LDA = tc ? BK + (sizeof(op_t) == 2 ? 8 : 4) : BK + 1;
  static constexpr int LDB = tc ? BN + (sizeof(op_t) == 2 ? 8 : 4) : BN;
  static constexpr int LDC = tc ? BN + 4 : BN + 1;
  // Chunk of pairs a concat-critic block works on at once: TI rows x TJ columns.
  static constexpr int TI = 16;
  static constexpr int TJ = tc ? 32 : 16;
  static constexpr int CHUNK = TI * TJ;
};

using ModeBF16 = Mode<__nv_bfloat16, Kind::Wmma16>;
using ModeF16 = Mode<__half, Kind::Wmma16>;
using ModeTF32 = Mode<float, Kind::WmmaTf32>;
using ModeF32 = Mode<float, Kind::Simt>;
using ModeF64 = Mode<double, Kind::Simt>;

// ---- accumulators of one output tile ------------------------------------------------------------

template <class Md, Kind K = Md::kind>
struct TileAcc;

template <class Md>
struct TileAcc<Md, Kind::Wmma16> {
  using op_t = typename Md::op_t;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[2][4];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) nvcuda::wmma::fill_fragment(c[i][j], 0.0f);
  }
  __device__ void mma(const op_t* As, const op_t* Bs) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int kk = 0; kk < Md::BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, op_t, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, op_t, wmma::row_major> b[4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * Md::LDA + kk, Md::LDA);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        wmma::load_matrix_sync(b[j], Bs + kk * Md::LDB + wn * 64 + j * 16, Md::LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) wmma::mma_sync(c[i][j], a[i], b[j], c[i][j]);
    }
  }
  __device__ void store(float* Cs) {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        nvcuda::wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * Md::LDC + wn * 64 + j * 16,
                                        c[i][j], Md::LDC, nvcuda::wmma::mem_row_major);
  }
};

template <class Md>
struct TileAcc<Md, Kind::WmmaTf32> {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float> c[2][4];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) nvcuda::wmma::fill_fragment(c[i][j], 0.0f);
  }
  __device__ void mma(const float* As, const float* Bs) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int kk = 0; kk < Md::BK; kk += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> b[4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * Md::LDA + kk, Md::LDA);
#pragma unroll
        for (int e = 0; e < a[i].num_elements; ++e) a[i].x[e] = wmma::__float_to_tf32(a[i].x[e]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::load_matrix_sync(b[j], Bs + kk * Md::LDB + wn * 64 + j * 16, Md::LDB);
#pragma unroll
        for (int e = 0; e < b[j].num_elements; ++e) b[j].x[e] = wmma::__float_to_tf32(b[j].x[e]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) wmma::mma_sync(c[i][j], a[i], b[j], c[i][j]);
    }
  }
  __device__ void store(float* Cs) {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        nvcuda::wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * Md::LDC + wn * 64 + j * 16,
                                        c[i][j], Md::LDC, nvcuda::wmma::mem_row_major);
  }
};

template <class Md>
struct TileAcc<Md, Kind::Simt> {
  using acc_t = typename Md::acc_t;
  static_assert(Md::BM == 64 && Md::BN == 64 && kThreads == 256, "SIMT tile is 16 x 16 threads");
  acc_t c[4][4];

  __device__ void zero() {
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int q = 0; q < 4; ++q) c[r][q] = acc_t(0);
  }
  __device__ void mma(const acc_t* As, const acc_t* Bs) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int k = 0; k < Md::BK; ++k) {
      acc_t a[4], b[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = As[(ty + 16 * r) * Md::LDA + k];
#pragma unroll
      for (int q = 0; q < 4; ++q) b[q] = Bs[k * Md::LDB + tx + 16 * q];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) c[r][q] = fma(a[r], b[q], c[r][q]);
    }
  }
  __device__ void store(acc_t* Cs) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int q = 0; q < 4; ++q) Cs[(ty + 16 * r) * Md::LDC + tx + 16 * q] = c[r][q];
  }
};

// ---- GEMM operands ------------------------------------------------------------------------------
// BlockGemm reads an operand X (opA(m, k) or opB(k, n): "x" the first index, "y" the second)
// through scalar(x, y) -> acc_t, any element in range; and through vec(x, y, out), which writes
// the kVec = 16 / sizeof(T) elements that start at (x, y) and run along the index the GEMM is
// told is the contiguous one (y if `y_fastest`, else x), with one 16-byte load, where
// vec_ok(y_fastest) says it may. BlockGemm calls vec only for whole groups in range whose start
// is a multiple of kVec along that index; vec_ok therefore means: that index has stride 1, the
// other's stride is a multiple of kVec elements, the base is 16-byte aligned.

template <class T>
constexpr int kVec = 16 / int(sizeof(T));

template <class T>
__host__ __device__ inline bool vec_aligned(const T* base, int64_t stride) {
  return base != nullptr && reinterpret_cast<uintptr_t>(base) % 16 == 0 && stride % kVec<T> == 0;
}

// n <= kVec<T> consecutive elements between memory and registers: one 16-byte move where `vec`
// (the caller's vec_aligned) holds and the group is whole, element by element otherwise.
template <class T>
__device__ __forceinline__ void load_group(T* regs, const T* src, int n, bool vec) {
  if (vec && n == kVec<T>) {
    fcl_load16(regs, src);
    return;
  }
#pragma unroll
  for (int t = 0; t < kVec<T>; ++t)
    if (t < n) regs[t] = src[t];
}
template <class T>
__device__ __forceinline__ void store_group(T* dst, const T* regs, int n, bool vec) {
  if (vec && n == kVec<T>) {
    fcl_store16(dst, regs);
    return;
  }
#pragma unroll
  for (int t = 0; t < kVec<T>; ++t)
    if (t < n) dst[t] = regs[t];
}

// X(x, y) = base[x * sx + y * sy].
template <class T>
struct Strided {
  const T* base;
  int64_t sx, sy;
  __device__ Strided(const T* b, int64_t sx_, int64_t sy_) : base(b), sx(sx_), sy(sy_) {}
  __device__ bool vec_ok(bool y_fastest) const {
    return y_fastest ? sy == 1 && vec_aligned(base, sx) : sx == 1 && vec_aligned(base, sy);
  }
  __device__ __forceinline__ auto scalar(int x, int y) const {
    return to_acc(base[x * sx + y * sy]);
  }
  __device__ __forceinline__ void vec(int x, int y, T* out) const {
    fcl_load16(out, base + x * sx + y * sy);
  }
};

// An operand computed element by element (act(A_i + B_j), say): scalar and vector forms from the
// caller, which must give identical values; `ok` is vec_ok for the direction the call site
// declares to BlockGemm.
template <class Scalar, class Vec>
struct Computed {
  Scalar scalar;
  Vec vec;
  bool ok;
  __device__ bool vec_ok(bool) const { return ok; }
};
template <class Scalar, class Vec>
__device__ Computed<Scalar, Vec> computed(bool vec_ok, Scalar s, Vec v) {
  return {s, v, vec_ok};
}

// ---- the block GEMM -----------------------------------------------------------------------------

template <class Md>
struct BlockGemm {
  using op_t = typename Md::op_t;
  using acc_t = typename Md::acc_t;
  static constexpr int BM = Md::BM, BN = Md::BN, BK = Md::BK;
  static constexpr int A_PER_THREAD = BM * BK / kThreads;
  static constexpr int B_PER_THREAD = BK * BN / kThreads;
  static_assert(BM * BK % kThreads == 0 && BK * BN % kThreads == 0, "tile / thread mismatch");
  // One K-slab's operand tiles; two of them alternate (the next slab is stored while the current
  // one is multiplied: one barrier per slab).
  static constexpr size_t kSlabElems = size_t(BM) * Md::LDA + size_t(BK) * Md::LDB;
  static constexpr size_t kOperandBytes = 2 * kSlabElems * sizeof(op_t);
  static constexpr size_t kStageBytes = size_t(BM) * Md::LDC * sizeof(acc_t);
  // The epilogue staging tile reuses the operand tiles' memory (they are dead by then).
  static constexpr size_t kSmemBytes =
      ((kOperandBytes > kStageBytes ? kOperandBytes : kStageBytes) + 127) / 128 * 128;
  static_assert((kSlabElems * sizeof(op_t)) % 32 == 0, "WMMA needs 32-byte aligned tiles");

  // Operand moves go in groups of V consecutive elements along the source's contiguous index
  // (one 16-byte load where the operand allows it, V scalar reads where it does not or where the
  // group crosses the edge of the operand), so a thread owns PER_THREAD / V groups of a tile.
  static constexpr int V = kVec<op_t>;
  static_assert(std::is_same_v<op_t, typename Md::T>, "operands are moved in the input type");
  static_assert(A_PER_THREAD % V == 0 && B_PER_THREAD % V == 0 && BK % V == 0 && BM % V == 0 &&
                    BN % V == 0,
                "operand groups must tile the block tiles");
  static constexpr bool kVecStoreA = (Md::LDA * sizeof(op_t)) % 16 == 0;
  static constexpr bool kVecStoreB = (Md::LDB * sizeof(op_t)) % 16 == 0;

  // Group g of a rows x cols tile: (r, c) of its first element. `col_fastest` says which index is
  // contiguous in the source, so that consecutive threads read consecutive addresses.
  __device__ static __forceinline__ void group_coords(int g, int rows, int cols, bool col_fastest,
                                                      int& r, int& c) {
    const int idx = g * V;
    if (col_fastest) {
      r = idx / cols;
      c = idx % cols;
    } else {
      c = idx / rows;
      r = idx % rows;
    }
  }

  // This thread's groups of the tile at (row0, col0) of the Rdim x Cdim operand X into regs.
  template <int GROUPS, class X>
  __device__ static __forceinline__ void fetch(const X& x, int rows, int cols, bool col_fastest,
                                               int row0, int col0, int Rdim, int Cdim, op_t* regs) {
    const bool vec = x.vec_ok(col_fastest);
#pragma unroll
    for (int e = 0; e < GROUPS; ++e) {
      int r, c;
      group_coords(threadIdx.x + e * kThreads, rows, cols, col_fastest, r, c);
      const int gr = row0 + r, gc = col0 + c;
      op_t* out = regs + e * V;
      const bool whole =
          col_fastest ? (gr < Rdim && gc + V <= Cdim) : (gc < Cdim && gr + V <= Rdim);
      if (vec && whole) {
        x.vec(gr, gc, out);
      } else {
#pragma unroll
        for (int t = 0; t < V; ++t) {
          const int xr = col_fastest ? gr : gr + t, xc = col_fastest ? gc + t : gc;
          out[t] = (xr < Rdim && xc < Cdim) ? Cvt<op_t>::from(x.scalar(xr, xc))
                                            : Cvt<op_t>::from(acc_t(0));
        }
      }
    }
  }

  // regs (from fetch with the same arguments) into the shared tile S[rows][LD].
  template <int GROUPS, int LD, bool VEC_STORE>
  __device__ static __forceinline__ void stash(const op_t* regs, int rows, int cols,
                                               bool col_fastest, op_t* S) {
#pragma unroll
    for (int e = 0; e < GROUPS; ++e) {
      int r, c;
      group_coords(threadIdx.x + e * kThreads, rows, cols, col_fastest, r, c);
      if (VEC_STORE && col_fastest) {
        fcl_store16(S + r * LD + c, regs + e * V);
      } else {
#pragma unroll
        for (int t = 0; t < V; ++t)
          S[(col_fastest ? r : r + t) * LD + (col_fastest ? c + t : c)] = regs[e * V + t];
      }
    }
  }

  // C = opA * opB over the whole Mdim x Ndim output, in BM x BN tiles, rows outer, columns inner
  // (callers rely on this order for their fixed-order row reductions). Must be called by every
  // thread of the block. opA is an operand (above) read as (m, k), opB as (k, n), only in range;
  // a_k_fastest: opA's k index is the contiguous one; b_n_fastest: opB's n index is.
  // epi(m0, n0, mlen, nlen, Cs) sees the finished tile in shared memory (row stride Md::LDC);
  // a barrier follows it, so it may use any thread mapping (but no early return), rewrite the
  // tile in place, and call __syncthreads() itself (every thread runs the epilogue).
  template <class OpA, class OpB, class Epi>
  __device__ static void run(char* smem, int Mdim, int Ndim, int Kdim, bool a_k_fastest,
                             const OpA& opA, bool b_n_fastest, const OpB& opB, Epi&& epi) {
    constexpr int AG = A_PER_THREAD / V, BG = B_PER_THREAD / V;
    op_t* const slabs = reinterpret_cast<op_t*>(smem);  // slab b: A tile, then B tile
    auto As = [&](int b) { return slabs + b * kSlabElems; };
    auto Bs = [&](int b) { return slabs + b * kSlabElems + BM * Md::LDA; };
    acc_t* Cs = reinterpret_cast<acc_t*>(smem);
    const int nk = Kdim > 0 ? (Kdim + BK - 1) / BK : 1;
    __syncthreads();  // the caller may have used this shared memory just before
    for (int m0 = 0; m0 < Mdim; m0 += BM) {
      for (int n0 = 0; n0 < Ndim; n0 += BN) {
        TileAcc<Md> acc;
        acc.zero();
        // Registers hold the next K-slab while the tensor cores work on the current one.
        alignas(16) op_t ra[A_PER_THREAD];
        alignas(16) op_t rb[B_PER_THREAD];
        auto fetch_slab = [&](int k0) {
          fetch<AG>(opA, BM, BK, a_k_fastest, m0, k0, Mdim, Kdim, ra);
          fetch<BG>(opB, BK, BN, b_n_fastest, k0, n0, Kdim, Ndim, rb);
        };
        auto stash_slab = [&](int b) {
          stash<AG, Md::LDA, kVecStoreA>(ra, BM, BK, a_k_fastest, As(b));
          stash<BG, Md::LDB, kVecStoreB>(rb, BK, BN, b_n_fastest, Bs(b));
        };
        // (slab 0 is free: the barrier above, or the previous tile's after its epilogue)
        fetch_slab(0);
        stash_slab(0);
        __syncthreads();
        for (int kt = 0; kt < nk; ++kt) {
          const bool more = kt + 1 < nk;
          if (more) fetch_slab((kt + 1) * BK);  // global loads in flight during the MMAs
          acc.mma(As(kt & 1), Bs(kt & 1));
          // slab (kt + 1) & 1 was last read in iteration kt - 1, before the barrier below it
          if (more) stash_slab((kt + 1) & 1);
          __syncthreads();  // slab kt + 1 is stored; every warp is done with slab kt
        }
        acc.store(Cs);
        __syncthreads();
        epi(m0, n0, min(BM, Mdim - m0), min(BN, Ndim - n0), Cs);
        __syncthreads();
      }
    }
  }
};

// ---- work split ---------------------------------------------------------------------------------
// A kernel's grid is G = R * S blocks; block g = r * S + s owns row chunks r, r + R, ... and
// column chunks s, s + S, ... of the N x M pair grid. Every row belongs to one r, every column
// to one s, so per-split partial results ([S, N, .] for row quantities, [R, M, .] for column
// quantities, [G, .] for weight gradients) each have exactly one writer, and a second kernel
// sums them in fixed order.

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace factorcl_ext::cuda
