"""Print a Markdown table of the CPU critics, forward + backward, float32: median time, peak extra
resident memory, achieved rate (DESIGN.md FLOP count) next to torch.mm's rate measured in the same
run, and the speed-up over the baseline: the authors' tiling formulation (FactorCL critic), the
materialising reference (MI critic) or the cross-entropy a user writes (separable critic).

    python benchmarks/cpu_table.py                 # FactorCL (N 64..512), MI (N 128..1024) and
                                                   # separable (N 1024..8192) critics
    python benchmarks/cpu_table.py --critics separable --ns 4096,8192   # a part of it
    python benchmarks/cpu_table.py --large         # FactorCL critic at N = 4096, H = 128 (minutes)
    python benchmarks/cpu_table.py --host-overhead # N = d = H = 8: host (Python, dispatch) time
    python benchmarks/cpu_table.py --json out.json # also write the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from factorcl_ext.measure import (  # noqa: E402
    MEMORY_UNAVAILABLE,
    concat_critic_flops,
    matmul_gflops,
    median_seconds,
    peak_extra_rss_bytes,
    separable_critic_flops,
)

from cases import (  # noqa: E402
    IMPLS,
    SEPARABLE_IMPLS,
    Case,
    factorcl_cases,
    host_overhead_case,
    make_step,
    mi_cases,
    separable_cases,
)

BASELINES = ("authors", "reference", "user")  # the "vs" column's denominator, per case


def measure(case: Case, impl: str, repeats: int) -> dict:
    step = make_step(case, impl)
    step()  # warm-up; compiles for torch.compile
    t = median_seconds(step, repeats=repeats, warmup=0)
    mem = peak_extra_rss_bytes(step, before=step.clear_grads)
    if case.name == "separable":
        flops = separable_critic_flops(case.n, case.n, case.dim)
    elif case.layers:
        flops = concat_critic_flops(case.n, case.n, case.hidden, case.layers, case.dim, case.dim)
    else:
        flops = None  # element-wise bound: reported in pairs/s
    return {
        "case": case.name, "n": case.n, "dim": case.dim, "hidden": case.hidden,
        "layers": case.layers, "impl": impl, "seconds": t, "peak_extra_bytes": mem,
        "gflops": flops / t / 1e9 if flops else None,
        "mpairs_per_s": case.n * case.n / t / 1e6,
    }


def measure_interleaved(case: Case, impls: list[str], repeats: int) -> list[dict]:
    """Median time of each implementation, the calls taken in turn (one of each per round) so
    that a shared machine's load falls on all of them alike: for sub-millisecond calls."""
    steps = {impl: make_step(case, impl) for impl in impls}
    for step in steps.values():
        median_seconds(step, repeats=20, warmup=1)  # warm-up; compiles for torch.compile
    times = {impl: [] for impl in impls}
    for _ in range(repeats):
        for impl, step in steps.items():
            times[impl].append(median_seconds(step, repeats=1, warmup=0))
    rows = []
    for impl in impls:
        t = statistics.median(times[impl])
        rows.append({
            "case": case.name, "n": case.n, "dim": case.dim, "hidden": case.hidden,
            "layers": case.layers, "impl": impl, "seconds": t, "peak_extra_bytes": None,
            "gflops": None, "mpairs_per_s": case.n * case.n / t / 1e6,
        })
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--large", action="store_true", help="FactorCL critic at N=4096, H=128, L=1")
    p.add_argument("--host-overhead", action="store_true",
                   help="every implementation at N = d = H = 8, L = 1 on one thread, where the "
                        "arithmetic is negligible: the host (Python and dispatch) time of one "
                        "forward + backward, the implementations interleaved (300 rounds)")
    p.add_argument("--impls", default=None, help="comma list of implementations to run")
    p.add_argument("--ns", default=None, help="comma list of batch sizes N to run")
    p.add_argument("--critics", default=None,
                   help="comma list of the critics to run: factorcl, mi, separable (default all)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.host_overhead:
        torch.set_num_threads(1)

    mm_before = matmul_gflops()
    rows = []
    if args.large:
        plan = [(Case("factorcl", 4096, 128, 128, 1), ["fused"])]
        args.repeats = 1
    elif args.host_overhead:
        impls = [i for i in IMPLS if not args.impls or i in args.impls.split(",")]
        rows = measure_interleaved(host_overhead_case(), impls, max(args.repeats, 300))
        plan = []
    else:
        plan = [(c, ["fused", "fused_stats", "authors", "compiled"]) for c in factorcl_cases()]
        plan += [(c, ["fused", "reference", "compiled"]) for c in mi_cases()]
        plan += [(c, list(SEPARABLE_IMPLS)) for c in separable_cases()]
    for case, impls in plan:
        if args.ns and str(case.n) not in args.ns.split(","):
            continue
        if args.critics and case.name not in args.critics.split(","):
            continue
        if args.impls:
            impls = [i for i in impls if i in args.impls.split(",")]
        for impl in impls:
            row = measure(case, impl, args.repeats)
            rows.append(row)
            print(f"  measured {case.label} {impl}: {row['seconds'] * 1e3:.1f} ms", file=sys.stderr)
    mm_after = matmul_gflops()
    mm = (mm_before + mm_after) / 2

    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; torch.mm 4096x512x512 fp32: {mm:.1f} GFLOP/s "
          f"(before {mm_before:.1f}, after {mm_after:.1f})\n")
    print(f"| critic | N | impl | fwd+bwd median | vs {'/'.join(BASELINES)} | peak extra memory "
          "| rate | % of torch.mm |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next((r for r in rows if r["case"] == row["case"] and r["n"] == row["n"]
                     and r["impl"] in BASELINES), None)
        speedup = f"{base['seconds'] / row['seconds']:.2f}x" if base else "-"
        mem, base_mem = row["peak_extra_bytes"], base["peak_extra_bytes"] if base else None
        memrel = (f" ({100 * mem / base_mem:.1f}%)" if mem is not None and base is not row
                  and base_mem is not None and base_mem >= 2**20 else "")
        mem = f"{mem / 2**20:.1f} MiB" if mem is not None else "n/a"
        if row["gflops"] is not None:
            rate = f"{row['gflops']:.1f} GFLOP/s"
            pct = f"{100 * row['gflops'] / mm:.0f}%"
        else:
            rate, pct = f"{row['mpairs_per_s']:.2f} Mpairs/s", "-"
        label = f"{row['case']} " + Case(row["case"], row["n"], row["dim"], row["hidden"],
                                         row["layers"]).shape
        t = row["seconds"]
        t = f"{t * 1e3:.1f} ms" if t >= 1e-3 else f"{t * 1e6:.0f} us"
        print(f"| {label} | {row['n']} | {row['impl']} | {t} | {speedup} "
              f"| {mem}{memrel} | {rate} | {pct} |")
    if not args.host_overhead and any(r["peak_extra_bytes"] is None for r in rows):
        print(f"\n{MEMORY_UNAVAILABLE}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch_mm_gflops": mm, "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
