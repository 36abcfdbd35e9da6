// Fused CPU kernels of the concat critic (DESIGN.md section 2).
//
// Work decomposition. The N x M pair grid is cut into strips of R rows; a strip is processed in
// column tiles of C columns (T = R*C pairs). Inside a tile the first-layer activations
// act(A_i + B_j) are formed from A and B straight into a [T, H] buffer, the hidden layers run as
// library GEMMs ([T, H] x [H, H], MKL through at::mm_out) and the output layer is a fused dot
// product. Nothing of size N*M*H exists; a worker holds at most its strip's R x M scores.
//
// - pair_mlp_stats: forward tiles, then an exact two-pass logsumexp over the strip's scores.
// - pair_mlp_stats_backward: recomputes each tile's activations and back-propagates through it.
// - pair_mlp_loss (training fast path): a strip of rows against all M columns is one tile whose
//   activations stay in a per-thread buffer, so the strip's lse, dL/ds and the whole backward
//   follow right away without recompute (3 GEMMs per hidden layer). When even one row's strip
//   would not fit the buffer budget it falls back to column chunks and a recomputing second pass.
//
// Determinism: strips are split into a fixed set of slots (contiguous strip ranges, one per
// thread); each slot owns its dB / weight-gradient partials and the slots are reduced in slot
// order. dA rows are owned by their strip. Row reductions (lse, rowsum, loss) run in double in
// column order. Nothing depends on which thread runs a slot.
//
// Buffer budget: FACTORCL_EXT_CPU_BUFFER_BYTES (read on every call; meant for tests) caps both
// the tile working set and the loss op's per-thread strip buffer.
#include "../factorcl_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

// The build adds no -march flag (the package must run on any x86-64), so the element-wise passes
// are compiled for several ISA levels and picked at load time (GCC function multi-versioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FCL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FCL_CLONES
#endif

namespace factorcl_ext {
namespace {

// ------------------------------------------------------------------------------------------------
// Element-wise passes over [T, H] tile buffers (H innermost, contiguous). Activation is a template
// argument so the inner loops carry no branches. relu keeps NaN (v < 0 ? 0 : v) and its derivative
// is taken from the output as torch's threshold_backward does: h <= 0 ? 0 : g, so a NaN activation
// passes its (NaN) gradient on instead of silently zeroing it.
// ------------------------------------------------------------------------------------------------

template <typename T>
inline T relu(T v) {
  return v < T(0) ? T(0) : v;
}

// out[r*C + c] = act(a[r] + b[c]); for tanh the sum only (tanh applied by ATen afterwards).
template <typename T, bool kRelu>
FCL_CLONES void form_h0(T* __restrict out, const T* __restrict a, const T* __restrict b, int64_t R,
                        int64_t C, int64_t H) {
  for (int64_t r = 0; r < R; ++r) {
    const T* ar = a + r * H;
    for (int64_t c = 0; c < C; ++c) {
      const T* bc = b + c * H;
      T* o = out + (r * C + c) * H;
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        const T v = ar[k] + bc[k];
        o[k] = kRelu ? relu(v) : v;
      }
    }
  }
}

// L = 0 with relu: x[r*C + c] = w . relu(a[r] + b[c]) + bias, no buffer at all. Four rows share
// each load of b[c] and w (the loop is load-bound otherwise); columns go in chunks that stay in
// L1/L2.
constexpr int64_t kL0Rows = 4;
constexpr int64_t kL0Cols = 32;

template <typename T, int kRows>
inline void l0_relu_score_block(const T* __restrict a, const T* __restrict bc,
                                const T* __restrict w, int64_t H, T* acc_out) {
  T acc[kRows] = {};
  if constexpr (kRows == 4) {
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t k = 0; k < H; ++k) {
      const T bk = bc[k], wk = w[k];
      s0 += wk * relu(a[k] + bk);
      s1 += wk * relu(a[H + k] + bk);
      s2 += wk * relu(a[2 * H + k] + bk);
      s3 += wk * relu(a[3 * H + k] + bk);
    }
    acc[0] = s0, acc[1] = s1, acc[2] = s2, acc[3] = s3;
  } else {
    static_assert(kRows == 1);
    T s0 = 0;
#pragma omp simd reduction(+ : s0)
    for (int64_t k = 0; k < H; ++k) s0 += w[k] * relu(a[k] + bc[k]);
    acc[0] = s0;
  }
  for (int rr = 0; rr < kRows; ++rr) acc_out[rr] = acc[rr];
}

template <typename T>
FCL_CLONES void l0_relu_score(const T* __restrict a, const T* __restrict b, int64_t R, int64_t C,
                              int64_t H, const T* __restrict w, T bias, T* __restrict x) {
  for (int64_t c0 = 0; c0 < C; c0 += kL0Cols) {
    const int64_t c1 = std::min(C, c0 + kL0Cols);
    int64_t r = 0;
    for (; r + kL0Rows <= R; r += kL0Rows) {
      for (int64_t c = c0; c < c1; ++c) {
        T acc[kL0Rows];
        l0_relu_score_block<T, kL0Rows>(a + r * H, b + c * H, w, H, acc);
        for (int64_t rr = 0; rr < kL0Rows; ++rr) x[(r + rr) * C + c] = acc[rr] + bias;
      }
    }
    for (; r < R; ++r) {
      for (int64_t c = c0; c < c1; ++c) {
        T acc[1];
        l0_relu_score_block<T, 1>(a + r * H, b + c * H, w, H, acc);
        x[r * C + c] = acc[0] + bias;
      }
    }
  }
}

// z = act(z + bias) over rows of H (tanh: bias only).
template <typename T, bool kRelu>
FCL_CLONES void bias_act(T* __restrict z, const T* __restrict bias, int64_t rows, int64_t H) {
  for (int64_t t = 0; t < rows; ++t) {
    T* zt = z + t * H;
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) {
      const T v = zt[k] + bias[k];
      zt[k] = kRelu ? relu(v) : v;
    }
  }
}

// Last hidden layer with relu: h = relu(z + bias) and x = w . h + b_out in one pass.
template <typename T>
FCL_CLONES void bias_relu_score(T* __restrict z, const T* __restrict bias, const T* __restrict w,
                                T b_out, T* __restrict x, int64_t rows, int64_t H) {
  for (int64_t t = 0; t < rows; ++t) {
    T* zt = z + t * H;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < H; ++k) {
      const T v = relu(zt[k] + bias[k]);
      zt[k] = v;
      acc += w[k] * v;
    }
    x[t] = acc + b_out;
  }
}

