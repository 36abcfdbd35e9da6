// Fused CPU kernels of the concat critic (DESIGN.md section 2). Placeholder until implemented.
#include "../factorcl_ext.h"

namespace factorcl_ext {

Stats pair_mlp_stats_cpu(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                         const at::Tensor&, const at::Tensor&, c10::string_view, c10::string_view,
                         std::optional<int64_t>) {
  TORCH_CHECK(false, "pair_mlp_stats: CPU kernel not implemented yet");
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
           at::Tensor>
pair_mlp_stats_backward_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            c10::string_view, c10::string_view, std::optional<int64_t>) {
  TORCH_CHECK(false, "pair_mlp_stats_backward: CPU kernel not implemented yet");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           at::Tensor, at::Tensor>
pair_mlp_loss_cpu(const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
                  const at::Tensor&, const at::Tensor&, c10::string_view, c10::string_view,
                  std::optional<int64_t>, double, double, double, bool) {
  TORCH_CHECK(false, "pair_mlp_loss: CPU kernel not implemented yet");
}

}  // namespace factorcl_ext
