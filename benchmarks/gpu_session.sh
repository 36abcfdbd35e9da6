#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one command that fits a short lease:
#
#   benchmarks/gpu_session.sh OUTDIR STAGE...
#
# Stages (run in the order given; a failing stage is logged and the next one still runs):
#   build      pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST defaults to
#              the GPU's own arch, MAX_JOBS to the core count), then build_info()
#   cuda       pytest tests/test_cuda.py (the CUDA backend against float64 references)
#   triton     pytest tests/test_triton.py on the GPU (bf16/fp16, TF32, determinism included)
#   triton-k-* the same for the tests that pytest's -k expression after 'triton-k-' selects, e.g.
#              'triton-k-dot or fp16' (one argument: the expression is not split)
#   tiles      the tests that force every Triton tile configuration of each family in turn
#              (FACTORCL_TEST_EVERY_TILE=1; one compile per case: minutes)
#   suites     the shared op and module suites with backends cuda,triton on CUDA tensors
#   suites-k-* the same for the tests that the -k expression after 'suites-k-' selects
#   trainer    the GPU tests of the FactorCL trainer, step benchmark and mi-bench (-m gpu)
#   sanitize   tests/run_compute_sanitizer.sh (memcheck, racecheck, synccheck)
#   bench-*    benchmarks/gpu_bench.py with the arguments after the dash, e.g. bench---quick
#   targets    gpu_bench.py --check-targets over the bench stages' JSON files so far (seconds)
#   ablation-* benchmarks/triton_bwd_ablation.py with the arguments after the dash, e.g.
#              'ablation---configs 0' (each config x variant compiles: ~10-20 s apiece)
#   ncu-*      Nsight Compute on benchmarks/profile_kernels.py (arguments after the dash): one
#              forward + backward per critic and backend, this package's kernels only, with the
#              speed-of-light, occupancy, warp-state, scheduler, compute and memory sections
#              (hardware counters: Firecracker machines only, see the device tool's KINDS.md);
#              e.g. 'ncu---n 1024 --sep-n 8192'. NCU overrides where ncu is found.
#
# Output: the device tool brings back at most 8 files from $OUT, so the logs (<stage>.log, pytest's
# <stage>.xml, gpu_bench's JSON, device.txt, build_info.json) are written to a work folder
# outside OUTDIR (FACTORCL_SESSION_WORK, default a new /tmp folder) and, after every stage, packed
# into OUTDIR/session.tgz beside OUTDIR/summary.txt (the summary table so far): two files, complete
# up to the last finished stage even when the call is killed. Unpack with
# `tar -xzf session.tgz -C DIR`.
#
# Time: the whole script keeps within FACTORCL_SESSION_BUDGET seconds (default 540, for a device
# call of at most 600): each stage's limit is its own (FACTORCL_STAGE_TIMEOUT, default 300; the
# build's FACTORCL_BUILD_TIMEOUT, default 300) cut to what is left of the budget, and a stage
# with less than 30 s left is skipped and said so. Give the stages in order of importance.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${1:?usage: benchmarks/gpu_session.sh OUTDIR STAGE...}"
shift
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="${FACTORCL_SESSION_WORK:-$(mktemp -d /tmp/factorcl-session.XXXXXX)}"
mkdir -p "$work"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
limit="${FACTORCL_STAGE_TIMEOUT:-300}"
deadline=$((SECONDS + ${FACTORCL_SESSION_BUDGET:-540}))
summary=()

pack() {  # OUTDIR/summary.txt and OUTDIR/session.tgz, each replaced whole
  printf '%s\n' "${summary[@]}" >"$out/summary.txt.tmp" && mv -f "$out/summary.txt.tmp" \
    "$out/summary.txt"
  tar -czf "$out/session.tgz.tmp" -C "$work" . && mv -f "$out/session.tgz.tmp" "$out/session.tgz"
}

run_stage() {  # name, command...  (limit: $stage_limit if set, else $limit; cut to the budget)
  local name="$1"
  shift
  local t0=$SECONDS
  local want="${stage_limit:-$limit}"
  local left=$((deadline - SECONDS - 10))  # 10 s kept for the kill and the packing
  if [ "$left" -lt 30 ]; then
    echo "=== $name: skipped, ${left}s of the session budget left ==="
    summary+=("$(printf '%-22s skipped (no time left in FACTORCL_SESSION_BUDGET)' "$name")")
    pack
    return
  fi
  if [ "$want" -gt "$left" ]; then want=$left; fi
  echo "=== $name (limit ${want}s): $* ==="
  timeout --kill-after=5 "$want" "$@" >"$work/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$work/$name.log"
  summary+=("$(printf '%-22s rc=%-4s %5ss  %s' "$name" "$rc" "$((SECONDS - t0))" \
    "$(grep -E '^(=+ .* (passed|failed|error).* =+|.* (passed|failed)( |,).* in [0-9.]+s)' \
      "$work/$name.log" | tail -n 1)")")
  pack
}

