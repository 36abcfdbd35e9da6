// Fused CPU kernels of the separable critic (DESIGN.md section 3). Placeholder until implemented.
#include "../factorcl_ext.h"

namespace factorcl_ext {

Stats pair_dot_stats_cpu(const at::Tensor&, const at::Tensor&, std::optional<int64_t>,
                         std::optional<int64_t>) {
  TORCH_CHECK(false, "pair_dot_stats: CPU kernel not implemented yet");
}

std::tuple<at::Tensor, at::Tensor> pair_dot_stats_backward_cpu(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, std::optional<int64_t>, std::optional<int64_t>) {
  TORCH_CHECK(false, "pair_dot_stats_backward: CPU kernel not implemented yet");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_dot_loss_cpu(
    const at::Tensor&, const at::Tensor&, std::optional<int64_t>, std::optional<int64_t>, double,
    double, double, bool) {
  TORCH_CHECK(false, "pair_dot_loss: CPU kernel not implemented yet");
}

}  // namespace factorcl_ext