template <typename T>
FCL_CLONES void score_rows(const T* __restrict h, const T* __restrict w, T b_out, T* __restrict x,
                           int64_t rows, int64_t H) {
  for (int64_t t = 0; t < rows; ++t) {
    const T* ht = h + t * H;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < H; ++k) acc += w[k] * ht[k];
    x[t] = acc + b_out;
  }
}

template <typename T, bool kRelu>
inline T act_grad(T h, T g) {
  if constexpr (kRelu) {
    return h <= T(0) ? T(0) : g;
  } else {
    return g * (T(1) - h * h);
  }
}

// Output layer backward: dwout += dx_t h_t; h_t <- dz_t = act'(h_t) * dx_t w; db += dz_t.
template <typename T, bool kRelu>
FCL_CLONES void last_backward(T* h, const T* __restrict dx, const T* __restrict w, int64_t rows,
                              int64_t H, T* __restrict dwout, T* __restrict db) {
  for (int64_t t = 0; t < rows; ++t) {
    T* ht = h + t * H;
    const T g = dx[t];
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) {
      const T hv = ht[k];
      dwout[k] += g * hv;
      const T dz = act_grad<T, kRelu>(hv, g * w[k]);
      ht[k] = dz;
      db[k] += dz;
    }
  }
}

// Hidden layer backward: h <- dz = act'(h) * dh; db += dz.
template <typename T, bool kRelu>
FCL_CLONES void mid_backward(T* __restrict h, const T* __restrict dh, int64_t rows, int64_t H,
                             T* __restrict db) {
  for (int64_t t = 0; t < rows; ++t) {
    T* ht = h + t * H;
    const T* dt = dh + t * H;
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) {
      const T dz = act_grad<T, kRelu>(ht[k], dt[k]);
      ht[k] = dz;
      db[k] += dz;
    }
  }
}

// First layer backward: dz0 = act'(h0) * dh0, dA[r] += dz0, dB[c] += dz0. Column-major over the
// tile so each dB row is loaded once per tile column while the R dA rows stay in L1.
template <typename T, bool kRelu>
FCL_CLONES void first_backward(const T* __restrict dh, const T* __restrict h0, int64_t R, int64_t C,
                               int64_t H, T* __restrict dA, T* __restrict dB) {
  for (int64_t c = 0; c < C; ++c) {
    T* dBc = dB + c * H;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = r * C + c;
      const T* dt = dh + t * H;
      const T* ht = h0 + t * H;
      T* dAr = dA + r * H;
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        const T dz = act_grad<T, kRelu>(ht[k], dt[k]);
        dAr[k] += dz;
        dBc[k] += dz;
      }
    }
  }
}

// L = 0 backward from a stored h0 (tanh): dwout += dx h0, dz0 = act'(h0) dx w, into dA, dB.
template <typename T, bool kRelu>
FCL_CLONES void l0_backward(const T* __restrict h0, const T* __restrict dx, const T* __restrict w,
                            int64_t R, int64_t C, int64_t H, T* __restrict dA, T* __restrict dB,
                            T* __restrict dwout) {
  for (int64_t c = 0; c < C; ++c) {
    T* dBc = dB + c * H;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = r * C + c;
      const T g = dx[t];
      const T* ht = h0 + t * H;
      T* dAr = dA + r * H;
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        const T hv = ht[k];
        dwout[k] += g * hv;
        const T dz = act_grad<T, kRelu>(hv, g * w[k]);
        dAr[k] += dz;
        dBc[k] += dz;
      }
    }
  }
}

// L = 0 backward with relu, recomputing h0 = relu(a + b) instead of storing it. kRows rows share
// one load and store of dB[c] and dwout per element (this pass is load/store-bound otherwise).
template <typename T, int kRows>
inline void l0_relu_backward_block(const T* __restrict a, const T* __restrict bc,
                                   const T* __restrict g, const T* __restrict w, int64_t H,
                                   T* __restrict dA, T* __restrict dBc, T* __restrict dwout) {
#pragma omp simd
  for (int64_t k = 0; k < H; ++k) {
    const T bk = bc[k], wk = w[k];
    T db = 0, dw = 0;
    for (int rr = 0; rr < kRows; ++rr) {
      const T hv = relu(a[rr * H + k] + bk);
      dw += g[rr] * hv;
      const T dz = hv <= T(0) ? T(0) : g[rr] * wk;
      dA[rr * H + k] += dz;
      db += dz;
    }
    dBc[k] += db;
    dwout[k] += dw;
  }
}

template <typename T>
FCL_CLONES void l0_relu_backward(const T* __restrict a, const T* __restrict b,
                                 const T* __restrict dx, const T* __restrict w, int64_t R,
                                 int64_t C, int64_t H, T* __restrict dA, T* __restrict dB,
                                 T* __restrict dwout) {
  for (int64_t c0 = 0; c0 < C; c0 += kL0Cols) {
    const int64_t c1 = std::min(C, c0 + kL0Cols);
    int64_t r = 0;
    for (; r + kL0Rows <= R; r += kL0Rows) {
      for (int64_t c = c0; c < c1; ++c) {
        T g[kL0Rows];
        for (int64_t rr = 0; rr < kL0Rows; ++rr) g[rr] = dx[(r + rr) * C + c];
        l0_relu_backward_block<T, kL0Rows>(a + r * H, b + c * H, g, w, H, dA + r * H, dB + c * H,
                                           dwout);
      }
    }
    for (; r < R; ++r) {
      for (int64_t c = c0; c < c1; ++c) {
        const T g = dx[r * C + c];
        l0_relu_backward_block<T, 1>(a + r * H, b + c * H, &g, w, H, dA + r * H, dB + c * H, dwout);
      }
    }
  }
}

template <typename T>
FCL_CLONES void add_into(T* __restrict acc, const T* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) acc[k] += x[k];
}

// ------------------------------------------------------------------------------------------------
// Library calls on raw tile buffers.
// ------------------------------------------------------------------------------------------------

