// The schemas of the six core ops (DESIGN.md section 5), written once: csrc/ops.cpp defines them
// in the `factorcl` namespace, tests/cuda_emu/emu_module.cpp in `factorcl_emu`.
//
// The loss ops' coefficients are `Scalar` rather than `float`, and the offsets `SymInt?` rather
// than `int?`: torch.compile and torch.export then pass a value computed from a symbolic batch
// size (the bounds' 1/N, a rank's rank * N) as a graph input instead of specialising the graph on
// it, so one compiled graph serves every batch size. The kernels still take `int64_t` offsets
// (the dispatcher hands them the concrete value).
#pragma once

#include <torch/library.h>

namespace factorcl_ext {

inline void define_core_ops(torch::Library& m) {
  m.def(
      "pair_mlp_stats(Tensor A, Tensor B, Tensor[] hidden_weights, Tensor[] hidden_biases, "
      "Tensor w_out, Tensor b_out, str activation, str out_activation, SymInt? pos_offset) "
      "-> (Tensor lse, Tensor pos, Tensor rowsum)");
  m.def(
      "pair_mlp_stats_backward(Tensor grad_lse, Tensor grad_pos, Tensor grad_rowsum, Tensor A, "
      "Tensor B, Tensor[] hidden_weights, Tensor[] hidden_biases, Tensor w_out, Tensor b_out, "
      "Tensor lse, str activation, str out_activation, SymInt? pos_offset) "
      "-> (Tensor, Tensor, Tensor[], Tensor[], Tensor, Tensor)");
  m.def(
      "pair_mlp_loss(Tensor A, Tensor B, Tensor[] hidden_weights, Tensor[] hidden_biases, "
      "Tensor w_out, Tensor b_out, str activation, str out_activation, SymInt? pos_offset, "
      "Scalar c_lse, Scalar c_pos, Scalar c_rowsum, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor[], Tensor[], Tensor, Tensor)");
  m.def(
      "pair_dot_stats(Tensor G, Tensor H, SymInt? pos_offset, SymInt? exclude_offset) "
      "-> (Tensor lse, Tensor pos, Tensor rowsum)");
  m.def(
      "pair_dot_stats_backward(Tensor grad_lse, Tensor grad_pos, Tensor grad_rowsum, Tensor G, "
      "Tensor H, Tensor lse, SymInt? pos_offset, SymInt? exclude_offset) -> (Tensor, Tensor)");
  m.def(
      "pair_dot_loss(Tensor G, Tensor H, SymInt? pos_offset, SymInt? exclude_offset, Scalar c_lse, "
      "Scalar c_pos, Scalar c_rowsum, bool compute_grad) -> (Tensor, Tensor, Tensor)");
}

}  // namespace factorcl_ext
