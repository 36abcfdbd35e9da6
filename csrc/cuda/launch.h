// Host launchers of the CUDA kernels (implemented in the .cu files of this folder), called by the
// op implementations in ops_cuda.cpp. Arguments arrive checked, contiguous and on one device;
// every launcher works on the current CUDA stream.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace factorcl_ext::cuda {

// Which kernel family serves a dtype; fp32 depends on torch.get_float32_matmul_precision().
enum class ModeId { BF16, F16, TF32, F32, F64 };

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Concat critic. W: [L, H, H] stacked hidden weights, bias: [L, H] (undefined when L = 0),
// w_out [H], b_out [1]. pos_offset -1 means no positives. Stats are in the accumulation dtype
// (float32 for 16-bit inputs).
Stats mlp_forward(ModeId mode, const at::Tensor& A, const at::Tensor& B, const at::Tensor& W,
                  const at::Tensor& bias, const at::Tensor& w_out, const at::Tensor& b_out,
                  int64_t L, int act, int out_act, int64_t pos_offset);

// Returns (dA, dB, dW (L x [H, H]), dbias (L x [H]), dw_out [H], db_out [1]) in the input dtype,
// every tensor its own allocation (custom-op outputs must not alias each other).
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
           at::Tensor>
mlp_backward(ModeId mode, const at::Tensor& grad_lse, const at::Tensor& grad_pos,
             const at::Tensor& grad_rowsum, const at::Tensor& A, const at::Tensor& B,
             const at::Tensor& W, const at::Tensor& bias, const at::Tensor& w_out,
             const at::Tensor& b_out, const at::Tensor& lse, int64_t L, int act, int out_act,
             int64_t pos_offset);

// Separable critic s = G H^T. exclude_offset -1 means none.
Stats dot_forward(ModeId mode, const at::Tensor& G, const at::Tensor& H, int64_t pos_offset,
                  int64_t exclude_offset);

// Returns (dG, dH) in the input dtype.
std::tuple<at::Tensor, at::Tensor> dot_backward(ModeId mode, const at::Tensor& grad_lse,
                                                const at::Tensor& grad_pos,
                                                const at::Tensor& grad_rowsum, const at::Tensor& G,
                                                const at::Tensor& H, const at::Tensor& lse,
                                                int64_t pos_offset, int64_t exclude_offset);

}  // namespace factorcl_ext::cuda