template <typename T>
at::Tensor view2d(const T* p, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<T*>(p), {rows, cols},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

template <typename T>
void tanh_inplace(T* p, int64_t n) {
  // ATen's vectorised tanh (the reference's own kernel); a scalar std::tanh would cost as much
  // as the GEMMs.
  view2d(p, 1, n).tanh_();
}

// out[rows, H] = in[rows, H] @ W^T   (W in nn.Linear layout [out, in])
template <typename T>
void mm_forward(T* out, const T* in, const T* W, int64_t rows, int64_t H) {
  auto o = view2d(out, rows, H);
  at::mm_out(o, view2d(in, rows, H), view2d(W, H, H).t());
}

// out[rows, H] = dz[rows, H] @ W
template <typename T>
void mm_input_grad(T* out, const T* dz, const T* W, int64_t rows, int64_t H) {
  auto o = view2d(out, rows, H);
  at::mm_out(o, view2d(dz, rows, H), view2d(W, H, H));
}

// dW[H, H] += dz^T @ h
template <typename T>
void mm_weight_grad(T* dW, const T* dz, const T* h, int64_t rows, int64_t H) {
  view2d(dW, H, H).addmm_(view2d(dz, rows, H).t(), view2d(h, rows, H));
}

// ------------------------------------------------------------------------------------------------
// Problem description, workspaces, per-row statistics.
// ------------------------------------------------------------------------------------------------

enum class Act { kRelu, kTanh };
enum class OutAct { kNone, kSoftplus };

Act parse_act(c10::string_view s) {
  if (s == "relu") return Act::kRelu;
  if (s == "tanh") return Act::kTanh;
  TORCH_CHECK_VALUE(false, "activation must be one of ('relu', 'tanh'), got '", std::string(s),
                    "'");
}

OutAct parse_out_act(c10::string_view s) {
  if (s == "none") return OutAct::kNone;
  if (s == "softplus") return OutAct::kSoftplus;
  TORCH_CHECK_VALUE(false, "out_activation must be one of ('none', 'softplus'), got '",
                    std::string(s), "'");
}

template <typename T>
struct Net {
  int64_t N, M, H, L;
  bool relu;
  bool softplus;
  int64_t pos;  // -1: no positives
  const T* A;
  const T* B;
  std::vector<const T*> W, b;
  const T* w_out;
  T b_out;
};

// How many [T, H] buffers a tile needs.
int64_t num_buffers(int64_t L, bool relu, bool keep) {
  if (L == 0) return relu ? 0 : 1;  // relu L=0 recomputes relu(A_i + B_j) where needed
  return keep ? L + 2 : 2;          // keep: h_0..h_L and one backprop scratch; else ping-pong
}

constexpr int64_t kDefaultTileBytes = int64_t(1) << 20;    // about one core's L2
constexpr int64_t kDefaultStripBytes = int64_t(16) << 20;  // loss op per-thread activations
constexpr int64_t kMinTilePairs = 64;                      // keeps GEMMs from getting too thin

struct Budget {
  int64_t tile_bytes;
  int64_t strip_bytes;
  int64_t min_pairs;
};

Budget read_budget() {
  const char* env = std::getenv("FACTORCL_EXT_CPU_BUFFER_BYTES");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(end != env && *end == '\0' && v > 0,
                      "FACTORCL_EXT_CPU_BUFFER_BYTES must be a positive integer, got '", env, "'");
    return {std::min<int64_t>(v, kDefaultTileBytes), v, 1};
  }
  return {kDefaultTileBytes, kDefaultStripBytes, kMinTilePairs};
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Columns split evenly: ceil(M / max_cols) tiles of equal width, not full tiles and a sliver.
int64_t balanced_cols(int64_t M, int64_t max_cols) {
  return ceil_div(M, ceil_div(M, std::max<int64_t>(max_cols, 1)));
}

struct Tiling {
  int64_t R, C;
};

// Tile of at most `pairs` pairs: whole rows of columns first, then several rows per tile, but
// never so many rows that fewer strips than threads remain.
Tiling plan_tiles(int64_t N, int64_t M, int64_t pairs, int64_t threads) {
  pairs = std::max<int64_t>(pairs, 1);
  const int64_t C = balanced_cols(M, pairs);
  int64_t R = std::max<int64_t>(1, pairs / C);
  R = std::min(R, std::max<int64_t>(1, ceil_div(N, std::max<int64_t>(threads, 1))));
  return {R, C};
}

// One worker's scratch, carved from a single allocation at 64-byte boundaries (MKL's results
// depend on operand alignment; fixed alignment keeps them reproducible).
template <typename T>
struct Workspace {
  at::Tensor storage;
  std::vector<T*> h;  // activation buffers, then (keep, L >= 1) one backprop scratch
  T* x = nullptr;     // [tile pairs]
  T* dx = nullptr;    // [tile pairs]
  T* db = nullptr;    // [L * H]
  T* dwout = nullptr;
  T* s_strip = nullptr;  // [strip rows * M]
  T* x_strip = nullptr;
  T* dx_strip = nullptr;

  Workspace(int64_t nbuf, int64_t tile_pairs, int64_t H, int64_t L, int64_t strip_elems,
            bool grads) {
    constexpr int64_t kAlign = 64 / sizeof(T);
    auto round = [](int64_t n) { return ceil_div(std::max<int64_t>(n, 1), kAlign) * kAlign; };
    const int64_t buf = round(tile_pairs * H);
    const int64_t vec = round(tile_pairs);
    const int64_t strip = round(strip_elems);
    int64_t total = nbuf * buf + 2 * vec + 3 * strip;
    if (grads) total += round(L * H) + round(H);
    storage =
        at::empty({total + kAlign}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    T* base = storage.data_ptr<T>();
    // at::empty is 64-byte aligned already; the slack makes that an assumption we do not need.
    const auto addr = reinterpret_cast<std::uintptr_t>(base);
    base += ((64 - addr % 64) % 64) / sizeof(T);
    for (int64_t i = 0; i < nbuf; ++i, base += buf) h.push_back(base);
    x = base, base += vec;
    dx = base, base += vec;
    s_strip = base, base += strip;
    x_strip = base, base += strip;
    dx_strip = base, base += strip;
    if (grads) {
      db = base, base += round(L * H);
      dwout = base;
    }
  }
};

// Gradient partials of one slot, in the accumulation dtype (the input dtype; d_b_out in double).
template <typename T>
struct Slot {
  T* dB;               // [M, H]
  std::vector<T*> dW;  // L x [H, H]
  T* db;               // [L, H], then dwout [H]
  T* dwout;
  double dbout = 0.0;
};

struct RowStats {
  double lse, pos, rowsum;
};

// Exact logsumexp with torch.logsumexp's conventions: shift by the max over non-NaN values unless
// that max is infinite (then shift by 0), so a row with a NaN gives NaN, an all -inf row gives
// -inf and a row with +inf gives +inf, never a finite number.
template <typename T>
RowStats row_stats(const T* s, int64_t M, int64_t pos_col) {
  double m = -std::numeric_limits<double>::infinity();
  double rowsum = 0.0;
  for (int64_t j = 0; j < M; ++j) {
    const double v = s[j];
    if (v > m) m = v;
    rowsum += v;
  }
  const double shift = std::isfinite(m) ? m : 0.0;
  double sum = 0.0;
  for (int64_t j = 0; j < M; ++j) sum += std::exp(double(s[j]) - shift);
  const double pos = pos_col >= 0 ? double(s[pos_col]) : 0.0;
  return {std::log(sum) + shift, pos, rowsum};
}

template <typename T>
inline T out_act_fwd(T x, bool softplus) {
  if (!softplus) return x;
  // F.softplus, beta = 1, threshold = 20.
  return x > T(20) ? x : T(std::log1p(std::exp(double(x))));
}

inline double out_act_grad(double x, bool softplus) {
  if (!softplus) return 1.0;
  if (x > 20.0) return 1.0;
  const double e = std::exp(x);
  return e / (e + 1.0);
}

// dx_j = (g_lse exp(s_j - lse) + g_pos [j == pos_col] + g_rowsum) * out_act'(x_j) for one row.
template <typename T>
void row_dx(const T* s, const T* x, int64_t M, int64_t pos_col, double lse, double gl, double gp,
            double gr, bool softplus, T* dx) {
  for (int64_t j = 0; j < M; ++j) {
    double ds = gl * std::exp(double(s[j]) - lse) + gr;
    if (j == pos_col) ds += gp;
    dx[j] = T(ds * out_act_grad(double(x[j]), softplus));
  }
}

// ------------------------------------------------------------------------------------------------
// Tile forward and backward.
// ------------------------------------------------------------------------------------------------

// Scores (pre output activation) of the R x C tile at (i0, j0) into x[r*C + c]. With keep, h[l]
// holds layer l's activations afterwards (what backward_tile needs).
template <typename T>
void forward_tile(const Net<T>& net, Workspace<T>& ws, int64_t i0, int64_t R, int64_t j0, int64_t C,
                  bool keep, T* x) {
  const int64_t H = net.H, rows = R * C;
  const T* a = net.A + i0 * H;
  const T* b = net.B + j0 * H;
  if (net.L == 0) {
    if (net.relu) {
      l0_relu_score<T>(a, b, R, C, H, net.w_out, net.b_out, x);
    } else {
      form_h0<T, false>(ws.h[0], a, b, R, C, H);
      tanh_inplace(ws.h[0], rows * H);
      score_rows<T>(ws.h[0], net.w_out, net.b_out, x, rows, H);
    }
    return;
  }
  if (net.relu) {
    form_h0<T, true>(ws.h[0], a, b, R, C, H);
  } else {
    form_h0<T, false>(ws.h[0], a, b, R, C, H);
    tanh_inplace(ws.h[0], rows * H);
  }
  const T* in = ws.h[0];
  for (int64_t l = 1; l <= net.L; ++l) {
    T* out = keep ? ws.h[l] : ws.h[l % 2];
    mm_forward(out, in, net.W[l - 1], rows, H);
    const T* bias = net.b[l - 1];
    if (net.relu) {
      if (l < net.L) {
        bias_act<T, true>(out, bias, rows, H);
      } else {
        bias_relu_score<T>(out, bias, net.w_out, net.b_out, x, rows, H);
      }
    } else {
      bias_act<T, false>(out, bias, rows, H);
      tanh_inplace(out, rows * H);
      if (l == net.L) score_rows<T>(out, net.w_out, net.b_out, x, rows, H);
    }
    in = out;
  }
}

// Back-propagates dx (dL/dx per pair, x = pre output activation) through the tile whose
// activations forward_tile(keep=true) left in ws. dA: the tile's R rows (accumulated), dB and the
// weight gradients: the slot's partials.
template <typename T, bool kRelu>
void backward_tile_impl(const Net<T>& net, Workspace<T>& ws, Slot<T>& slot, int64_t i0, int64_t R,
                        int64_t j0, int64_t C, const T* dx, T* dA) {
  const int64_t H = net.H, L = net.L, rows = R * C;
  double dbout = 0.0;
  for (int64_t t = 0; t < rows; ++t) dbout += double(dx[t]);
  slot.dbout += dbout;
  std::fill(ws.dwout, ws.dwout + H, T(0));
  T* dB = slot.dB + j0 * H;
  if (L == 0) {
    if constexpr (kRelu) {
      l0_relu_backward<T>(net.A + i0 * H, net.B + j0 * H, dx, net.w_out, R, C, H, dA, dB, ws.dwout);
    } else {
      l0_backward<T, false>(ws.h[0], dx, net.w_out, R, C, H, dA, dB, ws.dwout);
    }
    add_into<T>(slot.dwout, ws.dwout, H);
    return;
  }
  std::fill(ws.db, ws.db + L * H, T(0));
  last_backward<T, kRelu>(ws.h[L], dx, net.w_out, rows, H, ws.dwout, ws.db + (L - 1) * H);
  T* cur = ws.h[L];        // dz of layer l
  T* spare = ws.h[L + 1];  // the backprop scratch buffer
  for (int64_t l = L; l >= 1; --l) {
    mm_weight_grad(slot.dW[l - 1], cur, ws.h[l - 1], rows, H);
    mm_input_grad(spare, cur, net.W[l - 1], rows, H);
    if (l > 1) {
      mid_backward<T, kRelu>(ws.h[l - 1], spare, rows, H, ws.db + (l - 2) * H);
      spare = cur;  // h[l] is free now
      cur = ws.h[l - 1];
    } else {
      first_backward<T, kRelu>(spare, ws.h[0], R, C, H, dA, dB);
    }
  }
  add_into<T>(slot.db, ws.db, L * H);
  add_into<T>(slot.dwout, ws.dwout, H);
}

template <typename T>
void backward_tile(const Net<T>& net, Workspace<T>& ws, Slot<T>& slot, int64_t i0, int64_t R,
                   int64_t j0, int64_t C, const T* dx, T* dA) {
  if (net.relu) {
    backward_tile_impl<T, true>(net, ws, slot, i0, R, j0, C, dx, dA);
  } else {
    backward_tile_impl<T, false>(net, ws, slot, i0, R, j0, C, dx, dA);
  }
}

// ------------------------------------------------------------------------------------------------
// Argument checks (second line: Python validates first, with the same meaning).
// ------------------------------------------------------------------------------------------------

void check_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& A) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " is on ", t.device(),
                    " but the CPU kernel needs CPU tensors");
  TORCH_CHECK_TYPE(t.scalar_type() == A.scalar_type(), op, ": ", name, " has dtype ",
                   t.scalar_type(), " but A has ", A.scalar_type(),
                   ": all inputs must have one dtype");
}