# per-test time limit only where pytest-timeout is installed (it is not a requirement; an unknown
# --timeout flag would fail the whole stage)
per_test=()
if "$PY" -c 'import pytest_timeout' 2>/dev/null; then per_test=(--timeout 240); fi

pytest_stage() {  # name, pytest args...
  local name="$1"
  shift
  run_stage "$name" "$PY" -m pytest -p no:cacheprovider -q -rfE "${per_test[@]}" \
    --junitxml "$work/$name.xml" "$@"
}

for stage in "$@"; do
  case "$stage" in
    build)
      if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
        export TORCH_CUDA_ARCH_LIST
      fi
      export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
        --format=csv >"$work/device.txt" 2>&1
      "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' \
        >>"$work/device.txt" 2>&1
      cat "$work/device.txt"
      stage_limit="${FACTORCL_BUILD_TIMEOUT:-300}" run_stage build \
        "$PY" -m pip install --no-build-isolation --no-deps -e . -v
      "$PY" -c 'import factorcl_ext, json; print(json.dumps(factorcl_ext.build_info()))' \
        | tee "$work/build_info.json"
      # the C++ runtime must be the shared libstdc++.so.6 (a static copy crashed in session 2)
      readelf -d factorcl_ext/_C*.so | grep NEEDED | tee "$work/needed.txt"
      pack
      ;;
    cuda) pytest_stage cuda tests/test_cuda.py ;;
    # The test suites use the fixed tile configuration: autotuning every small test shape costs
    # ~40 s per test. gpu_bench.py autotunes.
    triton) FACTORCL_TRITON_AUTOTUNE=0 pytest_stage triton tests/test_triton.py ;;
    triton-k-*)
      FACTORCL_TRITON_AUTOTUNE=0 pytest_stage triton-k tests/test_triton.py -k "${stage#triton-k-}"
      ;;
    tiles)
      FACTORCL_TEST_EVERY_TILE=1 pytest_stage tiles tests/test_triton.py -k every_gpu_tile ;;
    suites)
      FACTORCL_TRITON_AUTOTUNE=0 FACTORCL_TEST_BACKENDS=cuda,triton pytest_stage suites \
        tests/test_concat_critic.py \
        tests/test_separable_critic.py tests/test_nn.py
      ;;
    suites-k-*)
      FACTORCL_TRITON_AUTOTUNE=0 FACTORCL_TEST_BACKENDS=cuda,triton pytest_stage suites-k \
        tests/test_concat_critic.py tests/test_separable_critic.py tests/test_nn.py \
        -k "${stage#suites-k-}"
      ;;
    trainer)
      FACTORCL_TRITON_AUTOTUNE=0 pytest_stage trainer tests/test_factorcl_train.py \
        tests/test_factorcl_mi_bench.py -m gpu
      ;;
    sanitize) run_stage sanitize tests/run_compute_sanitizer.sh ;;
    bench-*)
      IFS=' ' read -r -a bench_args <<<"${stage#bench-}"
      n_bench=$((${n_bench:-0} + 1))  # one log per bench stage: bench-1.log, bench-2.log, ...
      run_stage "bench-$n_bench" "$PY" benchmarks/gpu_bench.py --out "$work" "${bench_args[@]}"
      ;;
    targets)  # the issues' targets from every bench stage's JSON so far, judged together
      run_stage targets "$PY" benchmarks/gpu_bench.py --check-targets "$work" ;;
    ablation-*)
      IFS=' ' read -r -a abl_args <<<"${stage#ablation-}"
      n_abl=$((${n_abl:-0} + 1))
      run_stage "ablation-$n_abl" "$PY" benchmarks/triton_bwd_ablation.py "${abl_args[@]}"
      ;;
    ncu-*)
      IFS=' ' read -r -a ncu_args <<<"${stage#ncu-}"
      n_ncu=$((${n_ncu:-0} + 1))
      ncu_bin="${NCU:-$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu \
        2>/dev/null | head -n 1)}"
      # --clock-control none: leave the card's clocks as they are (device METHOD.md)
      run_stage "ncu-$n_ncu" "${ncu_bin:-ncu}" --clock-control none --profile-from-start off \
        -k 'regex:(mlp|dot)_\w*kernel' --section SpeedOfLight --section LaunchStats \
        --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        "$PY" benchmarks/profile_kernels.py "${ncu_args[@]}"
      ;;
    *) echo "unknown stage $stage" >&2 ;;
  esac
done

pack
echo "=== summary (also in $out/summary.txt; logs in $out/session.tgz) ==="
printf '%s\n' "${summary[@]}"
