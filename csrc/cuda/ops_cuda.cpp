// CUDA implementations of the factorcl core ops (schemas in ../ops.cpp): argument checks (the
// second line behind the Python validation), layout preparation, kernel-family choice, and the
// fused losses built from the stats kernels. The kernels themselves are in the .cu files here.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>
#ifndef FCL_EMULATION
#include <c10/cuda/CUDAGuard.h>
// The inputs' device for the launches; a tensor elsewhere (the dispatcher picks these kernels when
// any argument is on CUDA) is left to the argument checks, which name it.
#define FCL_DEVICE_GUARD(t)                    \
  c10::cuda::OptionalCUDAGuard device_guard{}; \
  if ((t).is_cuda()) device_guard.set_device((t).device())
#else
#define FCL_DEVICE_GUARD(t) (void)(t)
#endif

#include <climits>
#include <string>
#include <vector>

#include "../factorcl_ext.h"
#include "launch.h"

namespace factorcl_ext {
namespace {

using cuda::ModeId;

std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

// fp32 follows torch's CUDA matmul precision, as cuBLAS does for torch.matmul: TF32 tensor cores
// when it is "tf32" (torch.set_float32_matmul_precision("high" or "medium"), or the newer
// torch.backends.cuda.matmul.fp32_precision = "tf32"), IEEE SIMT kernels otherwise. Read per
// backend: the legacy float32MatmulPrecision() throws once the newer API has been used.
ModeId mode_for(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16:
      return ModeId::BF16;
    case at::kHalf:
      return ModeId::F16;
    case at::kFloat:
      return at::globalContext().float32Precision(
                 at::Float32Backend::CUDA, at::Float32Op::MATMUL) == at::Float32Precision::TF32
                 ? ModeId::TF32
                 : ModeId::F32;
    case at::kDouble:
      return ModeId::F64;
    default:
      TORCH_CHECK_TYPE(false,
                       "factorcl CUDA kernels support float64, float32, bfloat16 and "
                       "float16, got ",
                       t);
  }
}

// Separable critics narrower than this run float32 inputs on the SIMT kernel (see prepare_dot).
constexpr int64_t kTf32MinFeatures = 8;

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int parse_act(c10::string_view s) {
  if (s == "relu") return 0;
  if (s == "tanh") return 1;
  TORCH_CHECK_VALUE(false, "activation must be 'relu' or 'tanh', got '", std::string(s), "'");
}

int parse_out_act(c10::string_view s) {
  if (s == "none") return 0;
  if (s == "softplus") return 1;
  TORCH_CHECK_VALUE(false, "out_activation must be 'none' or 'softplus', got '", std::string(s),
                    "'");
}

void check_like(const char* name, const at::Tensor& t, const at::Tensor& ref,
                const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(),
                   " but ", ref_name, " has ", ref.scalar_type());
}

void check_rows_cols(const char* rn, const at::Tensor& rows, const char* cn,
                     const at::Tensor& cols) {
  TORCH_CHECK_VALUE(rows.dim() == 2, rn, " must have 2 dimensions, got shape ", shape_str(rows));
  TORCH_CHECK_VALUE(cols.dim() == 2, cn, " must have 2 dimensions, got shape ", shape_str(cols));
  TORCH_CHECK_VALUE(rows.size(0) > 0 && cols.size(0) > 0, "empty batch: ", rn, " has shape ",
                    shape_str(rows), " and ", cn, " has shape ", shape_str(cols));
  TORCH_CHECK_VALUE(rows.size(1) == cols.size(1), rn, " has shape ", shape_str(rows), " and ", cn,
                    " ", shape_str(cols), ": widths must agree");
#ifndef FCL_EMULATION
  TORCH_CHECK_VALUE(rows.is_cuda(), rn, " must be a CUDA tensor for the CUDA kernels");
#endif
  check_like(cn, cols, rows, rn);
  mode_for(rows.scalar_type());
  // Index arithmetic inside a chunk is 32-bit; keep widths and batch sizes far from the limit.
  TORCH_CHECK_VALUE(rows.size(1) < (int64_t(1) << 22) && rows.size(0) < (int64_t(1) << 40) &&
                        cols.size(0) < (int64_t(1) << 40),
                    "shapes ", shape_str(rows), " and ", shape_str(cols),
                    " are too large for the CUDA kernels");
}

// Everything the concat-critic kernels need, contiguous, with the hidden layers stacked.
struct MlpInputs {
  at::Tensor A, B, W, bias, w_out, b_out;
  int64_t L = 0;
  int act = 0, out_act = 0;
  int64_t pos = -1;
  ModeId mode = ModeId::F32;
};