struct Checked {
  int64_t N, M, H, L;
  Act act;
  OutAct out_act;
  int64_t pos;
};

Checked check_inputs(const char* op, const at::Tensor& A, const at::Tensor& B, at::TensorList Ws,
                     at::TensorList bs, const at::Tensor& w_out, const at::Tensor& b_out,
                     c10::string_view activation, c10::string_view out_activation,
                     std::optional<int64_t> pos_offset) {
  TORCH_CHECK_VALUE(A.defined() && A.dim() == 2, op, ": A must have 2 dimensions, got shape ",
                    A.sizes());
  TORCH_CHECK_VALUE(B.defined() && B.dim() == 2, op, ": B must have 2 dimensions, got shape ",
                    B.sizes());
  TORCH_CHECK_VALUE(A.device().is_cpu(), op, ": A is on ", A.device(),
                    " but the CPU kernel needs CPU tensors");
  TORCH_CHECK_TYPE(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble, op,
                   ": A has dtype ", A.scalar_type(),
                   "; supported on cpu: torch.float32, torch.float64");
  check_tensor(op, "B", B, A);
  const int64_t N = A.size(0), M = B.size(0), H = A.size(1);
  TORCH_CHECK_VALUE(N > 0 && M > 0, op, ": empty batch: A has shape ", A.sizes(),
                    " and B has shape ", B.sizes(), "; both need at least one row");
  TORCH_CHECK_VALUE(B.size(1) == H, op, ": A has shape ", A.sizes(), " and B ", B.sizes(),
                    ": widths must agree");
  TORCH_CHECK_VALUE(H > 0, op, ": hidden width H must be at least 1, got A of shape ", A.sizes());
  TORCH_CHECK_VALUE(Ws.size() == bs.size(), op, ": hidden_weights has ", Ws.size(),
                    " layers but hidden_biases has ", bs.size());
  for (size_t l = 0; l < Ws.size(); ++l) {
    const std::string wn = "hidden_weights[" + std::to_string(l) + "]";
    const std::string bn = "hidden_biases[" + std::to_string(l) + "]";
    check_tensor(op, wn.c_str(), Ws[l], A);
    check_tensor(op, bn.c_str(), bs[l], A);
    TORCH_CHECK_VALUE(Ws[l].dim() == 2 && Ws[l].size(0) == H && Ws[l].size(1) == H &&
                          bs[l].dim() == 1 && bs[l].size(0) == H,
                      op, ": hidden layer ", l, ": expected weight (", H, ", ", H, ") and bias (",
                      H, ",), got ", Ws[l].sizes(), " and ", bs[l].sizes());
  }
  check_tensor(op, "w_out", w_out, A);
  check_tensor(op, "b_out", b_out, A);
  TORCH_CHECK_VALUE(w_out.dim() == 1 && w_out.size(0) == H, op, ": w_out must have shape (", H,
                    ",), got ", w_out.sizes());
  TORCH_CHECK_VALUE(b_out.numel() == 1 && b_out.dim() <= 1, op,
                    ": b_out must be a scalar (shape () or (1,)), got ", b_out.sizes());
  Checked c{N, M, H, int64_t(Ws.size()), parse_act(activation), parse_out_act(out_activation), -1};
  c.pos = checked_offset(op, "pos_offset", pos_offset, N, M);
  return c;
}

