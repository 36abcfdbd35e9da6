// The ops' TORCH_LIBRARY block (schemas in op_schemas.h) and the CPU implementations; the CUDA
// implementations are registered from csrc/cuda/. Importing factorcl_ext._C loads this library
// and so registers them.
#ifndef FACTORCL_EXT_NO_PYTHON  // set by the CMake build: a plain C++ library, no Python module
#include <Python.h>
#endif
#include <torch/library.h>

#include "factorcl_ext.h"
#include "op_schemas.h"

#ifndef FACTORCL_EXT_CUDA_ARCHS
#define FACTORCL_EXT_CUDA_ARCHS ""
#endif

namespace factorcl_ext {

TORCH_LIBRARY(factorcl, m) { define_core_ops(m); }

TORCH_LIBRARY_IMPL(factorcl, CPU, m) {
  m.impl("pair_mlp_stats", &pair_mlp_stats_cpu);
  m.impl("pair_mlp_stats_backward", &pair_mlp_stats_backward_cpu);
  m.impl("pair_mlp_loss", &pair_mlp_loss_cpu);
  m.impl("pair_dot_stats", &pair_dot_stats_cpu);
  m.impl("pair_dot_stats_backward", &pair_dot_stats_backward_cpu);
  m.impl("pair_dot_loss", &pair_dot_loss_cpu);
}

}  // namespace factorcl_ext

#ifndef FACTORCL_EXT_NO_PYTHON
// A plain Python module so that `import factorcl_ext._C` loads the library above. It carries the
// build facts that factorcl_ext.build_info() reports.
static PyModuleDef factorcl_ext_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&factorcl_ext_module);
  if (mod == nullptr) return nullptr;
#ifdef FACTORCL_EXT_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(mod, "cuda_archs", FACTORCL_EXT_CUDA_ARCHS);
#ifdef _OPENMP
  PyModule_AddIntConstant(mod, "with_openmp", 1);
#else
  PyModule_AddIntConstant(mod, "with_openmp", 0);
#endif
  return mod;
}
#endif  // FACTORCL_EXT_NO_PYTHON
