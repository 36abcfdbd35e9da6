// The CUDA backend's kernels and launchers, compiled for the CPU emulation in
// fcl_cuda_emulation.h and registered as torch.ops.factorcl_emu.* (CPU tensors), with the same
// schemas as torch.ops.factorcl.*. Built and used by tests/test_cuda_emulated.py only.
#ifndef FCL_EMULATION
#define FCL_EMULATION 1
#endif

#include <utility>

#include "../../csrc/cuda/pair_dot.cu"
#include "../../csrc/cuda/pair_mlp_bwd.cu"
#include "../../csrc/cuda/pair_mlp_fwd.cu"
#include "../../csrc/cuda/ops_cuda.cpp"
#include "../../csrc/op_schemas.h"

TORCH_LIBRARY(factorcl_emu, m) {
  factorcl_ext::define_core_ops(m);
  // 16-byte operand loads made since the last call (fcl_cuda_emulation.h), and reset
  m.def("take_vector_loads() -> int", [] { return int64_t(emu::vector_loads.exchange(0)); });
  // grid sizes of the kernel launches since the last call, and reset
  m.def("take_launch_grids() -> int[]", [] { return std::exchange(emu::launch_grids, {}); });
}

TORCH_LIBRARY_IMPL(factorcl_emu, CPU, m) {
  m.impl("pair_mlp_stats", &factorcl_ext::pair_mlp_stats_cuda);
  m.impl("pair_mlp_stats_backward", &factorcl_ext::pair_mlp_stats_backward_cuda);
  m.impl("pair_mlp_loss", &factorcl_ext::pair_mlp_loss_cuda);
  m.impl("pair_dot_stats", &factorcl_ext::pair_dot_stats_cuda);
  m.impl("pair_dot_stats_backward", &factorcl_ext::pair_dot_stats_backward_cuda);
  m.impl("pair_dot_loss", &factorcl_ext::pair_dot_loss_cuda);
}
