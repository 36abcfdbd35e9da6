// Kernel entry points shared by the op registration (ops.cpp) and the backends.
// The math and the argument contract are in DESIGN.md sections 2, 3 and 5; Python validates the
// arguments first (named ValueError / TypeError), the C++ checks are the second line.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace factorcl_ext {

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // (lse, pos, rowsum), each [N]

// A row-to-column offset (pos_offset, exclude_offset) of N rows against M columns, checked for
// every backend: -1 when absent, else the offset, which needs 0 <= offset and N + offset <= M
// (a ValueError naming it otherwise, after the op's name ``op`` where that is not empty). Written
// so that nothing overflows: offsets reach the ops as any int64, and N + (2^63 - 1) wrapped to a
// negative number that passed as "in range" (a direct torch.ops call read out of bounds).
inline int64_t checked_offset(const char* op, const char* name, std::optional<int64_t> offset,
                              int64_t n, int64_t m) {
  if (!offset.has_value()) return -1;
  TORCH_CHECK_VALUE(*offset >= 0 && *offset <= m - n, op, *op ? ": " : "", name, "=", *offset,
                    " is out of range for ", n, " rows and ", m, " columns: need 0 <= ", name,
                    " and N + ", name, " <= M");
  return *offset;
}

// A gradient laid out like its input, as the fake functions' empty_like promises (opcheck and
// torch.compile compare strides); the kernels write contiguous buffers. Every backend's backward
// returns its input gradients through this.
inline at::Tensor like_input(const at::Tensor& grad, const at::Tensor& input) {
  if (input.is_contiguous() || grad.numel() == 0) return grad;
  at::Tensor out = at::empty_like(input);
  if (out.strides() == grad.strides()) return grad;
  out.copy_(grad);
  return out;
}

// ---- concat critic core: scores s_ij = out_act(w_out . MLP(act(A_i + B_j)) + b_out) ----------
// A [N, H], B [M, H] (B already holds b_0), hidden_weights[l] [H, H], hidden_biases[l] [H],
// w_out [H], b_out [] (0-dim).
Stats pair_mlp_stats_cpu(const at::Tensor& A, const at::Tensor& B, at::TensorList hidden_weights,
                         at::TensorList hidden_biases, const at::Tensor& w_out,
                         const at::Tensor& b_out, c10::string_view activation,
                         c10::string_view out_activation, std::optional<int64_t> pos_offset);

// Recomputing backward of pair_mlp_stats. Returns (dA, dB, d_hidden_weights, d_hidden_biases,
// d_w_out, d_b_out).
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
           at::Tensor>
pair_mlp_stats_backward_cpu(const at::Tensor& grad_lse, const at::Tensor& grad_pos,
                            const at::Tensor& grad_rowsum, const at::Tensor& A, const at::Tensor& B,
                            at::TensorList hidden_weights, at::TensorList hidden_biases,
                            const at::Tensor& w_out, const at::Tensor& b_out, const at::Tensor& lse,
                            c10::string_view activation, c10::string_view out_activation,
                            std::optional<int64_t> pos_offset);

// Training fast path: loss = sum_i c_lse*lse_i + c_pos*pos_i + c_rowsum*rowsum_i (0-dim) and, when
// compute_grad, its gradients (dA, dB, d_hidden_weights, d_hidden_biases, d_w_out, d_b_out) formed
// in the same pass; when not, the gradient outputs are empty tensors of shape [0].
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           at::Tensor, at::Tensor>
pair_mlp_loss_cpu(const at::Tensor& A, const at::Tensor& B, at::TensorList hidden_weights,
                  at::TensorList hidden_biases, const at::Tensor& w_out, const at::Tensor& b_out,
                  c10::string_view activation, c10::string_view out_activation,
                  std::optional<int64_t> pos_offset, const at::Scalar& c_lse,
                  const at::Scalar& c_pos, const at::Scalar& c_rowsum, bool compute_grad);

// ---- separable critic core: s_ij = G_i . H_j (temperature and normalisation applied in Python) --
// exclude_offset: column i + exclude_offset is left out of row i's logsumexp and row sum.
Stats pair_dot_stats_cpu(const at::Tensor& G, const at::Tensor& H,
                         std::optional<int64_t> pos_offset, std::optional<int64_t> exclude_offset);

// Returns (dG, dH).
std::tuple<at::Tensor, at::Tensor> pair_dot_stats_backward_cpu(
    const at::Tensor& grad_lse, const at::Tensor& grad_pos, const at::Tensor& grad_rowsum,
    const at::Tensor& G, const at::Tensor& H, const at::Tensor& lse,
    std::optional<int64_t> pos_offset, std::optional<int64_t> exclude_offset);

// Returns (loss, dG, dH); dG and dH are empty [0] tensors when !compute_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_dot_loss_cpu(
    const at::Tensor& G, const at::Tensor& H, std::optional<int64_t> pos_offset,
    std::optional<int64_t> exclude_offset, const at::Scalar& c_lse, const at::Scalar& c_pos,
    const at::Scalar& c_rowsum, bool compute_grad);

}  // namespace factorcl_ext
