// A CPU stand-in for the small part of CUDA that csrc/cuda uses, so that the very same kernel and
// launcher code can run (slowly) on a machine without a GPU: tests/test_cuda_emulated.py.
//
// - every CUDA thread is a std::thread; a block's threads run together, blocks one after another;
// - __syncthreads is a std::barrier over the block, warp shuffles exchange through a per-warp
//   buffer between two warp barriers;
// - dynamic shared memory is one buffer per block, filled with 0xFF (NaN) before the block runs so
//   that reading a shared element nobody wrote shows up;
// - 16-byte vector moves check their alignment as the hardware would (a misaligned one faults);
// - WMMA: lane 0 of a warp does the warp's whole load / mma / store on full 16 x 16 tiles (the
//   other lanes' fragments are unused), with the same layout rules and alignment requirements
//   (asserted) as the hardware's: ldm a multiple of 16 bytes, pointers 32-byte aligned.
//
// What it cannot show: timing, register or shared-memory limits, and races that the barriers of
// this model happen to hide. compute-sanitizer on a GPU covers those (tests/run_compute_sanitizer.sh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include <atomic>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

namespace emu {

struct Idx {
  unsigned x = 0, y = 0, z = 0;
};

struct Warp {
  std::barrier<> bar{32};
  alignas(16) unsigned char buf[32][16];
};

// The dynamic shared memory is allocated at exactly the launch's size (128-byte aligned, as
// FCL_DYNAMIC_SMEM declares it), so that under AddressSanitizer (tests/run_cpu_sanitizers.sh)
// an access past its end is reported rather than landing in alignment slack.
struct Block {
  struct AlignedDelete {
    void operator()(char* p) const { ::operator delete[](p, std::align_val_t(128)); }
  };
  explicit Block(unsigned threads, size_t smem_bytes)
      : bar(threads), smem(new (std::align_val_t(128)) char[smem_bytes > 0 ? smem_bytes : 1]) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
    std::memset(smem.get(), 0xFF, smem_bytes);
    smem_ptr = smem.get();
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::unique_ptr<char[], AlignedDelete> smem;
  char* smem_ptr = nullptr;
};

struct Tls {
  Idx thread, block, bdim, gdim;
  Block* blk = nullptr;
};

inline thread_local Tls t_tls;
inline Tls& tls() { return t_tls; }

inline int sm_count() {
  const char* env = std::getenv("FCL_EMU_SMS");
  return env != nullptr ? std::max(1, std::atoi(env)) : 2;
}

// FCL_EMU_BUDGET overrides the launchers' workspace budget (bytes), to exercise the grid shrinking.
inline int64_t workspace_budget(int64_t dflt) {
  const char* env = std::getenv("FCL_EMU_BUDGET");
  return env != nullptr ? std::max<int64_t>(1, std::atoll(env)) : dflt;
}

// FCL_EMU_BANDS="rows,cols" makes the concat backward cut the pair grid into bands of that many
// rows and columns (its planner only does so when the budget starves a GPU-sized grid, which
// the emulator cannot afford to run), to exercise the banded launches on small problems.
inline bool forced_bands(int64_t& rows, int64_t& cols) {
  const char* env = std::getenv("FCL_EMU_BANDS");
  if (env == nullptr) return false;
  long long r = 0, c = 0;
  if (std::sscanf(env, "%lld,%lld", &r, &c) != 2 || r < 1 || c < 1) return false;
  rows = r;
  cols = c;
  return true;
}

// Grid size of every launch, in order (the host side launches one kernel at a time), so that a
// test can see which work split a launcher chose.
inline std::vector<int64_t> launch_grids;

template <class... KArgs>
void launch(void (*kernel)(KArgs...), unsigned grid, unsigned threads, size_t smem,
            KArgs... args) {
  if (threads % 32 != 0) throw std::runtime_error("emu: block size must be whole warps");
  launch_grids.push_back(grid);
  for (unsigned g = 0; g < grid; ++g) {
    Block blk(threads, smem);
    std::vector<std::thread> ts;
    ts.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        Tls& s = tls();
        s.thread = {t, 0, 0};
        s.block = {g, 0, 0};
        s.bdim = {threads, 1, 1};
        s.gdim = {grid, 1, 1};
        s.blk = &blk;
        kernel(args...);
        s.blk = nullptr;
      });
    }
    for (auto& th : ts) th.join();
  }
}

