// Fused CPU kernels of the separable critic (DESIGN.md section 3): s = G H^T, and per row i
//   lse_i = log sum_j exp s_ij,  pos_i = s_(i, i+pos_offset),  rowsum_i = sum_j s_ij,
// column i+exclude_offset left out of lse_i and rowsum_i (but not of pos_i).
//
// Strip design: the rows are cut into strips of R rows; a worker forms one R x M strip of scores
// with a GEMM into its own buffer, reduces it to the three row statistics and, for gradients,
// turns it in place into dS and runs the two gradient GEMMs. Nothing of size N x M exists.
// The element-wise passes over a strip are ATen ops on the strip buffer: they are vectorised for
// the CPU found at run time (AVX2 / AVX-512 exp), which this translation unit, compiled for the
// baseline ISA, could not be.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../factorcl_ext.h"

namespace factorcl_ext {
namespace {

// ---- argument checks (second line: Python raised named errors already) ----------------------

void check_offset(const char* op, const char* name, std::optional<int64_t> offset, int64_t n,
                  int64_t m) {
  if (!offset) return;
  TORCH_CHECK_VALUE(*offset >= 0 && n + *offset <= m, op, ": ", name, "=", *offset,
                    " is out of range for ", n, " rows and ", m,
                    " columns: need 0 <= offset and N + offset <= M");
}

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
  TORCH_CHECK_VALUE(G.size(1) == H.size(1), op, ": G has shape ", G.sizes(), " and H ",
                    H.sizes(), ": embedding widths must agree");
  const int64_t n = G.size(0), m = H.size(0);
  TORCH_CHECK_VALUE(n > 0 && m > 0, op, ": empty batch: G has shape ", G.sizes(), " and H ",
                    H.sizes());
  check_offset(op, "pos_offset", pos_offset, n, m);
  check_offset(op, "exclude_offset", exclude_offset, n, m);
  TORCH_CHECK_VALUE(!(exclude_offset && m == 1), op,
                    ": exclude_offset with a single column leaves nothing in the logsumexp");
}

void check_row_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& G) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == G.size(0), op, ": ", name, " must have shape (",
                    G.size(0), ",), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == G.scalar_type(), op, ": ", name, " has dtype ",
                   t.scalar_type(), " but G has ", G.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ",
                    t.device());
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

// Runs fn(slot, row0, r, workspace_strip) over every strip, one slot per parallel task.
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

// Entry (ii, row0 + ii + offset) of every row of a strip.
template <typename scalar_t, typename F>
inline void for_each_diagonal(at::Tensor& S, int64_t row0, int64_t offset, F&& f) {
  scalar_t* s = S.data_ptr<scalar_t>();
  const int64_t r = S.size(0), m = S.size(1);
  for (int64_t ii = 0; ii < r; ++ii) f(ii, s[ii * m + row0 + ii + offset]);
}

// Reduces a strip of scores S [r, M] (rows row0..row0+r) to pos and rowsum (written to the given
// row slices) and leaves S = exp(s - shift) with the excluded entry 0, plus shift [r] and
// sumexp [r], so that lse = log(sumexp) + shift.
template <typename scalar_t>
void reduce_strip(at::Tensor& S, int64_t row0, std::optional<int64_t> pos_offset,
                  std::optional<int64_t> exclude_offset, scalar_t* pos, at::Tensor rowsum,
                  at::Tensor shift, at::Tensor sumexp) {
  // pos first: it is s_(i, i+pos_offset) even where that column is the excluded one.
  if (pos_offset) {
    for_each_diagonal<scalar_t>(S, row0, *pos_offset, [&](int64_t ii, scalar_t& x) { pos[ii] = x; });
  }
  // Excluded entries are overwritten rather than subtracted afterwards, so that an Inf or NaN
  // there leaves the row's statistics untouched, as in the reference.
  if (exclude_offset) {
    for_each_diagonal<scalar_t>(S, row0, *exclude_offset, [](int64_t, scalar_t& x) { x = 0; });
  }
  at::sum_out(rowsum, S, {1});
  if (exclude_offset) {
    for_each_diagonal<scalar_t>(S, row0, *exclude_offset, [](int64_t, scalar_t& x) {
      x = -std::numeric_limits<scalar_t>::infinity();
    });
  }
  at::amax_out(shift, S, {1});
  // torch.logsumexp's rule: an infinite row maximum is not subtracted, so a row holding +Inf gives
  // +Inf and a row of -Inf gives -Inf (s - max would be NaN in both); NaN propagates through amax.
  scalar_t* sh = shift.data_ptr<scalar_t>();
  for (int64_t ii = 0; ii < S.size(0); ++ii) {
    if (std::isinf(sh[ii])) sh[ii] = 0;
  }
  S.sub_(shift.unsqueeze(1));
  S.exp_();
  at::sum_out(sumexp, S, {1});
}

