// Fused CPU kernels of the separable critic (DESIGN.md section 3): s = G H^T, and per row i
//   lse_i = log sum_j exp s_ij,  pos_i = s_(i, i+pos_offset),  rowsum_i = sum_j s_ij,
// column i+exclude_offset left out of lse_i and rowsum_i (but not of pos_i).
//
// Strip design: the rows are cut into strips of R rows; a worker forms one R x M strip of scores
// with a GEMM into its own buffer, reduces it to the three row statistics and, for gradients,
// turns it in place into dS and runs the two gradient GEMMs. Nothing of size N x M exists.
// The row passes over a strip (see "row kernels") are written for SIMD here, with their own exp.
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>
#include <limits>

#include "../factorcl_ext.h"

namespace factorcl_ext {
namespace {

// ---- argument checks (second line: Python raised named errors already) ----------------------

void check_pair_dot(const char* op, const at::Tensor& G, const at::Tensor& H,
                    std::optional<int64_t> pos_offset, std::optional<int64_t> exclude_offset) {
  TORCH_CHECK_VALUE(G.dim() == 2, op, ": G must be 2-D, got shape ", G.sizes());
  TORCH_CHECK_VALUE(H.dim() == 2, op, ": H must be 2-D, got shape ", H.sizes());
  TORCH_CHECK_VALUE(G.device().is_cpu() && H.device().is_cpu(), op,
                    ": the CPU kernel needs CPU tensors, got G on ", G.device(), " and H on ",
                    H.device());
  TORCH_CHECK_TYPE(G.scalar_type() == H.scalar_type(), op, ": G has dtype ", G.scalar_type(),
                   " but H has ", H.scalar_type(), ": both must have one dtype");
  TORCH_CHECK_TYPE(G.scalar_type() == at::kFloat || G.scalar_type() == at::kDouble, op,
                   ": G has dtype ", G.scalar_type(),
                   "; the CPU kernel supports float32 and float64");
  TORCH_CHECK_VALUE(G.size(1) == H.size(1), op, ": G has shape ", G.sizes(), " and H ", H.sizes(),
                    ": embedding widths must agree");
  const int64_t n = G.size(0), m = H.size(0);
  TORCH_CHECK_VALUE(n > 0 && m > 0, op, ": empty batch: G has shape ", G.sizes(), " and H ",
                    H.sizes());
  checked_offset(op, "pos_offset", pos_offset, n, m);
  checked_offset(op, "exclude_offset", exclude_offset, n, m);
  TORCH_CHECK_VALUE(!(exclude_offset && m == 1), op,
                    ": exclude_offset with a single column leaves nothing in the logsumexp");
}

void check_row_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& G) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == G.size(0), op, ": ", name, " must have shape (",
                    G.size(0), ",), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == G.scalar_type(), op, ": ", name, " has dtype ",
                   t.scalar_type(), " but G has ", G.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// ---- work plan --------------------------------------------------------------------------------

// Rows per strip and the split of strips over slots. A slot is a contiguous run of strips that one
// worker processes with one strip buffer and, for dH, one partial sum; slots are summed in slot
// order, so results depend on (N, M, D, thread count) and never on scheduling.
struct Plan {
  int64_t n, m, rows, strips, slots;

  Plan(int64_t n_, int64_t m_, int64_t elem_size) : n(n_), m(m_) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    // About 1 MiB of scores per strip: the strip stays in L2 across its element-wise passes while
    // the GEMMs still see at least 32 rows (their efficiency falls off below that).
    constexpr int64_t kStripBytes = int64_t{1} << 20;
    int64_t r = std::clamp<int64_t>(kStripBytes / (m * elem_size), 32, 512);
    // Enough strips to give every thread work.
    r = std::min(r, (n + threads - 1) / threads);
    if (r > 8) r = (r + 7) / 8 * 8;
    rows = std::clamp<int64_t>(r, 1, n);
    strips = (n + rows - 1) / rows;
    slots = std::min(strips, threads);
  }
  int64_t first_strip(int64_t slot) const { return slot * strips / slots; }
};