MlpInputs prepare_mlp(const at::Tensor& A, const at::Tensor& B, at::TensorList hidden_weights,
                      at::TensorList hidden_biases, const at::Tensor& w_out,
                      const at::Tensor& b_out, c10::string_view activation,
                      c10::string_view out_activation, std::optional<int64_t> pos_offset) {
  check_rows_cols("A", A, "B", B);
  const int64_t H = A.size(1);
  TORCH_CHECK_VALUE(H >= 1, "hidden width H must be at least 1, got A of shape ", shape_str(A));
  TORCH_CHECK_VALUE(hidden_weights.size() == hidden_biases.size(), "hidden_weights has ",
                    hidden_weights.size(), " layers but hidden_biases has ", hidden_biases.size());
  for (size_t l = 0; l < hidden_weights.size(); ++l) {
    const auto& w = hidden_weights[l];
    const auto& b = hidden_biases[l];
    TORCH_CHECK_VALUE(
        w.dim() == 2 && w.size(0) == H && w.size(1) == H && b.dim() == 1 && b.size(0) == H,
        "hidden layer ", l, ": expected weight (", H, ", ", H, ") and bias (", H, ",), got ",
        shape_str(w), " and ", shape_str(b));
    check_like("hidden_weights", w, A, "A");
    check_like("hidden_biases", b, A, "A");
  }
  TORCH_CHECK_VALUE(w_out.dim() == 1 && w_out.size(0) == H, "w_out must have shape (", H,
                    ",), got ", shape_str(w_out));
  TORCH_CHECK_VALUE(b_out.numel() == 1 && b_out.dim() <= 1,
                    "b_out must be a scalar (shape () or (1,)), got ", shape_str(b_out));
  check_like("w_out", w_out, A, "A");
  check_like("b_out", b_out, A, "A");

  MlpInputs in;
  in.mode = mode_for(A.scalar_type());
  in.act = parse_act(activation);
  in.out_act = parse_out_act(out_activation);
  in.pos = checked_offset("", "pos_offset", pos_offset, A.size(0), B.size(0));
  in.L = int64_t(hidden_weights.size());
  // Detached: nothing computed here may join an autograd graph, even when a caller reaches the
  // kernel directly with inputs that require grad.
  in.A = A.detach().contiguous();
  in.B = B.detach().contiguous();
  if (in.L > 0) {
    std::vector<at::Tensor> ws, bs;
    for (size_t l = 0; l < hidden_weights.size(); ++l) {
      ws.push_back(hidden_weights[l].detach());
      bs.push_back(hidden_biases[l].detach());
    }
    in.W = at::stack(ws).contiguous();     // [L, H, H]
    in.bias = at::stack(bs).contiguous();  // [L, H]
  }
  in.w_out = w_out.detach().contiguous();
  in.b_out = b_out.detach().reshape({1}).contiguous();
  return in;
}

at::Tensor row_grad(const at::Tensor& g, int64_t n, at::ScalarType acc, const char* name) {
  TORCH_CHECK_VALUE(g.dim() == 1 && g.size(0) == n, name, " must have shape (", n, ",), got ",
                    shape_str(g));
  TORCH_CHECK_TYPE(at::isFloatingType(g.scalar_type()), name, " must be floating point, got dtype ",
                   g.scalar_type());
  return g.to(acc).contiguous();
}

cuda::Stats pair_mlp_stats_cuda(const at::Tensor& A, const at::Tensor& B,
                                at::TensorList hidden_weights, at::TensorList hidden_biases,
                                const at::Tensor& w_out, const at::Tensor& b_out,
                                c10::string_view activation, c10::string_view out_activation,
                                std::optional<int64_t> pos_offset) {
  FCL_DEVICE_GUARD(A);
  const MlpInputs in = prepare_mlp(A, B, hidden_weights, hidden_biases, w_out, b_out, activation,
                                   out_activation, pos_offset);
  return cuda::mlp_forward(in.mode, in.A, in.B, in.W, in.bias, in.w_out, in.b_out, in.L, in.act,
                           in.out_act, in.pos);
}

using MlpGrads = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>,
                            std::vector<at::Tensor>, at::Tensor, at::Tensor>;