template <typename scalar_t>
void write_lse(const at::Tensor& shift, const at::Tensor& sumexp, scalar_t* lse) {
  const scalar_t* sh = shift.const_data_ptr<scalar_t>();
  const scalar_t* se = sumexp.const_data_ptr<scalar_t>();
  for (int64_t ii = 0; ii < shift.size(0); ++ii) lse[ii] = std::log(se[ii]) + sh[ii];
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

// A gradient laid out like its input (as the fake functions' empty_like promises), computed in a
// contiguous buffer.
at::Tensor like_input(const at::Tensor& grad, const at::Tensor& input) {
  if (input.is_contiguous()) return grad;
  at::Tensor out = at::empty_like(input);
  if (out.strides() == grad.strides()) return grad;
  out.copy_(grad);
  return out;
}

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
  const int64_t n = G.size(0);
  at::Tensor lse = at::empty({n}, G.options());
  at::Tensor pos = at::zeros({n}, G.options());
  at::Tensor rowsum = at::empty({n}, G.options());
  const Plan plan(n, H.size(0), G.element_size());
  const at::Tensor Ht = H.t();

  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "pair_dot_stats_cpu", [&] {
    scalar_t* lse_p = lse.data_ptr<scalar_t>();
    scalar_t* pos_p = pos.data_ptr<scalar_t>();
    for_each_strip(plan, G.options(), [&](int64_t, bool, int64_t row0, int64_t r, at::Tensor& S) {
      at::Tensor shift = at::empty({r}, G.options()), sumexp = at::empty({r}, G.options());
      at::mm_out(S, G.narrow(0, row0, r), Ht);
      reduce_strip<scalar_t>(S, row0, pos_offset, exclude_offset, pos_p + row0,
                             rowsum.narrow(0, row0, r), shift, sumexp);
      write_lse<scalar_t>(shift, sumexp, lse_p + row0);
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
  const at::AutoDispatchBelowAutograd below_autograd;
  check_row_vector(op, "grad_lse", grad_lse_in, G_in);
  check_row_vector(op, "grad_pos", grad_pos_in, G_in);
  check_row_vector(op, "grad_rowsum", grad_rowsum_in, G_in);
  check_row_vector(op, "lse", lse_in, G_in);
  const at::Tensor G = G_in.detach().contiguous(), H = H_in.detach().contiguous();
  // Upstream gradients are often expanded scalars (stride 0): make them plain vectors.
  const at::Tensor g_lse = grad_lse_in.detach().contiguous(),
                   g_pos = grad_pos_in.detach().contiguous(),
                   g_rowsum = grad_rowsum_in.detach().contiguous(), lse = lse_in.detach().contiguous();
  const int64_t n = G.size(0);
  const Plan plan(n, H.size(0), G.element_size());
  at::Tensor dG = at::empty_like(G);
  at::Tensor dH = at::empty_like(H);
  SlotPartials dH_parts(dH, plan.slots);
  const at::Tensor Ht = H.t();

  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "pair_dot_stats_backward_cpu", [&] {
    const scalar_t* g_pos_p = g_pos.const_data_ptr<scalar_t>();
    for_each_strip(plan, G.options(), [&](int64_t slot, bool first, int64_t row0, int64_t r,
                                          at::Tensor& S) {
      const at::Tensor G_strip = G.narrow(0, row0, r);
      at::mm_out(S, G_strip, Ht);
      if (exclude_offset) {
        for_each_diagonal<scalar_t>(S, row0, *exclude_offset, [](int64_t, scalar_t& x) {
          x = -std::numeric_limits<scalar_t>::infinity();
        });
      }
      // dS = g_lse * softmax + g_rowsum (+ g_pos on the positive), recomputed from the saved lse.
      S.sub_(lse.narrow(0, row0, r).unsqueeze(1));
      S.exp_();
      at::addcmul_out(S, g_rowsum.narrow(0, row0, r).unsqueeze(1), S,
                      g_lse.narrow(0, row0, r).unsqueeze(1));
      if (exclude_offset) {
        for_each_diagonal<scalar_t>(S, row0, *exclude_offset, [](int64_t, scalar_t& x) { x = 0; });
      }
      if (pos_offset) {
        for_each_diagonal<scalar_t>(S, row0, *pos_offset,
                                    [&](int64_t ii, scalar_t& x) { x += g_pos_p[row0 + ii]; });
      }
      at::Tensor dG_strip = dG.narrow(0, row0, r);
      at::mm_out(dG_strip, S, H);
      dH_parts.accumulate(slot, first, S, G_strip);
    });
  });
  dH_parts.reduce();
  return {like_input(dG, G_in), like_input(dH, H_in)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_dot_loss_cpu(
    const at::Tensor& G_in, const at::Tensor& H_in, std::optional<int64_t> pos_offset,
    std::optional<int64_t> exclude_offset, double c_lse, double c_pos, double c_rowsum,
    bool compute_grad) {
  check_pair_dot("pair_dot_loss", G_in, H_in, pos_offset, exclude_offset);
  const at::AutoDispatchBelowAutograd below_autograd;
  const at::Tensor G = G_in.detach().contiguous(), H = H_in.detach().contiguous();
  const int64_t n = G.size(0);
  at::Tensor lse = at::empty({n}, G.options());
  at::Tensor pos = at::zeros({n}, G.options());
  at::Tensor rowsum = at::empty({n}, G.options());
  const Plan plan(n, H.size(0), G.element_size());
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
    for_each_strip(plan, G.options(), [&](int64_t slot, bool first, int64_t row0, int64_t r,
                                          at::Tensor& S) {
      at::Tensor shift = at::empty({r}, G.options()), sumexp = at::empty({r}, G.options());
      const at::Tensor G_strip = G.narrow(0, row0, r);
      at::mm_out(S, G_strip, Ht);
      reduce_strip<scalar_t>(S, row0, pos_offset, exclude_offset, pos_p + row0,
                             rowsum.narrow(0, row0, r), shift, sumexp);
      write_lse<scalar_t>(shift, sumexp, lse_p + row0);
      if (!compute_grad) return;
      // The loss is linear in (lse, pos, rowsum) with known coefficients, so dS is known now:
      // c_lse * exp(s - shift) / sumexp + c_rowsum, the excluded entry 0, c_pos on the positive.
      at::Tensor scale = at::reciprocal(sumexp).mul_(c_lse);
      S.mul_(scale.unsqueeze(1));
      S.add_(c_rowsum);
      if (exclude_offset) {
        for_each_diagonal<scalar_t>(S, row0, *exclude_offset, [](int64_t, scalar_t& x) { x = 0; });
      }
      if (pos_offset) {
        const auto cp = static_cast<scalar_t>(c_pos);
        for_each_diagonal<scalar_t>(S, row0, *pos_offset, [&](int64_t, scalar_t& x) { x += cp; });
      }
      at::Tensor dG_strip = dG.narrow(0, row0, r);
      at::mm_out(dG_strip, S, H);
      dH_parts->accumulate(slot, first, S, G_strip);
    });
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