// Runs fn(slot, first_strip_of_slot, row0, r, S) over every strip, one slot per parallel task;
// S is the worker's [r, M] strip buffer. Every slot has at least one strip (slots <= strips).
template <typename Fn>
void for_each_strip(const Plan& plan, const at::TensorOptions& opts, Fn&& fn) {
  at::parallel_for(0, plan.slots, 1, [&](int64_t s0, int64_t s1) {
    at::Tensor buf = at::empty({plan.rows, plan.m}, opts);
    for (int64_t slot = s0; slot < s1; ++slot) {
      for (int64_t strip = plan.first_strip(slot); strip < plan.first_strip(slot + 1); ++strip) {
        const int64_t row0 = strip * plan.rows;
        const int64_t r = std::min(plan.rows, plan.n - row0);
        at::Tensor S = buf.narrow(0, 0, r);
        fn(slot, strip == plan.first_strip(slot), row0, r, S);
      }
    }
  });
}

// ---- row kernels ------------------------------------------------------------------------------
// The element-wise work on a strip is a few passes over rows of M scores. With a scalar exp they
// would cost about as much as the GEMM itself (ATen's exp goes through MKL VML, which is slow on
// some CPUs, and each ATen call is a separate pass), so they are written here on GCC/Clang vector
// types of 32 bytes, compiled twice (AVX2 and the baseline ISA, where a vector op becomes two SSE
// ops) and picked at load time. Explicit vectors rather than auto-vectorised loops: GCC threads
// the clamps of exp into branches, and a loop with branches does not vectorise.

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define FACTORCL_ROW_KERNEL __attribute__((target_clones("avx2", "default")))
#else
#define FACTORCL_ROW_KERNEL
#endif
#define FACTORCL_INLINE __attribute__((always_inline)) inline
#define FACTORCL_INLINE_LAMBDA __attribute__((always_inline))
// Vectors only cross always-inlined calls, so the ABI of passing them (what -Wpsabi warns about in
// the baseline clone) never matters.
#pragma GCC diagnostic ignored "-Wpsabi"

template <typename T>
struct ExpConst;
template <>
struct ExpConst<float> {
  using Int = int32_t;
  // Inputs are clamped to [lo, hi]: at hi the scaling below overflows to +Inf, at lo it rounds
  // to 0, so the clamp alone gives the right limits (and a NaN passes through it).
  static constexpr float hi = 89.0f, lo = -104.0f;
  static constexpr float round_magic = 12582912.0f;  // 1.5 * 2^23: x + magic rounds to an integer
  static constexpr float log2e = 1.44269504088896341f;
  // ln 2 in two parts; ln2_hi has few mantissa bits, so k * ln2_hi is exact.
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr int mantissa_bits = 23, bias = 127, degree = 7;
};
template <>
struct ExpConst<double> {
  using Int = int64_t;
  static constexpr double hi = 710.0, lo = -746.0;
  static constexpr double round_magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 0.693145751953125, ln2_lo = 1.42860682030941723212e-6;
  static constexpr int mantissa_bits = 52, bias = 1023, degree = 13;
};

// 32-byte vectors of T and of the same-width integer.
template <typename T>
struct Vec {
  static constexpr int lanes = 32 / sizeof(T);
  typedef T V __attribute__((vector_size(32)));
  typedef typename ExpConst<T>::Int I __attribute__((vector_size(32)));
};