// Contiguous copies of the inputs and the raw-pointer view of the network over them.
template <typename T>
struct NetHolder {
  at::Tensor A, B, w_out;
  std::vector<at::Tensor> W, b;
  Net<T> net;

  NetHolder(const Checked& c, const at::Tensor& A_, const at::Tensor& B_, at::TensorList Ws,
            at::TensorList bs, const at::Tensor& w_out_, const at::Tensor& b_out) {
    A = A_.contiguous();
    B = B_.contiguous();
    w_out = w_out_.contiguous();
    for (const auto& w : Ws) W.push_back(w.contiguous());
    for (const auto& x : bs) b.push_back(x.contiguous());
    net.N = c.N, net.M = c.M, net.H = c.H, net.L = c.L;
    net.relu = c.act == Act::kRelu;
    net.softplus = c.out_act == OutAct::kSoftplus;
    net.pos = c.pos;
    net.A = A.data_ptr<T>();
    net.B = B.data_ptr<T>();
    for (const auto& w : W) net.W.push_back(w.data_ptr<T>());
    for (const auto& x : b) net.b.push_back(x.data_ptr<T>());
    net.w_out = w_out.data_ptr<T>();
    net.b_out = b_out.reshape({}).item<T>();
  }
};

template <typename T>
int64_t pos_col_of(const Net<T>& net, int64_t i) {
  return net.pos >= 0 ? i + net.pos : -1;
}

// Nested ATen calls from worker threads skip autograd (nothing here requires grad; this only
// saves the dispatcher a hop).
struct WorkerGuard {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autograd_dispatch_keyset};
};

// Slot partials of the backward passes and their ordered reduction. Slot 0 accumulates straight
// into the output tensors; slots 1.. into one scratch tensor. Every slot's buffers are zeroed by
// the worker that owns it (first touch on that thread, and no separate parallel fill), and the
// reduction out = ((slot 0 + slot 1) + slot 2) + ... is a single parallel pass.
template <typename T>
struct SlotSet {
  int64_t S, M, H, L;
  at::Tensor dB;               // output [M, H]
  std::vector<at::Tensor> dW;  // outputs, L x [H, H]
  at::Tensor small;            // slot 0's db (L x H) and dwout (H)
  at::Tensor scratch;          // slots 1..S-1, each [M*H + L*H*H + L*H + H]
  std::vector<Slot<T>> slots;

  int64_t per_slot() const { return M * H + L * H * H + L * H + H; }