inline unsigned lane() { return tls().thread.x % 32; }

}  // namespace emu

#define threadIdx (emu::tls().thread)
#define blockIdx (emu::tls().block)
#define blockDim (emu::tls().bdim)
#define gridDim (emu::tls().gdim)
#define FCL_DYNAMIC_SMEM(name) char* name = emu::tls().blk->smem_ptr

inline void __syncthreads() { emu::tls().blk->bar.arrive_and_wait(); }

// common.cuh's 16-byte moves (uint4 loads / stores on the GPU, which fault when misaligned); the
// loads from operands are counted so that a test can see the vector path taken.
namespace emu {
inline std::atomic<int64_t> vector_loads{0};
inline void move16(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
    throw std::runtime_error("emu: 16-byte vector access is not 16-byte aligned");
  std::memcpy(dst, src, 16);
}
}  // namespace emu
inline void fcl_load16(void* regs, const void* src) {
  emu::move16(regs, src);
  emu::vector_loads.fetch_add(1, std::memory_order_relaxed);
}
inline void fcl_store16(void* dst, const void* regs) { emu::move16(dst, regs); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int off) {
  static_assert(sizeof(T) <= 16, "emu shuffle");
  emu::Tls& s = emu::tls();
  const unsigned lane = s.thread.x % 32;
  emu::Warp& w = *s.blk->warps[s.thread.x / 32];
  std::memcpy(w.buf[lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T o;
  std::memcpy(&o, w.buf[lane ^ unsigned(off)], sizeof(T));
  w.bar.arrive_and_wait();
  return o;
}

// ---- WMMA ----------------------------------------------------------------------------------------
namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}
enum layout_t { mem_row_major, mem_col_major };

template <class T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

inline float to_f(float x) { return x; }
inline float to_f(__half x) { return __half2float(x); }
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  using element_type = typename storage<T>::type;
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  element_type x[rows * cols]{};
  element_type& at(int r, int c) { return x[r * cols + c]; }
  const element_type& at(int r, int c) const { return x[r * cols + c]; }
};

template <class P>
inline void check_ptr(const P* p, unsigned ldm, size_t elem_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    throw std::runtime_error("emu wmma: fragment pointer is not 32-byte aligned");
  if ((ldm * elem_bytes) % 16 != 0)
    throw std::runtime_error("emu wmma: ldm is not a multiple of 16 bytes");
}

template <class Use, int M, int N, int K, class T, class L, class P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  check_ptr(p, ldm, sizeof(P));
  if (emu::lane() != 0) return;
  constexpr bool rm = std::is_same_v<L, row_major>;
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c) f.at(r, c) = rm ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K, class TA, class LA, class TB, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                     const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
  if (emu::lane() != 0) return;
  fragment<accumulator, M, N, K, float> out;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.at(i, j);
      for (int k = 0; k < K; ++k) s += to_f(a.at(i, k)) * to_f(b.at(k, j));
      out.at(i, j) = s;
    }
  d = out;
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f,
                              unsigned ldm, layout_t layout) {
  check_ptr(p, ldm, sizeof(float));
  if (emu::lane() != 0) return;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.at(i, j);
}

template <class F, class V>
inline void fill_fragment(F& f, V v) {
  for (auto& e : f.x) e = v;
}

// Round to TF32 (10 explicit mantissa bits), nearest-even on the dropped 13 bits.
inline float __float_to_tf32(float x) {
  if (!std::isfinite(x)) return x;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t lsb = (u >> 13) & 1u;
  u = (u + 0xFFFu + lsb) & ~0x1FFFu;
  float y;
  std::memcpy(&y, &u, 4);
  return y;
}

}  // namespace nvcuda::wmma