template <typename V>
FACTORCL_INLINE V load(const void* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
FACTORCL_INLINE void store(void* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}
// The lanes summed in a fixed order: reductions are the same from run to run.
template <typename T, typename V>
FACTORCL_INLINE T lane_sum(V v) {
  T s = 0;
  for (int l = 0; l < Vec<T>::lanes; ++l) s += v[l];
  return s;
}

constexpr double inverse_factorial(int i) { return i <= 1 ? 1.0 : inverse_factorial(i - 1) / i; }

// sum_{i=I..N} r^(i-I) / i!, by Horner with compile-time coefficients.
template <typename T, int I, int N, typename V>
FACTORCL_INLINE V taylor_tail(V r) {
  if constexpr (I == N) {
    return V{} + static_cast<T>(inverse_factorial(N));
  } else {
    return taylor_tail<T, I + 1, N>(r) * r + static_cast<T>(inverse_factorial(I));
  }
}

// exp of each lane: exp(x) = 2^k exp(r), |r| <= ln2 / 2, exp(r) by its Taylor polynomial
// (degree 7 / 13: truncation below half an ulp). Within 1 eps of std::exp (subnormal results
// included), +Inf -> Inf, -Inf -> 0, NaN -> NaN. V is T itself or Vec<T>::V; IntV the matching
// integer type.
template <typename T, typename V, typename IntV>
FACTORCL_INLINE V vexp(V x) {
  using C = ExpConst<T>;
  const V hi = V{} + C::hi, lo = V{} + C::lo;
  V xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  const V t = xc * C::log2e + C::round_magic;
  const V kf = t - C::round_magic;
  const IntV k = std::bit_cast<IntV>(t) - std::bit_cast<typename C::Int>(C::round_magic);
  V r = xc - kf * C::ln2_hi;
  r = r - kf * C::ln2_lo;
  const V p = taylor_tail<T, 0, C::degree>(r);
  // 2^k in two halves: k spans [-1076, 1024], beyond the normal exponent range of one factor.
  const IntV k1 = k >> 1, k2 = k - k1;
  return p * std::bit_cast<V>((k1 + C::bias) << C::mantissa_bits) *
         std::bit_cast<V>((k2 + C::bias) << C::mantissa_bits);
}
template <typename T>
FACTORCL_INLINE T exp_scalar(T x) {
  return vexp<T, T, typename ExpConst<T>::Int>(x);
}
template <typename T>
FACTORCL_INLINE typename Vec<T>::V exp_vector(typename Vec<T>::V x) {
  return vexp<T, typename Vec<T>::V, typename Vec<T>::I>(x);
}

// The kernels, each on one contiguous segment of a row: full vectors, then a scalar tail.
//
// Their sums (rowsum, sum of exponentials) run in two levels: a vector accumulator per block of
// kSumBlock elements, added into a running vector total. Rounding error then grows with
// kSumBlock / lanes + M / kSumBlock sequential additions per lane instead of M / lanes: a float32
// rowsum over M = 16e6 columns was 1.3e-5 off the float64 value (DESIGN.md's float32 bound is
// 1e-5; torch's cascade sum, 2e-8). Same order every run.
constexpr int64_t kSumBlock = 4096;  // elements; a multiple of every Vec<T>::lanes

// The vector sum of term(j) over the full vectors of [0, n), j = 0, L, 2L, ..., in those two
// levels; leaves j at the scalar tail.
template <typename T, typename Term>
FACTORCL_INLINE typename Vec<T>::V blocked_vector_sum(int64_t n, int64_t& j, Term&& term) {
  using V = typename Vec<T>::V;
  constexpr int L = Vec<T>::lanes;
  static_assert(kSumBlock % L == 0);
  const int64_t full = n - n % L;
  V vt = V{};
  while (j < full) {
    const int64_t stop = std::min(full, j + kSumBlock);
    V vs = V{};
    for (; j < stop; j += L) vs += term(j);
    vt += vs;
  }
  return vt;
}

template <typename T>
FACTORCL_INLINE void seg_max_sum_impl(const T* x, int64_t n, T& mx, T& sum) {
  using V = typename Vec<T>::V;
  constexpr int L = Vec<T>::lanes;
  // NaN is skipped by the maximum (the compare is false) but reaches the sum of exponentials.
  V vm = V{} + mx;
  int64_t j = 0;
  const V vt = blocked_vector_sum<T>(n, j, [&](int64_t k) FACTORCL_INLINE_LAMBDA {
    const V v = load<V>(x + k);
    vm = v > vm ? v : vm;
    return v;
  });
  T m = vm[0];
  for (int l = 1; l < L; ++l) m = vm[l] > m ? vm[l] : m;
  T s = lane_sum<T>(vt);
  for (; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
    s += x[j];
  }
  mx = m;
  sum += s;
}

template <typename T, bool kStore>
FACTORCL_INLINE T seg_exp_sum_impl(T* x, int64_t n, T shift) {
  using V = typename Vec<T>::V;
  const V vshift = V{} + shift;
  int64_t j = 0;
  const V vt = blocked_vector_sum<T>(n, j, [&](int64_t k) FACTORCL_INLINE_LAMBDA {
    const V e = exp_vector<T>(load<V>(x + k) - vshift);
    if constexpr (kStore) store(x + k, e);
    return e;
  });
  T s = lane_sum<T>(vt);
  for (; j < n; ++j) {
    const T e = exp_scalar<T>(x[j] - shift);
    if constexpr (kStore) x[j] = e;
    s += e;
  }
  return s;
}

// x = a * x + b, or with kExp x = a * exp(x - shift) + b.
template <typename T, bool kExp>
FACTORCL_INLINE void seg_affine_impl(T* x, int64_t n, T shift, T a, T b) {
  using V = typename Vec<T>::V;
  constexpr int L = Vec<T>::lanes;
  const V vshift = V{} + shift, va = V{} + a, vb = V{} + b;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    V v = load<V>(x + j);
    if constexpr (kExp) v = exp_vector<T>(v - vshift);
    store(x + j, va * v + vb);
  }
  for (; j < n; ++j) {
    T v = x[j];
    if constexpr (kExp) v = exp_scalar<T>(v - shift);
    x[j] = a * v + b;
  }
}