  SlotSet(int64_t S_, int64_t M_, int64_t H_, int64_t L_) : S(S_), M(M_), H(H_), L(L_) {
    auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    dB = at::empty({M, H}, opts);
    for (int64_t l = 0; l < L; ++l) dW.push_back(at::empty({H, H}, opts));
    small = at::empty({L * H + H}, opts);
    scratch = at::empty({(S - 1) * per_slot()}, opts);
    Slot<T> s0;
    s0.dB = dB.data_ptr<T>();
    for (auto& w : dW) s0.dW.push_back(w.data_ptr<T>());
    s0.db = small.data_ptr<T>();
    s0.dwout = s0.db + L * H;
    slots.push_back(s0);
    for (int64_t s = 1; s < S; ++s) {
      Slot<T> sl;
      T* base = scratch.data_ptr<T>() + (s - 1) * per_slot();
      sl.dB = base, base += M * H;
      for (int64_t l = 0; l < L; ++l) sl.dW.push_back(base), base += H * H;
      sl.db = base, base += L * H;
      sl.dwout = base;
      slots.push_back(sl);
    }
  }

  // Called by the worker that owns slot s, before it accumulates.
  void zero(int64_t s) {
    Slot<T>& sl = slots[s];
    std::fill(sl.dB, sl.dB + M * H, T(0));
    for (T* w : sl.dW) std::fill(w, w + H * H, T(0));
    std::fill(sl.db, sl.db + L * H + H, T(0));  // db and dwout are adjacent in every slot
  }

  void reduce() {
    if (S == 1) return;
    struct Segment {
      T* dst;
      std::vector<const T*> src;  // slots 1..S-1
      int64_t size;
    };
    std::vector<Segment> segs;
    auto add = [&](T* dst, auto&& src_of, int64_t size) {
      Segment g{dst, {}, size};
      for (int64_t s = 1; s < S; ++s) g.src.push_back(src_of(slots[s]));
      segs.push_back(std::move(g));
    };
    add(slots[0].dB, [](const Slot<T>& x) { return x.dB; }, M * H);
    for (int64_t l = 0; l < L; ++l)
      add(slots[0].dW[l], [l](const Slot<T>& x) { return x.dW[l]; }, H * H);
    add(slots[0].db, [](const Slot<T>& x) { return x.db; }, L * H + H);
    std::vector<int64_t> start{0};
    for (const auto& g : segs) start.push_back(start.back() + g.size);
    at::parallel_for(0, start.back(), 16384, [&](int64_t k0, int64_t k1) {
      for (size_t i = 0; i < segs.size(); ++i) {
        const int64_t lo = std::max(k0, start[i]), hi = std::min(k1, start[i + 1]);
        for (int64_t k = lo - start[i]; k < hi - start[i]; ++k) {
          T acc = segs[i].dst[k];
          for (const T* src : segs[i].src) acc += src[k];
          segs[i].dst[k] = acc;
        }
      }
    });
  }

  double dbout() const {
    double acc = 0.0;
    for (const auto& s : slots) acc += s.dbout;
    return acc;
  }
};

// Strips [begin, end) of slot s when num_strips strips are dealt to S slots.
std::pair<int64_t, int64_t> slot_range(int64_t s, int64_t S, int64_t num_strips) {
  return {s * num_strips / S, (s + 1) * num_strips / S};
}

// ------------------------------------------------------------------------------------------------
// Drivers.
// ------------------------------------------------------------------------------------------------

// Forward statistics; also the !compute_grad loss. Writes lse/pos/rowsum (double) per row.
template <typename T>
void stats_forward(const Net<T>& net, double* lse, double* pos, double* rowsum) {
  const Budget budget = read_budget();
  const int64_t H = net.H, M = net.M, N = net.N;
  const int64_t nbuf = num_buffers(net.L, net.relu, /*keep=*/false);
  const int64_t pair_bytes = (nbuf * H + 2) * int64_t(sizeof(T));
  const int64_t pairs = std::max(budget.min_pairs, budget.tile_bytes / pair_bytes);
  const Tiling tl = plan_tiles(N, M, pairs, at::get_num_threads());
  const int64_t num_strips = ceil_div(N, tl.R);
  at::parallel_for(0, num_strips, 1, [&](int64_t s0, int64_t s1) {
    WorkerGuard guard;
    Workspace<T> ws(nbuf, tl.R * tl.C, H, net.L, tl.R * M, /*grads=*/false);
    for (int64_t strip = s0; strip < s1; ++strip) {
      const int64_t i0 = strip * tl.R, R = std::min(tl.R, N - i0);
      for (int64_t j0 = 0; j0 < M; j0 += tl.C) {
        const int64_t C = std::min(tl.C, M - j0);
        forward_tile(net, ws, i0, R, j0, C, /*keep=*/false, ws.x);
        for (int64_t r = 0; r < R; ++r)
          for (int64_t c = 0; c < C; ++c)
            ws.s_strip[r * M + j0 + c] = out_act_fwd(ws.x[r * C + c], net.softplus);
      }
      for (int64_t r = 0; r < R; ++r) {
        const RowStats st = row_stats(ws.s_strip + r * M, M, pos_col_of(net, i0 + r));
        lse[i0 + r] = st.lse;
        pos[i0 + r] = st.pos;
        rowsum[i0 + r] = st.rowsum;
      }
    }
  });
}

template <typename T>
struct Grads {
  at::Tensor dA, dB;
  std::vector<at::Tensor> dW, db;
  at::Tensor dwout, dbout;
};

template <typename T>
Grads<T> collect(SlotSet<T>& slots, at::Tensor dA, const at::Tensor& b_out) {
  slots.reduce();
  const int64_t H = slots.H, L = slots.L;
  Grads<T> g;
  g.dA = std::move(dA);
  g.dB = slots.dB;
  g.dW = slots.dW;
  for (int64_t l = 0; l < L; ++l) g.db.push_back(slots.small.narrow(0, l * H, H).clone());
  g.dwout = slots.small.narrow(0, L * H, H).clone();
  g.dbout = at::full(b_out.sizes(), slots.dbout(), b_out.options());
  return g;
}

// The gradients laid out like their inputs (like_input), as the op returns them.
template <typename T>
Grads<T> like_inputs(Grads<T> g, const at::Tensor& A, const at::Tensor& B,
                     at::TensorList hidden_weights, at::TensorList hidden_biases,
                     const at::Tensor& w_out) {
  g.dA = like_input(g.dA, A);
  g.dB = like_input(g.dB, B);
  for (size_t l = 0; l < g.dW.size(); ++l) {
    g.dW[l] = like_input(g.dW[l], hidden_weights[l]);
    g.db[l] = like_input(g.db[l], hidden_biases[l]);
  }
  g.dwout = like_input(g.dwout, w_out);
  return g;
}

