#!/usr/bin/env bash
# The fused CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer:
#
#   tests/run_cpu_sanitizers.sh [PYTEST ARGS...]
#
# Copies this checkout's tracked files (as they are in the working tree) to a temporary
# directory, builds the CPU extension there (FACTORCL_EXT_CUDA=0) with
# -fsanitize=address,undefined, and runs against it the CPU backend's op, module and
# random-configuration suites and the CUDA kernels' CPU emulation (tests/test_cuda_emulated.py,
# which builds its module with the same sanitizers here: out-of-bounds global and shared memory
# accesses of the CUDA code, memcheck's job, without a GPU). PYTEST ARGS, if given, replace that
# selection. The sanitizer runtime is preloaded into the uninstrumented Python. Out-of-bounds or
# use-after-free accesses (a vector loop reading past a row, a tile past shared memory) and
# undefined behaviour (signed overflow, bad shifts, misaligned loads) stop the run with the
# report on stderr and a non-zero exit status, as does any failing test. Leak detection is off
# (Python's own allocations would fill it). About 10 minutes on 2 cores (the CUDA emulation 6 of
# them). Needs gcc with libasan.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"

asan="$(gcc -print-file-name=libasan.so)"
ubsan="$(gcc -print-file-name=libubsan.so)"
if [ ! -e "$asan" ] || [ ! -e "$ubsan" ]; then
  echo "gcc's libasan.so / libubsan.so not found: cannot build with the sanitizers" >&2
  exit 2
fi

work="$(mktemp -d /tmp/factorcl-sanitize.XXXXXX)"
trap 'rm -rf "$work"' EXIT
git -C "$root" ls-files -z | (cd "$root" && tar --null -T - -cf -) | tar -x -C "$work"
cd "$work"

echo "=== build with -fsanitize=address,undefined ($work)"
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g"
if ! FACTORCL_EXT_CUDA=0 CFLAGS="$flags" LDFLAGS="-fsanitize=address,undefined" \
    MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py build_ext --inplace >build.log 2>&1; then
  tail -40 build.log
  exit 1
fi
# ldd's output is read whole before it is searched: `ldd ... | grep -q` under pipefail fails when
# grep exits at its first match while ldd is still writing (SIGPIPE), now and then.
deps="$(ldd factorcl_ext/_C*.so)"
if ! grep -q libasan <<<"$deps"; then
  echo "the extension was built without the sanitizers (build.log):" >&2
  tail -20 build.log >&2
  exit 1
fi

if [ $# -eq 0 ]; then
  set -- tests/test_concat_critic.py tests/test_separable_critic.py \
    tests/test_random_configurations.py tests/test_nn.py tests/test_cuda_emulated.py
fi
echo "=== pytest $* (backend cpu) under the sanitizers"
# --capture=sys: pytest captures Python's streams only, so that a sanitizer's report, written to
# file descriptor 2 by native code, is printed even when the sanitizer aborts the process.
LD_PRELOAD="$asan:$ubsan${LD_PRELOAD:+:$LD_PRELOAD}" \
  ASAN_OPTIONS="detect_leaks=0:halt_on_error=1" \
  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
  PYTHONPATH="$work:$work/python" FACTORCL_TEST_BACKENDS=cpu FACTORCL_UNDER_SANITIZERS=1 \
  "$PY" -m pytest -q -p no:cacheprovider --capture=sys -x "$@"
echo "=== no sanitizer report, no test failure"