// target_clones needs plain (non-template) functions: one set per dtype.
#define FACTORCL_DEFINE_ROW_KERNELS(T)                                          \
  FACTORCL_ROW_KERNEL void seg_max_sum(const T* x, int64_t n, T& mx, T& sum) {  \
    seg_max_sum_impl<T>(x, n, mx, sum);                                         \
  }                                                                             \
  FACTORCL_ROW_KERNEL T seg_sumexp(const T* x, int64_t n, T shift) {            \
    return seg_exp_sum_impl<T, false>(const_cast<T*>(x), n, shift);             \
  }                                                                             \
  FACTORCL_ROW_KERNEL T seg_exp_store(T* x, int64_t n, T shift) {               \
    return seg_exp_sum_impl<T, true>(x, n, shift);                              \
  }                                                                             \
  FACTORCL_ROW_KERNEL void seg_affine(T* x, int64_t n, T a, T b) {              \
    seg_affine_impl<T, false>(x, n, T(0), a, b);                                \
  }                                                                             \
  FACTORCL_ROW_KERNEL void seg_exp_affine(T* x, int64_t n, T shift, T a, T b) { \
    seg_affine_impl<T, true>(x, n, shift, a, b);                                \
  }
FACTORCL_DEFINE_ROW_KERNELS(float)
FACTORCL_DEFINE_ROW_KERNELS(double)
#undef FACTORCL_DEFINE_ROW_KERNELS

// Calls f(begin, length) on the row [0, m) minus the column `skip`, in order.
template <typename F>
inline void without_column(int64_t m, std::optional<int64_t> skip, F&& f) {
  if (!skip) {
    f(int64_t{0}, m);
    return;
  }
  if (*skip > 0) f(int64_t{0}, *skip);
  if (*skip + 1 < m) f(*skip + 1, m - *skip - 1);
}

struct Offsets {
  std::optional<int64_t> pos, exclude;
};