// Recomputing backward of the stats op: per-row upstream gradients gl, gp, gr and the saved lse.
template <typename T>
Grads<T> stats_backward(const Net<T>& net, const T* gl, const T* gp, const T* gr, const T* lse,
                        const at::Tensor& b_out) {
  const Budget budget = read_budget();
  const int64_t H = net.H, M = net.M, N = net.N;
  const int64_t nbuf = num_buffers(net.L, net.relu, /*keep=*/true);
  const int64_t pair_bytes = (nbuf * H + 2) * int64_t(sizeof(T));
  const int64_t pairs = std::max(budget.min_pairs, budget.tile_bytes / pair_bytes);
  const Tiling tl = plan_tiles(N, M, pairs, at::get_num_threads());
  const int64_t num_strips = ceil_div(N, tl.R);
  const int64_t S = std::min<int64_t>(num_strips, std::max(1, at::get_num_threads()));
  SlotSet<T> slots(S, M, H, net.L);
  at::Tensor dA = at::empty({N, H}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* dAp = dA.data_ptr<T>();
  at::parallel_for(0, S, 1, [&](int64_t a, int64_t b) {
    WorkerGuard guard;
    Workspace<T> ws(nbuf, tl.R * tl.C, H, net.L, 0, /*grads=*/true);
    for (int64_t s = a; s < b; ++s) {
      slots.zero(s);
      auto [first, last] = slot_range(s, S, num_strips);
      for (int64_t strip = first; strip < last; ++strip) {
        const int64_t i0 = strip * tl.R, R = std::min(tl.R, N - i0);
        std::fill(dAp + i0 * H, dAp + (i0 + R) * H, T(0));
        for (int64_t j0 = 0; j0 < M; j0 += tl.C) {
          const int64_t C = std::min(tl.C, M - j0);
          forward_tile(net, ws, i0, R, j0, C, /*keep=*/true, ws.x);
          for (int64_t r = 0; r < R; ++r) {
            const int64_t i = i0 + r;
            const int64_t pc = pos_col_of(net, i);
            for (int64_t c = 0; c < C; ++c) {
              const int64_t j = j0 + c;
              const double x = ws.x[r * C + c];
              const double sv = out_act_fwd(T(x), net.softplus);
              double ds = double(gl[i]) * std::exp(sv - double(lse[i])) + double(gr[i]);
              if (j == pc) ds += double(gp[i]);
              ws.dx[r * C + c] = T(ds * out_act_grad(x, net.softplus));
            }
          }
          backward_tile(net, ws, slots.slots[s], i0, R, j0, C, ws.dx, dAp + i0 * H);
        }
      }
    }
  });
  return collect(slots, std::move(dA), b_out);
}

// The training fast path with gradients; row_loss[i] receives row i's loss term.
template <typename T>
Grads<T> loss_with_grad(const Net<T>& net, double c_lse, double c_pos, double c_rowsum,
                        double* row_loss, const at::Tensor& b_out) {
  const Budget budget = read_budget();
  const int64_t H = net.H, M = net.M, N = net.N;
  const int64_t nbuf = num_buffers(net.L, net.relu, /*keep=*/true);
  const int64_t pair_bytes = (nbuf * H + 5) * int64_t(sizeof(T));
  const int64_t threads = std::max(1, at::get_num_threads());
  const bool whole_rows = M * pair_bytes <= budget.strip_bytes;
  int64_t R = 1, C = M;
  if (whole_rows) {
    const int64_t target = std::max(budget.tile_bytes, budget.min_pairs * pair_bytes);
    R = std::max<int64_t>(1, std::min(target, budget.strip_bytes) / (M * pair_bytes));
    R = std::min(R, std::max<int64_t>(1, ceil_div(N, threads)));
  } else {
    C = balanced_cols(M, budget.strip_bytes / pair_bytes);
  }
  const int64_t num_strips = ceil_div(N, R);
  const int64_t S = std::min(num_strips, threads);
  SlotSet<T> slots(S, M, H, net.L);
  at::Tensor dA = at::empty({N, H}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* dAp = dA.data_ptr<T>();
  at::parallel_for(0, S, 1, [&](int64_t a, int64_t b) {
    WorkerGuard guard;
    Workspace<T> ws(nbuf, R * C, H, net.L, R * M, /*grads=*/true);
    for (int64_t s = a; s < b; ++s) {
      slots.zero(s);
      Slot<T>& slot = slots.slots[s];
      auto [first, last] = slot_range(s, S, num_strips);
      for (int64_t strip = first; strip < last; ++strip) {
        const int64_t i0 = strip * R, Rr = std::min(R, N - i0);
        std::fill(dAp + i0 * H, dAp + (i0 + Rr) * H, T(0));
        // Pass 1: the strip's scores (and, for whole rows, its activations).
        if (whole_rows) {
          forward_tile(net, ws, i0, Rr, 0, M, /*keep=*/true, ws.x_strip);
        } else {
          for (int64_t j0 = 0; j0 < M; j0 += C) {
            forward_tile(net, ws, i0, 1, j0, std::min(C, M - j0), /*keep=*/false, ws.x_strip + j0);
          }
        }
        for (int64_t t = 0; t < Rr * M; ++t)
          ws.s_strip[t] = out_act_fwd(ws.x_strip[t], net.softplus);
        for (int64_t r = 0; r < Rr; ++r) {
          const int64_t i = i0 + r, pc = pos_col_of(net, i);
          const RowStats st = row_stats(ws.s_strip + r * M, M, pc);
          row_loss[i] = c_lse * st.lse + c_pos * st.pos + c_rowsum * st.rowsum;
          row_dx(ws.s_strip + r * M, ws.x_strip + r * M, M, pc, st.lse, c_lse,
                 pc >= 0 ? c_pos : 0.0, c_rowsum, net.softplus, ws.dx_strip + r * M);
        }
        // Pass 2: back-propagate (recomputing the activations only for column chunks).
        if (whole_rows) {
          backward_tile(net, ws, slot, i0, Rr, 0, M, ws.dx_strip, dAp + i0 * H);
        } else {
          for (int64_t j0 = 0; j0 < M; j0 += C) {
            const int64_t Cc = std::min(C, M - j0);
            forward_tile(net, ws, i0, 1, j0, Cc, /*keep=*/true, ws.x);
            backward_tile(net, ws, slot, i0, 1, j0, Cc, ws.dx_strip + j0, dAp + i0 * H);
          }
        }
      }
    }
  });
  return collect(slots, std::move(dA), b_out);
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Entry points.
// ------------------------------------------------------------------------------------------------

Stats pair_mlp_stats_cpu(const at::Tensor& A, const at::Tensor& B, at::TensorList hidden_weights,
                         at::TensorList hidden_biases, const at::Tensor& w_out,
                         const at::Tensor& b_out, c10::string_view activation,
                         c10::string_view out_activation, std::optional<int64_t> pos_offset) {
  const Checked c = check_inputs("pair_mlp_stats", A, B, hidden_weights, hidden_biases, w_out,
                                 b_out, activation, out_activation, pos_offset);
  auto dopts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor lse = at::empty({c.N}, dopts), pos = at::empty({c.N}, dopts),
             rowsum = at::empty({c.N}, dopts);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "pair_mlp_stats_cpu", [&] {
    NetHolder<scalar_t> h(c, A, B, hidden_weights, hidden_biases, w_out, b_out);
    stats_forward(h.net, lse.data_ptr<double>(), pos.data_ptr<double>(), rowsum.data_ptr<double>());
  });
  const auto st = A.scalar_type();
  return {lse.to(st), pos.to(st), rowsum.to(st)};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
           at::Tensor>
pair_mlp_stats_backward_cpu(const at::Tensor& grad_lse, const at::Tensor& grad_pos,
                            const at::Tensor& grad_rowsum, const at::Tensor& A, const at::Tensor& B,
                            at::TensorList hidden_weights, at::TensorList hidden_biases,
                            const at::Tensor& w_out, const at::Tensor& b_out, const at::Tensor& lse,
                            c10::string_view activation, c10::string_view out_activation,
                            std::optional<int64_t> pos_offset) {
  const char* op = "pair_mlp_stats_backward";
  const Checked c = check_inputs(op, A, B, hidden_weights, hidden_biases, w_out, b_out, activation,
                                 out_activation, pos_offset);
  const std::pair<const char*, const at::Tensor*> vecs[] = {{"grad_lse", &grad_lse},
                                                            {"grad_pos", &grad_pos},
                                                            {"grad_rowsum", &grad_rowsum},
                                                            {"lse", &lse}};
  for (const auto& [name, t] : vecs) {
    TORCH_CHECK_VALUE(t->defined() && t->dim() == 1 && t->size(0) == c.N, op, ": ", name,
                      " must have shape (", c.N, ",), got ",
                      t->defined() ? t->sizes() : at::IntArrayRef{});
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name, " is on ", t->device());
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), op, ": ", name, " has dtype ",
                     t->scalar_type());
  }
  const auto st = A.scalar_type();
  const at::Tensor gl = grad_lse.to(st).contiguous(), gp = grad_pos.to(st).contiguous(),
                   gr = grad_rowsum.to(st).contiguous(), ls = lse.to(st).contiguous();
  std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
             at::Tensor>
      out;
  AT_DISPATCH_FLOATING_TYPES(st, "pair_mlp_stats_backward_cpu", [&] {
    NetHolder<scalar_t> h(c, A, B, hidden_weights, hidden_biases, w_out, b_out);
    Grads<scalar_t> g =
        like_inputs(stats_backward(h.net, gl.data_ptr<scalar_t>(), gp.data_ptr<scalar_t>(),
                                   gr.data_ptr<scalar_t>(), ls.data_ptr<scalar_t>(), b_out),
                    A, B, hidden_weights, hidden_biases, w_out);
    out = {g.dA, g.dB, g.dW, g.db, g.dwout, g.dbout};
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           at::Tensor, at::Tensor>
pair_mlp_loss_cpu(const at::Tensor& A, const at::Tensor& B, at::TensorList hidden_weights,
                  at::TensorList hidden_biases, const at::Tensor& w_out, const at::Tensor& b_out,
                  c10::string_view activation, c10::string_view out_activation,
                  std::optional<int64_t> pos_offset, const at::Scalar& c_lse_arg,
                  const at::Scalar& c_pos_arg, const at::Scalar& c_rowsum_arg, bool compute_grad) {
  const Checked c = check_inputs("pair_mlp_loss", A, B, hidden_weights, hidden_biases, w_out, b_out,
                                 activation, out_activation, pos_offset);
  double c_lse = c_lse_arg.toDouble(), c_pos = c_pos_arg.toDouble(),
         c_rowsum = c_rowsum_arg.toDouble();
  if (c.pos < 0) c_pos = 0.0;  // pos is identically zero without positives
  const auto st = A.scalar_type();
  std::vector<double> row_loss(c.N);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
             at::Tensor, at::Tensor>
      out;
  AT_DISPATCH_FLOATING_TYPES(st, "pair_mlp_loss_cpu", [&] {
    NetHolder<scalar_t> h(c, A, B, hidden_weights, hidden_biases, w_out, b_out);
    if (compute_grad) {
      Grads<scalar_t> g =
          like_inputs(loss_with_grad(h.net, c_lse, c_pos, c_rowsum, row_loss.data(), b_out), A, B,
                      hidden_weights, hidden_biases, w_out);
      out = {at::Tensor(), g.dA, g.dB, g.dW, g.db, g.dwout, g.dbout};
    } else {
      std::vector<double> lse(c.N), pos(c.N), rowsum(c.N);
      stats_forward(h.net, lse.data(), pos.data(), rowsum.data());
      for (int64_t i = 0; i < c.N; ++i)
        row_loss[i] = c_lse * lse[i] + c_pos * pos[i] + c_rowsum * rowsum[i];
      auto empty = [&] { return at::empty({0}, A.options()); };
      std::vector<at::Tensor> dW, db;
      for (int64_t l = 0; l < c.L; ++l) dW.push_back(empty()), db.push_back(empty());
      out = {at::Tensor(), empty(), empty(), dW, db, empty(), empty()};
    }
  });
  double loss = 0.0;
  for (double v : row_loss) loss += v;
  std::get<0>(out) = at::scalar_tensor(loss, at::TensorOptions().dtype(st));
  return out;
}

}  // namespace factorcl_ext