MlpGrads mlp_grads(const MlpInputs& in, const at::Tensor& g_lse, const at::Tensor& g_pos,
                   const at::Tensor& g_rowsum, const at::Tensor& lse, const at::Tensor& A,
                   const at::Tensor& B, at::TensorList hidden_weights, at::TensorList hidden_biases,
                   const at::Tensor& w_out, const at::Tensor& b_out) {
  auto [dA, dB, dW, db, dwo, dbo] =
      cuda::mlp_backward(in.mode, g_lse, g_pos, g_rowsum, in.A, in.B, in.W, in.bias, in.w_out,
                         in.b_out, lse, in.L, in.act, in.out_act, in.pos);
  for (size_t l = 0; l < dW.size(); ++l) {
    dW[l] = like_input(dW[l], hidden_weights[l]);
    db[l] = like_input(db[l], hidden_biases[l]);
  }
  return {like_input(dA, A),      like_input(dB, B),         dW, db,
          like_input(dwo, w_out), dbo.reshape(b_out.sizes())};
}

MlpGrads pair_mlp_stats_backward_cuda(const at::Tensor& grad_lse, const at::Tensor& grad_pos,
                                      const at::Tensor& grad_rowsum, const at::Tensor& A,
                                      const at::Tensor& B, at::TensorList hidden_weights,
                                      at::TensorList hidden_biases, const at::Tensor& w_out,
                                      const at::Tensor& b_out, const at::Tensor& lse,
                                      c10::string_view activation, c10::string_view out_activation,
                                      std::optional<int64_t> pos_offset) {
  FCL_DEVICE_GUARD(A);
  const MlpInputs in = prepare_mlp(A, B, hidden_weights, hidden_biases, w_out, b_out, activation,
                                   out_activation, pos_offset);
  const int64_t N = A.size(0);
  const auto acc = acc_type(A.scalar_type());
  for (const auto* t : {&grad_lse, &grad_pos, &grad_rowsum, &lse})
    TORCH_CHECK_VALUE(t->device() == A.device(), "gradients and lse must be on ", A.device());
  return mlp_grads(in, row_grad(grad_lse, N, acc, "grad_lse"),
                   row_grad(grad_pos, N, acc, "grad_pos"),
                   row_grad(grad_rowsum, N, acc, "grad_rowsum"), row_grad(lse, N, acc, "lse"), A, B,
                   hidden_weights, hidden_biases, w_out, b_out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           at::Tensor, at::Tensor>
pair_mlp_loss_cuda(const at::Tensor& A, const at::Tensor& B, at::TensorList hidden_weights,
                   at::TensorList hidden_biases, const at::Tensor& w_out, const at::Tensor& b_out,
                   c10::string_view activation, c10::string_view out_activation,
                   std::optional<int64_t> pos_offset, const at::Scalar& c_lse_arg,
                   const at::Scalar& c_pos_arg, const at::Scalar& c_rowsum_arg, bool compute_grad) {
  FCL_DEVICE_GUARD(A);
  const double c_lse = c_lse_arg.toDouble(), c_pos = c_pos_arg.toDouble(),
               c_rowsum = c_rowsum_arg.toDouble();
  const MlpInputs in = prepare_mlp(A, B, hidden_weights, hidden_biases, w_out, b_out, activation,
                                   out_activation, pos_offset);
  auto [lse, pos, rowsum] = cuda::mlp_forward(in.mode, in.A, in.B, in.W, in.bias, in.w_out,
                                              in.b_out, in.L, in.act, in.out_act, in.pos);
  at::Tensor loss = (lse * c_lse + pos * c_pos + rowsum * c_rowsum).sum();
  if (!compute_grad) {
    std::vector<at::Tensor> dW, db;
    for (int64_t l = 0; l < in.L; ++l) {
      dW.push_back(A.new_empty({0}));
      db.push_back(A.new_empty({0}));
    }
    return {loss, A.new_empty({0}),     B.new_empty({0}),    dW,
            db,   w_out.new_empty({0}), b_out.new_empty({0})};
  }
  // The loss is linear in (lse, pos, rowsum) with constant coefficients: its gradient is the
  // stats backward with constant upstream gradients (a second, recomputing pass on the GPU).
  const int64_t N = A.size(0);
  const auto opts = lse.options();
  auto [dA, dB, dW, db, dwo, dbo] = mlp_grads(
      in, at::full({N}, c_lse, opts), at::full({N}, c_pos, opts), at::full({N}, c_rowsum, opts),
      lse, A, B, hidden_weights, hidden_biases, w_out, b_out);
  return {loss, dA, dB, dW, db, dwo, dbo};
}

struct DotInputs {
  at::Tensor G, H;
  int64_t pos = -1, excl = -1;
  ModeId mode = ModeId::F32;
};

DotInputs prepare_dot(const at::Tensor& G, const at::Tensor& H, std::optional<int64_t> pos_offset,
                      std::optional<int64_t> exclude_offset) {
  check_rows_cols("g", G, "h", H);
  DotInputs in;
  in.mode = mode_for(G.scalar_type());
  // Scores with fewer features than one TF32 MMA step (k = 8) take the IEEE SIMT kernel: the
  // tensor cores would pad most of each step with zeros. At D = 1 on an H100, cuBLAS (the
  // reference's GEMM) kept the product in float32 (dG 7.6e-7 off) while the TF32 rounding of the
  // inputs, with no sum over features to average it and amplified by the exponential, put the
  // kernel's dG 1.1e-2 off.
  if (in.mode == ModeId::TF32 && G.size(1) < kTf32MinFeatures) in.mode = ModeId::F32;
  in.pos = checked_offset("", "pos_offset", pos_offset, G.size(0), H.size(0));
  in.excl = checked_offset("", "exclude_offset", exclude_offset, G.size(0), H.size(0));
  TORCH_CHECK_VALUE(!(H.size(0) == 1 && in.excl >= 0),
                    "exclude_offset with a single column leaves nothing in the logsumexp");
  in.G = G.detach().contiguous();
  in.H = H.detach().contiguous();
  return in;
}

cuda::Stats pair_dot_stats_cuda(const at::Tensor& G, const at::Tensor& H,
                                std::optional<int64_t> pos_offset,
                                std::optional<int64_t> exclude_offset) {
  FCL_DEVICE_GUARD(G);
  const DotInputs in = prepare_dot(G, H, pos_offset, exclude_offset);
  return cuda::dot_forward(in.mode, in.G, in.H, in.pos, in.excl);
}

std::tuple<at::Tensor, at::Tensor> pair_dot_stats_backward_cuda(
    const at::Tensor& grad_lse, const at::Tensor& grad_pos, const at::Tensor& grad_rowsum,
    const at::Tensor& G, const at::Tensor& H, const at::Tensor& lse,
    std::optional<int64_t> pos_offset, std::optional<int64_t> exclude_offset) {
  FCL_DEVICE_GUARD(G);
  const DotInputs in = prepare_dot(G, H, pos_offset, exclude_offset);
  const int64_t N = G.size(0);
  const auto acc = acc_type(G.scalar_type());
  for (const auto* t : {&grad_lse, &grad_pos, &grad_rowsum, &lse})
    TORCH_CHECK_VALUE(t->device() == G.device(), "gradients and lse must be on ", G.device());
  auto [dG, dH] = cuda::dot_backward(in.mode, row_grad(grad_lse, N, acc, "grad_lse"),
                                     row_grad(grad_pos, N, acc, "grad_pos"),
                                     row_grad(grad_rowsum, N, acc, "grad_rowsum"), in.G, in.H,
                                     row_grad(lse, N, acc, "lse"), in.pos, in.excl);
  return {like_input(dG, G), like_input(dH, H)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_dot_loss_cuda(
    const at::Tensor& G, const at::Tensor& H, std::optional<int64_t> pos_offset,
    std::optional<int64_t> exclude_offset, const at::Scalar& c_lse_arg, const at::Scalar& c_pos_arg,
    const at::Scalar& c_rowsum_arg, bool compute_grad) {
  FCL_DEVICE_GUARD(G);
  const double c_lse = c_lse_arg.toDouble(), c_pos = c_pos_arg.toDouble(),
               c_rowsum = c_rowsum_arg.toDouble();
  const DotInputs in = prepare_dot(G, H, pos_offset, exclude_offset);
  auto [lse, pos, rowsum] = cuda::dot_forward(in.mode, in.G, in.H, in.pos, in.excl);
  at::Tensor loss = (lse * c_lse + pos * c_pos + rowsum * c_rowsum).sum();
  if (!compute_grad) return {loss, G.new_empty({0}), H.new_empty({0})};
  const int64_t N = G.size(0);
  const auto opts = lse.options();
  auto [dG, dH] =
      cuda::dot_backward(in.mode, at::full({N}, c_lse, opts), at::full({N}, c_pos, opts),
                         at::full({N}, c_rowsum, opts), in.G, in.H, lse, in.pos, in.excl);
  return {loss, like_input(dG, G), like_input(dH, H)};
}

}  // namespace

#ifndef FCL_EMULATION
TORCH_LIBRARY_IMPL(factorcl, CUDA, m) {
  m.impl("pair_mlp_stats", &pair_mlp_stats_cuda);
  m.impl("pair_mlp_stats_backward", &pair_mlp_stats_backward_cuda);
  m.impl("pair_mlp_loss", &pair_mlp_loss_cuda);
  m.impl("pair_dot_stats", &pair_dot_stats_cuda);
  m.impl("pair_dot_stats_backward", &pair_dot_stats_backward_cuda);
  m.impl("pair_dot_loss", &pair_dot_loss_cuda);
}
#endif

}  // namespace factorcl_ext