// Reduces row i (scores x[0..m)) to pos, rowsum and lse, and returns sumexp. With `store`, and
// when the row maximum is finite, it leaves x = exp(s - max) (the excluded entry 0), so that
// softmax = x / sumexp, and sets `stored`; a row holding +-Inf keeps its scores (exp(s) of a large
// finite score beside +Inf would overflow, where the reference's exp(s - lse) is 0).
template <typename T>
inline T reduce_row(T* x, int64_t m, int64_t i, const Offsets& off, bool store, T& lse, T& pos,
                    T& rowsum, bool& stored) {
  // pos first: it is s_(i, i+pos_offset) even where that column is the excluded one.
  if (off.pos) pos = x[i + *off.pos];
  std::optional<int64_t> skip;
  if (off.exclude) skip = i + *off.exclude;
  T mx = -std::numeric_limits<T>::infinity(), sum = 0;
  without_column(m, skip, [&](int64_t b, int64_t len) { seg_max_sum(x + b, len, mx, sum); });
  rowsum = sum;
  // torch.logsumexp's rule: an infinite row maximum is not subtracted, so a row holding +Inf gives
  // +Inf and a row of -Inf gives -Inf (s - max would be NaN in both). A NaN anywhere in the row
  // reaches the sum of exponentials whatever the maximum is.
  const T shift = std::isinf(mx) ? T(0) : mx;
  T sumexp = 0;
  stored = store && !std::isinf(mx);
  if (stored) {
    without_column(m, skip,
                   [&](int64_t b, int64_t len) { sumexp += seg_exp_store(x + b, len, shift); });
    if (skip) x[*skip] = 0;
  } else {
    without_column(m, skip,
                   [&](int64_t b, int64_t len) { sumexp += seg_sumexp(x + b, len, shift); });
  }
  lse = std::log(sumexp) + shift;
  return sumexp;
}

// dH accumulates dS^T G over strips into one partial per slot (slot 0 writes dH itself); the
// partials are added in slot order, which keeps dH bit-identical from run to run.
struct SlotPartials {
  std::vector<at::Tensor> parts;
  SlotPartials(const at::Tensor& dH, int64_t slots) : parts(slots) {
    parts[0] = dH;
    for (int64_t s = 1; s < slots; ++s) parts[s] = at::empty_like(dH);
  }
  void accumulate(int64_t slot, bool first, const at::Tensor& dS, const at::Tensor& G_strip) {
    if (first) {
      at::mm_out(parts[slot], dS.t(), G_strip);
    } else {
      parts[slot].addmm_(dS.t(), G_strip);
    }
  }
  void reduce() {
    for (size_t s = 1; s < parts.size(); ++s) parts[0].add_(parts[s]);
  }
};

}  // namespace

Stats pair_dot_stats_cpu(const at::Tensor& G_in, const at::Tensor& H_in,
                         std::optional<int64_t> pos_offset, std::optional<int64_t> exclude_offset) {
  check_pair_dot("pair_dot_stats", G_in, H_in, pos_offset, exclude_offset);
  // The internal out= ops must not see autograd, even when a caller (opcheck's schema check, a
  // C++ user) reaches this kernel with inputs that require grad. The guard alone is not enough:
  // under a Python dispatch mode (AOT tracing) the inner calls get the TLS of the outer call back,
  // so the inputs are detached too.
  const at::AutoDispatchBelowAutograd below_autograd;
  const at::Tensor G = G_in.detach().contiguous(), H = H_in.detach().contiguous();
  const int64_t n = G.size(0), m = H.size(0);
  at::Tensor lse = at::empty({n}, G.options());
  at::Tensor pos = at::zeros({n}, G.options());
  at::Tensor rowsum = at::empty({n}, G.options());
  const Plan plan(n, m, G.element_size());
  const Offsets off{pos_offset, exclude_offset};
  const at::Tensor Ht = H.t();

  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "pair_dot_stats_cpu", [&] {
    scalar_t* lse_p = lse.data_ptr<scalar_t>();
    scalar_t* pos_p = pos.data_ptr<scalar_t>();
    scalar_t* rowsum_p = rowsum.data_ptr<scalar_t>();
    for_each_strip(plan, G.options(), [&](int64_t, bool, int64_t row0, int64_t r, at::Tensor& S) {
      at::mm_out(S, G.narrow(0, row0, r), Ht);
      scalar_t* s = S.data_ptr<scalar_t>();
      for (int64_t ii = 0; ii < r; ++ii) {
        const int64_t i = row0 + ii;
        bool stored;
        reduce_row<scalar_t>(s + ii * m, m, i, off, /*store=*/false, lse_p[i], pos_p[i],
                             rowsum_p[i], stored);
      }
    });
  });
  return {lse, pos, rowsum};
}

