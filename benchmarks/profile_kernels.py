"""One forward + backward per (critic, backend) inside a CUDA profiler range, for Nsight Compute.

    ncu --clock-control none --profile-from-start off -k 'regex:(mlp|dot)_\\w*kernel' \\
        --section SpeedOfLight --section WarpStateStats \\
        python benchmarks/profile_kernels.py --n 1024 --sep-n 8192 --backends cuda triton

(benchmarks/gpu_session.sh's ``ncu`` stage runs this with more sections.) Each step runs twice
outside the range first (compilation, Triton autotuning), then once between
torch.cuda.profiler.start() and stop(), so with ``--profile-from-start off`` ncu profiles only
that step's kernels; the script prints which step each range holds, in order. The steps are
gpu_bench.py's: the fused training loss op forward + backward (negative InfoNCE bound), bf16 by
default, concat critic d = 128, H = 512, L = 1; separable critic D = 512.

Why: timings say how long a kernel takes, not why. On a lent H100 (Firecracker machines: ncu
reads the hardware counters there, device README) the sections say whether a kernel waits on
memory, on barriers or on its tensor cores, which is what the next change needs to know.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1024, help="concat critic N = M (0: skip)")
    p.add_argument("--sep-n", type=int, default=8192, help="separable critic N = M (0: skip)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--sep-dim", type=int, default=512)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--backends", nargs="+", default=None,
                   choices=["cuda", "triton", "triton_det", "triton_dwslots", "triton_dotfused"],
                   help="default: cuda (where built) and triton; one named here that this "
                        "build lacks stops the script (exit 2)")
    p.add_argument("--no-autotune", action="store_true",
                   help="Triton: the fixed tile configuration (FACTORCL_TRITON_AUTOTUNE=0)")
    args = p.parse_args(argv)
    if args.no_autotune:
        os.environ["FACTORCL_TRITON_AUTOTUNE"] = "0"  # read when factorcl_ext.triton is imported

    import torch

    import factorcl_ext

    import gpu_bench as gb

    try:  # asked for by name: never dropped silently
        backends, notes = gb.resolve_impls(args.backends, factorcl_ext.build_info(),
                                           defaults=["cuda", "triton"], flag="--backends")
    except gb.UsageError as exc:
        print(f"profile_kernels.py: {exc}", file=sys.stderr)
        raise SystemExit(2)
    for note in notes:
        print(f"# note: {note}")
    if not backends:
        print("profile_kernels.py: no backend to profile", file=sys.stderr)
        raise SystemExit(2)
    if not torch.cuda.is_available():
        sys.exit("profile_kernels.py needs a CUDA device")
    dtype = gb.DTYPES[args.dtype]
    steps = []
    for backend in backends:
        if args.n and backend != "triton_dotfused":
            steps.append((f"concat N={args.n} H={args.hidden} L={args.layers} {backend}",
                          gb.concat_step(backend, args.n, False, args.n, {}),
                          lambda: gb.concat_inputs(args.n, args.dim, args.hidden, args.layers,
                                                   dtype, True)))
        if args.sep_n and backend != "triton_dwslots":
            steps.append((f"separable N={args.sep_n} D={args.sep_dim} {backend}",
                          gb.separable_step(backend, args.sep_n, False, args.sep_n, {}),
                          lambda: gb.separable_inputs(args.sep_n, args.sep_dim, dtype, True)))
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "build",
          factorcl_ext.build_info(), flush=True)
    for i, (name, step, make_inputs) in enumerate(steps):
        for _ in range(2):
            step(make_inputs())
        x = make_inputs()
        torch.cuda.synchronize()
        print(f"profiler range {i}: {name} (forward + backward)", flush=True)
        torch.cuda.profiler.start()
        step(x)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        del x
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
