#!/usr/bin/env bash
# The GPU machine's software stack, checked on a machine without a GPU.
#
#   benchmarks/device_stack_check.sh [VENV] [--quick]
#
# The lent GPU machine runs torch 2.11.0+cu130 and triton 3.6.0 (device tool, KINDS.md), older
# than the torch 2.14 / triton 3.8 of requirements.txt that CI uses. Both install here from the
# package index, so this script builds the committed HEAD against them in its own virtual
# environment (VENV, default /tmp/factorcl-device-stack; about 6 GB) and runs what needs no GPU:
#   1. the build (CUDA kernels for sm_90 included) and build_info();
#   2. the sm_90 compile check of the Triton kernels (wgmma, spills, relaxed atomics);
#   3. tests/test_triton_host_path.py: the Triton ops' GPU host path on fake CUDA tensors, and
#      tests/test_nn.py and test_factorcl_train.py on the CPU backends (torch.compile / export
#      tracing and the trainer differ between torch versions: session 17 found one this way);
#   4. (not with --quick) the Triton suites under the interpreter, with numpy < 2.3: triton 3.6's
#      interpreter calls int() on one-element arrays, which numpy 2.4 refuses.
# Session 14 found two torch 2.11 incompatibilities this way (benchmarks/README.md).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="/tmp/factorcl-device-stack"
quick=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    *) venv="$arg" ;;
  esac
done
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==2.11.0" "triton==3.6.0" "numpy<2.3" ninja pybind11 pytest \
    pytest-benchmark scikit-learn matplotlib tqdm
fi
py="$venv/bin/python"
"$py" -c 'import torch, triton, numpy; print("torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)'

work="$(mktemp -d /tmp/factorcl-device-stack-src.XXXXXX)"
trap 'rm -rf "$work"' EXIT
git -C "$root" archive HEAD | tar -x -C "$work"
cd "$work"
echo "=== build (HEAD $(git -C "$root" rev-parse --short HEAD))"
MAX_JOBS="${MAX_JOBS:-2}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  "$py" setup.py build_ext --inplace >build.log 2>&1 || { tail -40 build.log; exit 1; }
export PYTHONPATH="$work:$work/python"
"$py" -c 'import factorcl_ext, json; print(json.dumps(factorcl_ext.build_info()))'
echo "=== sm_90 compile check of the Triton kernels"
"$py" benchmarks/triton_compile_check.py --arch 90 --dtypes bf16 --layers 1 | tail -20
echo "=== Triton GPU host path on fake CUDA tensors"
"$py" -m pytest -q -p no:cacheprovider tests/test_triton_host_path.py
echo "=== the modules under torch.compile / torch.export and the trainer, CPU backends"
"$py" -m pytest -q -p no:cacheprovider tests/test_nn.py tests/test_factorcl_train.py
if [ "$quick" = 0 ]; then
  echo "=== Triton suites under the interpreter"
  TRITON_INTERPRET=1 "$py" -m pytest -q -p no:cacheprovider tests/test_triton.py
  TRITON_INTERPRET=1 FACTORCL_TEST_BACKENDS=triton "$py" -m pytest -q -p no:cacheprovider \
    tests/test_concat_critic.py tests/test_separable_critic.py tests/test_nn.py \
    tests/test_random_configurations.py -k "not large"
fi