std::tuple<at::Tensor, at::Tensor> pair_dot_stats_backward_cpu(
    const at::Tensor& grad_lse_in, const at::Tensor& grad_pos_in, const at::Tensor& grad_rowsum_in,
    const at::Tensor& G_in, const at::Tensor& H_in, const at::Tensor& lse_in,
    std::optional<int64_t> pos_offset, std::optional<int64_t> exclude_offset) {
  constexpr const char* op = "pair_dot_stats_backward";
  check_pair_dot(op, G_in, H_in, pos_offset, exclude_offset);
  check_row_vector(op, "grad_lse", grad_lse_in, G_in);
  check_row_vector(op, "grad_pos", grad_pos_in, G_in);
  check_row_vector(op, "grad_rowsum", grad_rowsum_in, G_in);
  check_row_vector(op, "lse", lse_in, G_in);
  const at::AutoDispatchBelowAutograd below_autograd;
  const at::Tensor G = G_in.detach().contiguous(), H = H_in.detach().contiguous();
  // Upstream gradients are often expanded scalars (stride 0): make them plain vectors.
  const at::Tensor g_lse = grad_lse_in.detach().contiguous(),
                   g_pos = grad_pos_in.detach().contiguous(),
                   g_rowsum = grad_rowsum_in.detach().contiguous(),
                   lse = lse_in.detach().contiguous();
  const int64_t n = G.size(0), m = H.size(0);
  const Plan plan(n, m, G.element_size());
  at::Tensor dG = at::empty_like(G);
  at::Tensor dH = at::empty_like(H);
  SlotPartials dH_parts(dH, plan.slots);
  const at::Tensor Ht = H.t();

  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "pair_dot_stats_backward_cpu", [&] {
    const scalar_t* g_lse_p = g_lse.const_data_ptr<scalar_t>();
    const scalar_t* g_pos_p = g_pos.const_data_ptr<scalar_t>();
    const scalar_t* g_rowsum_p = g_rowsum.const_data_ptr<scalar_t>();
    const scalar_t* lse_p = lse.const_data_ptr<scalar_t>();
    const auto strip = [&](int64_t slot, bool first, int64_t row0, int64_t r, at::Tensor& S) {
      const at::Tensor G_strip = G.narrow(0, row0, r);
      at::mm_out(S, G_strip, Ht);
      scalar_t* s = S.data_ptr<scalar_t>();
      for (int64_t ii = 0; ii < r; ++ii) {
        const int64_t i = row0 + ii;
        scalar_t* x = s + ii * m;
        // dS = g_lse * exp(s - lse) + g_rowsum, recomputed from the saved lse; the excluded
        // entry gets nothing from either (whatever its score), the positive gets g_pos.
        seg_exp_affine(x, m, lse_p[i], g_lse_p[i], g_rowsum_p[i]);
        if (exclude_offset) x[i + *exclude_offset] = 0;
        if (pos_offset) x[i + *pos_offset] += g_pos_p[i];
      }
      at::Tensor dG_strip = dG.narrow(0, row0, r);
      at::mm_out(dG_strip, S, H);
      dH_parts.accumulate(slot, first, S, G_strip);
    };
    for_each_strip(plan, G.options(), strip);
  });
  dH_parts.reduce();
  return {like_input(dG, G_in), like_input(dH, H_in)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_dot_loss_cpu(
    const at::Tensor& G_in, const at::Tensor& H_in, std::optional<int64_t> pos_offset,
    std::optional<int64_t> exclude_offset, const at::Scalar& c_lse_arg, const at::Scalar& c_pos_arg,
    const at::Scalar& c_rowsum_arg, bool compute_grad) {
  check_pair_dot("pair_dot_loss", G_in, H_in, pos_offset, exclude_offset);
  const double c_lse = c_lse_arg.toDouble(), c_pos = c_pos_arg.toDouble(),
               c_rowsum = c_rowsum_arg.toDouble();
  const at::AutoDispatchBelowAutograd below_autograd;
  const at::Tensor G = G_in.detach().contiguous(), H = H_in.detach().contiguous();
  const int64_t n = G.size(0), m = H.size(0);
  at::Tensor lse = at::empty({n}, G.options());
  at::Tensor pos = at::zeros({n}, G.options());
  at::Tensor rowsum = at::empty({n}, G.options());
  const Plan plan(n, m, G.element_size());
  const Offsets off{pos_offset, exclude_offset};
  at::Tensor dG, dH;
  std::optional<SlotPartials> dH_parts;
  if (compute_grad) {
    dG = at::empty_like(G);
    dH = at::empty_like(H);
    dH_parts.emplace(dH, plan.slots);
  }
  const at::Tensor Ht = H.t();

  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "pair_dot_loss_cpu", [&] {
    scalar_t* lse_p = lse.data_ptr<scalar_t>();
    scalar_t* pos_p = pos.data_ptr<scalar_t>();
    scalar_t* rowsum_p = rowsum.data_ptr<scalar_t>();
    const auto cl = static_cast<scalar_t>(c_lse), cp = static_cast<scalar_t>(c_pos),
               cr = static_cast<scalar_t>(c_rowsum);
    const auto strip = [&](int64_t slot, bool first, int64_t row0, int64_t r, at::Tensor& S) {
      const at::Tensor G_strip = G.narrow(0, row0, r);
      at::mm_out(S, G_strip, Ht);
      scalar_t* s = S.data_ptr<scalar_t>();
      for (int64_t ii = 0; ii < r; ++ii) {
        const int64_t i = row0 + ii;
        scalar_t* x = s + ii * m;
        bool stored;
        const scalar_t sumexp = reduce_row<scalar_t>(x, m, i, off, compute_grad, lse_p[i], pos_p[i],
                                                     rowsum_p[i], stored);
        if (!compute_grad) continue;
        // The loss is linear in (lse, pos, rowsum) with known coefficients, so dS is known as
        // soon as the row is reduced: c_lse * softmax + c_rowsum, the excluded entry 0, c_pos
        // on the positive. A row with an infinite maximum: softmax = exp(s - lse), the
        // reference's form (0 beside +Inf, NaN at +Inf itself, NaN in a row of -Inf).
        if (stored) {
          seg_affine(x, m, cl / sumexp, cr);
        } else {
          seg_exp_affine(x, m, lse_p[i], cl, cr);
        }
        if (exclude_offset) x[i + *exclude_offset] = 0;
        if (pos_offset) x[i + *pos_offset] += cp;
      }
      if (!compute_grad) return;
      at::Tensor dG_strip = dG.narrow(0, row0, r);
      at::mm_out(dG_strip, S, H);
      dH_parts->accumulate(slot, first, S, G_strip);
    };
    for_each_strip(plan, G.options(), strip);
  });
  // The same expression as the reference, so that e.g. 0 * Inf gives its NaN here too.
  at::Tensor loss = (lse * c_lse + pos * c_pos + rowsum * c_rowsum).sum();
  if (!compute_grad) {
    return {loss, at::empty({0}, G_in.options()), at::empty({0}, H_in.options())};
  }
  dH_parts->reduce();
  return {loss, like_input(dG, G_in), like_input(dH, H_in)};
}

}  // namespace factorcl_ext
