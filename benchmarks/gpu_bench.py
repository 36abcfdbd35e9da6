"""GPU benchmark of the fused critics against the ways a user would otherwise compute them.

    python benchmarks/gpu_bench.py           # full run (minutes); JSON in benchmarks/results/
    python benchmarks/gpu_bench.py --quick   # N = 256, 1024 and separable N = 4096

Concat critic (DESIGN.md section 2), H = 512, L = 0 and 1, bf16 and fp32, N = M in
{256, 1024, 4096, 16384} where they fit; separable critic (section 3), D = 512, N = M in
{4096, 16384, 65536}. Implementations, each timed for the forward (no grad) and forward+backward
of the negative InfoNCE bound:

- ``triton``: factorcl_ext with backend="triton" (the fused loss op for forward+backward);
- ``triton_det`` (not in the default list): the same in Triton's deterministic mode (a second,
  column-side recomputing pass instead of float32 atomics; the fixed tile, no autotuning);
- ``triton_dwslots`` (concat only, not in the default list): the Triton backward forming the
  hidden weights' gradient in per-program float32 slots, pair tile by pair tile (the form before
  session 5; ``FACTORCL_TRITON_DW=slots``), against the default chunked GEMM (``mlp_dw_kernel``);
- ``triton_dotfused`` (separable only, not in the default list): the Triton backward as one
  fused kernel, dH by float32 atomics (the form before session 8;
  ``FACTORCL_TRITON_DOT_BWD=fused``), against the default (dS chunks, cuBLAS products);
- ``cuda``: backend="cuda", only when ``factorcl_ext.build_info()["cuda_kernels"]``;
- ``reference``: factorcl_ext.reference (materialises N x M x H; OOM is recorded, not fatal);
- ``compiled``: torch.compile of the reference;
- ``chunked``: row chunks of the materialising computation, each under activation checkpointing,
  so memory stays bounded: the cuBLAS approach a user would write by hand;
- separable only, ``matmuls``: four plain N x M x D matmuls (the target's yardstick).

Timing: CUDA events around each call, fresh random inputs per call (made outside the timed
region), warm-up first (compilation, autotuning), median of the timed runs. The same run measures
the device's dense matmul rate (8192^3 torch.matmul, same dtype; fp32 follows --fp32-precision)
and reports achieved TFLOP/s by the DESIGN.md FLOP count (useful work: per pair 2*L*H^2 forward,
6*L*H^2 forward+backward, plus the first-layer products; separable 2*N*M*D and 6*N*M*D), the
percentage of that peak, L = 0 rows in pairs per second, and the peak memory of the call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import factorcl_ext  # noqa: E402
from factorcl_ext import reference  # noqa: E402
from factorcl_ext.measure import (  # noqa: E402
    compile_every_case,
    concat_critic_flops,
    separable_critic_flops,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEVICE = "cuda"  # tests set "cpu" to run the step functions under the Triton interpreter


def _wide(t):
    """At least float32 (the fused ops' statistics dtype); float64 stays float64."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


def time_call(step, make_inputs, warmup: int, reps: int, budget_s: float) -> dict:
    """Median milliseconds of ``step(make_inputs())`` by CUDA events, and its peak memory."""
    for _ in range(warmup):
        step(make_inputs())
    torch.cuda.synchronize()
    times, peak_extra, peak_total = [], 0, 0
    t0 = time.perf_counter()
    for r in range(reps):
        inputs = make_inputs()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step(inputs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        peak_total = max(peak_total, torch.cuda.max_memory_allocated())
        peak_extra = max(peak_extra, torch.cuda.max_memory_allocated() - base)
        del inputs
        if r >= 4 and time.perf_counter() - t0 > budget_s:
            break
    return {"ms": statistics.median(times), "runs": len(times),
            "peak_mb": peak_extra / 2**20, "peak_total_mb": peak_total / 2**20}


def matmul_peak(dtype: torch.dtype, n: int = 8192) -> float:
    """Dense torch.matmul TFLOP/s of this device in ``dtype``."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    res = time_call(lambda x: torch.matmul(*x), lambda: (a, b), warmup=3, reps=20, budget_s=10)
    return 2 * n**3 / (res["ms"] * 1e-3) / 1e12


# --------------------------------------------------------------------------------------------
# concat critic
# --------------------------------------------------------------------------------------------


def concat_inputs(n, d, h, layers, dtype, grad):
    kw = dict(device=DEVICE, dtype=dtype)

    def p(*shape, scale=1.0):
        return (torch.randn(*shape, **kw) * scale).requires_grad_(grad)

    return dict(
        u=p(n, d), v=p(n, d), w_u=p(h, d, scale=d**-0.5), w_v=p(h, d, scale=d**-0.5),
        b_0=p(h, scale=0.1), W=[p(h, h, scale=h**-0.5) for _ in range(layers)],
        b=[p(h, scale=0.1) for _ in range(layers)], w_out=p(h, scale=h**-0.5), b_out=p(1),
    )


def _params(x):
    return [x["u"], x["v"], x["w_u"], x["w_v"], x["b_0"], *x["W"], *x["b"], x["w_out"],
            x["b_out"]]


def _ref_neg_bound(x, n):
    st = reference.concat_critic_stats(x["u"], x["v"], x["w_u"], x["w_v"], x["b_0"], x["W"],
                                       x["b"], x["w_out"], x["b_out"], pos_offset=0)
    return -factorcl_ext.infonce_lower_bound(st[0], st[1], n)


def _chunked_neg_bound(x, n, chunk):
    """Row chunks of the materialising critic, each checkpointed: bounded memory, cuBLAS math."""
    from torch.utils.checkpoint import checkpoint

    A = x["u"] @ x["w_u"].t()
    B = torch.addmm(x["b_0"], x["v"], x["w_v"].t())

    def rows(A_rows, r0, B, w_out, b_out, *wb):
        k = len(wb) // 2
        s = reference.pair_mlp_scores(A_rows, B, wb[:k], wb[k:], w_out, b_out.reshape(()))
        r = torch.arange(A_rows.shape[0], device=s.device)
        return torch.logsumexp(_wide(s), dim=1), _wide(s[r, r + r0])

    lse, pos = [], []
    for r0 in range(0, n, chunk):
        out = checkpoint(rows, A[r0:r0 + chunk], r0, B, x["w_out"], x["b_out"], *x["W"],
                         *x["b"], use_reentrant=False)
        lse.append(out[0])
        pos.append(out[1])
    return -factorcl_ext.infonce_lower_bound(torch.cat(lse), torch.cat(pos), n)


def _within(step, context):
    """``step`` run inside ``context()``, a setting of the Triton backend."""
    def wrapped(x):
        with context():
            return step(x)
    return wrapped


def _deterministic(step):
    """``step`` run in the Triton backend's deterministic mode."""
    from factorcl_ext.triton import deterministic

    return _within(step, deterministic)


def _dw_slots(step):
    """``step`` with the Triton concat backward's weight gradient in per-program slots."""
    from factorcl_ext.triton import using_dw_mode

    return _within(step, lambda: using_dw_mode("slots"))


def _dot_fused(step):
    """``step`` with the Triton separable backward in one fused kernel (dH by atomics)."""
    from factorcl_ext.triton import using_dot_bwd_mode

    return _within(step, lambda: using_dot_bwd_mode("fused"))


def concat_step(impl, n, fwd_only, chunk, compiled_cache):
    def fused(backend):
        def step(x):
            if fwd_only:
                with torch.no_grad():
                    st = factorcl_ext.concat_critic_stats(
                        x["u"], x["v"], x["w_u"], x["w_v"], x["b_0"], x["W"], x["b"],
                        x["w_out"], x["b_out"], pos_offset=0, backend=backend)
                    return factorcl_ext.infonce_lower_bound(st.lse, st.pos, n)
            loss = factorcl_ext.concat_critic_loss(
                x["u"], x["v"], x["w_u"], x["w_v"], x["b_0"], x["W"], x["b"], x["w_out"],
                x["b_out"], c_lse=1.0 / n, c_pos=-1.0 / n, pos_offset=0, backend=backend)
            loss.backward()
            return loss - math.log(n)  # the negative bound: mean(lse) - mean(pos) - log M
        return step

    if impl in ("triton", "cuda"):
        return fused(impl)
    if impl == "triton_det":
        return _deterministic(fused("triton"))
    if impl == "triton_dwslots":
        return _dw_slots(fused("triton"))
    if impl == "reference":
        fn = lambda x: _ref_neg_bound(x, n)  # noqa: E731
    elif impl == "compiled":
        key = ("concat", n)
        if key not in compiled_cache:
            compiled_cache[key] = torch.compile(lambda x: _ref_neg_bound(x, n))
        fn = compiled_cache[key]
    elif impl == "chunked":
        fn = lambda x: _chunked_neg_bound(x, n, chunk)  # noqa: E731
    else:
        raise ValueError(impl)

    def step(x):
        if fwd_only:
            with torch.no_grad():
                return fn(x)
        loss = fn(x)
        loss.backward()
        return loss
    return step


# --------------------------------------------------------------------------------------------
# separable critic
# --------------------------------------------------------------------------------------------


def separable_inputs(n, d, dtype, grad):
    g = torch.randn(n, d, device=DEVICE, dtype=dtype).requires_grad_(grad)
    h = torch.randn(n, d, device=DEVICE, dtype=dtype).requires_grad_(grad)
    return dict(g=g, h=h)


def separable_step(impl, n, fwd_only, chunk, compiled_cache):
    tau = 0.1

    def ref(x):
        st = reference.separable_critic_stats(x["g"], x["h"], temperature=tau, normalize=True)
        return -factorcl_ext.infonce_lower_bound(_wide(st[0]), _wide(st[1]), n)

    def chunked(x):
        from torch.utils.checkpoint import checkpoint

        G = torch.nn.functional.normalize(x["g"], dim=1) / tau
        H = torch.nn.functional.normalize(x["h"], dim=1)

        def rows(Gr, r0, H):
            s = _wide(Gr @ H.t())
            r = torch.arange(Gr.shape[0], device=s.device)
            return torch.logsumexp(s, dim=1), s[r, r + r0]

        outs = [checkpoint(rows, G[r0:r0 + chunk], r0, H, use_reentrant=False)
                for r0 in range(0, n, chunk)]
        lse = torch.cat([o[0] for o in outs])
        pos = torch.cat([o[1] for o in outs])
        return -factorcl_ext.infonce_lower_bound(lse, pos, n)

    def matmuls(x):
        # the yardstick: S = G H^T, then three more N x M x D products (dS H, dS^T G and the
        # recompute), with no softmax at all
        g, h = x["g"].detach(), x["h"].detach()
        s = g @ h.t()
        count = 1 if fwd_only else 4
        for _ in range(count - 1):
            g = s @ h
        return g

    if impl == "triton_det":
        return _deterministic(separable_step("triton", n, fwd_only, chunk, compiled_cache))
    if impl == "triton_dotfused":
        return _dot_fused(separable_step("triton", n, fwd_only, chunk, compiled_cache))
    if impl in ("triton", "cuda"):
        def step(x):
            if fwd_only:
                with torch.no_grad():
                    st = factorcl_ext.separable_critic_stats(x["g"], x["h"], temperature=tau,
                                                             normalize=True, backend=impl)
                    return factorcl_ext.infonce_lower_bound(st.lse, st.pos, n)
            loss = factorcl_ext.separable_critic_loss(
                x["g"], x["h"], c_lse=1.0 / n, c_pos=-1.0 / n, temperature=tau, normalize=True,
                backend=impl)
            loss.backward()
            return loss - math.log(n)
        return step
    if impl == "matmuls":
        return matmuls
    if impl == "reference":
        fn = ref
    elif impl == "compiled":
        key = ("separable", n)
        if key not in compiled_cache:
            compiled_cache[key] = torch.compile(ref)
        fn = compiled_cache[key]
    elif impl == "chunked":
        fn = chunked
    else:
        raise ValueError(impl)

    def step(x):
        if fwd_only:
            with torch.no_grad():
                return fn(x)
        loss = fn(x)
        loss.backward()
        return loss
    return step


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def fused_backends() -> list[str]:
    """triton always; cuda when this build has CUDA kernels."""
    out = ["triton"]
    if factorcl_ext.build_info()["cuda_kernels"]:
        out.append("cuda")
    return out


def run_case(step, make_inputs, args, heavy: bool) -> dict:
    try:
        return time_call(step, make_inputs, warmup=2 if heavy else args.warmup,
                         reps=args.reps, budget_s=args.budget)
    except torch.cuda.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as exc:  # record and go on: one broken baseline must not end the run
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    finally:
        torch.cuda.empty_cache()


def chunk_rows(n, h, layers, dtype, budget_bytes=2 * 2**30) -> int:
    """Rows per chunk so that one chunk's pair activations stay near ``budget_bytes``."""
    per_row = n * h * torch.finfo(dtype).bits // 8 * (2 + 2 * layers)
    return max(1, min(n, budget_bytes // max(per_row, 1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 256, 1024 and separable N = 4096")
    p.add_argument("--ns", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--sep-ns", type=int, nargs="*", default=[4096, 16384, 65536])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--dim", type=int, default=128, help="input width du = dv of the concat critic")
    p.add_argument("--sep-dim", type=int, default=512)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--impls", nargs="+",
                   default=["triton", "cuda", "reference", "compiled", "chunked", "matmuls"])
    p.add_argument("--fp32-precision", default="high", choices=["highest", "high"],
                   help="torch.set_float32_matmul_precision for fp32 (high = TF32)")
    p.add_argument("--max-ref-n", type=int, default=1024,
                   help="largest N for reference and compiled (they materialise N*N*H)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--budget", type=float, default=5.0, help="seconds of timed runs per case")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--no-autotune", action="store_true",
                   help="Triton: the fixed first tile configuration (as "
                        "FACTORCL_TRITON_AUTOTUNE=0): for peak-memory runs at large N, where "
                        "autotuning takes minutes")
    args = p.parse_args()
    if args.no_autotune:
        from factorcl_ext.triton import _config as triton_config

        triton_config.AUTOTUNE = False

    if not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "the CPU benchmarks are benchmarks/cpu_table.py")
    if args.quick:
        args.ns, args.sep_ns = [256, 1024], [4096]
    torch.set_float32_matmul_precision(args.fp32_precision)
    impls = [i for i in args.impls
             if i not in ("triton", "triton_det", "triton_dwslots", "triton_dotfused", "cuda")
             or i.split("_")[0] in fused_backends()]

    dev = torch.cuda.get_device_properties(0)
    info = factorcl_ext.build_info()
    peaks = {name: matmul_peak(DTYPES[name]) for name in args.dtypes}
    print(f"# {dev.name}, torch {torch.__version__}, fp32 precision {args.fp32_precision}")
    print("# dense matmul peak: " + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in peaks.items()))
    rows = []
    compiled_cache: dict = {}
    compile_every_case()  # one compiled function serves every N, L, dtype and pass
    header = (f"{'critic':9s} {'dtype':5s} {'N':>6s} {'L':>2s} {'impl':15s} {'pass':8s} "
              f"{'ms':>9s} {'TFLOP/s':>8s} {'%peak':>6s} {'Gpairs/s':>9s} {'peak MB':>9s}")
    print(header)

    def report(row):
        rows.append(row)
        if "error" in row:
            print(f"{row['critic']:9s} {row['dtype']:5s} {row['n']:6d} {row.get('layers', ''):>2} "
                  f"{row['impl']:15s} {row['pass']:8s} {row['error']}")
            return
        print(f"{row['critic']:9s} {row['dtype']:5s} {row['n']:6d} {row.get('layers', ''):>2} "
              f"{row['impl']:15s} {row['pass']:8s} {row['ms']:9.3f} {row['tflops']:8.1f} "
              f"{row['pct_peak']:6.1f} {row['gpairs_s']:9.2f} {row['peak_mb']:9.1f}", flush=True)

    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for layers in args.layers:
            for n in args.ns:
                chunk = chunk_rows(n, args.hidden, layers, dtype)
                for fwd_only in (True, False):
                    for impl in impls:
                        if impl in ("matmuls", "triton_dotfused"):  # separable only
                            continue
                        pass_name = "fwd" if fwd_only else "fwd+bwd"
                        if impl in ("reference", "compiled") and n > args.max_ref_n:
                            continue
                        step = concat_step(impl, n, fwd_only, chunk, compiled_cache)
                        res = run_case(step, lambda: concat_inputs(
                            n, args.dim, args.hidden, layers, dtype, not fwd_only), args,
                            heavy=impl in ("reference", "compiled"))
                        row = dict(critic="concat", dtype=dname, n=n, layers=layers,
                                   hidden=args.hidden, dim=args.dim, impl=impl, **res)
                        row["pass"] = pass_name
                        if "ms" in res:
                            flops = concat_critic_flops(n, n, args.hidden, layers, args.dim,
                                                        args.dim, backward=not fwd_only)
                            row["tflops"] = flops / (res["ms"] * 1e-3) / 1e12
                            row["pct_peak"] = 100 * row["tflops"] / peaks[dname]
                            row["gpairs_s"] = n * n / (res["ms"] * 1e-3) / 1e9
                        report(row)
        for n in args.sep_ns:
            chunk = max(1, min(n, (1 << 30) // (n * 4)))
            for fwd_only in (True, False):
                for impl in impls:
                    if impl == "triton_dwslots":  # the concat critic's weights only
                        continue
                    pass_name = "fwd" if fwd_only else "fwd+bwd"
                    if impl in ("reference", "compiled") and n > 4 * args.max_ref_n:
                        continue
                    step = separable_step(impl, n, fwd_only, chunk, compiled_cache)
                    res = run_case(step, lambda: separable_inputs(n, args.sep_dim, dtype,
                                                                  not fwd_only), args,
                                   heavy=impl in ("reference", "compiled"))
                    row = dict(critic="separable", dtype=dname, n=n, dim=args.sep_dim, impl=impl,
                               **res)
                    row["pass"] = pass_name
                    if "ms" in res:
                        flops = separable_critic_flops(n, n, args.sep_dim, backward=not fwd_only)
                        row["tflops"] = flops / (res["ms"] * 1e-3) / 1e12
                        row["pct_peak"] = 100 * row["tflops"] / peaks[dname]
                        row["gpairs_s"] = n * n / (res["ms"] * 1e-3) / 1e9
                    report(row)

    targets = check_targets(rows)
    for line in targets:
        print("# target: " + line)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"gpu_bench-{dev.name.replace(' ', '_')}-{stamp}.json"
    path.write_text(json.dumps({
        "device": dev.name, "capability": f"{dev.major}.{dev.minor}", "torch": torch.__version__,
        "triton": _triton_version(), "build_info": info, "fp32_precision": args.fp32_precision,
        "matmul_peak_tflops": peaks, "rows": rows, "targets": targets,
        "autotune_choices": _autotune_choices(),
        "argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items()
                                      if k.startswith(("FACTORCL", "TRITON"))},
    }, indent=1))
    for kernel, choices in (_autotune_choices() or {}).items():
        for c in choices:
            print(f"# autotune {kernel} {','.join(c['key'])}: {c['config']}")
    print(f"# wrote {path}")


def _autotune_choices():
    """Which tile configuration the autotuner picked for each timed shape (None without Triton)."""
    if not factorcl_ext.build_info().get("triton", True):
        return None
    try:
        from factorcl_ext.triton.ops import autotune_choices
    except ImportError:
        return None
    return autotune_choices()


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _find(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()) and "ms" in r:
            return r
    return None


def check_targets(rows) -> list[str]:
    """The H100 targets of the Triton issue, evaluated on whatever this run measured."""
    out = []
    for impl in ("triton", "cuda"):
        t = _find(rows, critic="concat", dtype="bf16", n=4096, layers=1, impl=impl,
                  **{"pass": "fwd+bwd"})
        c = _find(rows, critic="concat", dtype="bf16", n=4096, layers=1, impl="chunked",
                  **{"pass": "fwd+bwd"})
        if t:
            line = (f"{impl} bf16 N=4096 H=512 L=1 fwd+bwd at {t['pct_peak']:.1f}% of the dense "
                    f"bf16 matmul rate (target >= 50%)")
            if c:
                line += f"; {c['ms'] / t['ms']:.2f}x the row-chunked baseline (target >= 2x)"
            out.append(line)
        big = [r for r in rows if r.get("critic") == "concat" and r.get("n") == 16384
               and r.get("impl") == impl and "ms" in r]
        if big:
            worst = max(r["peak_mb"] for r in big)
            out.append(f"{impl} peak extra memory at N=16384: {worst:.0f} MB (target < 1024 MB)")
        for dname in ("bf16", "fp32"):
            s = _find(rows, critic="separable", dtype=dname, n=65536, impl=impl,
                      **{"pass": "fwd+bwd"})
            m = _find(rows, critic="separable", dtype=dname, n=65536, impl="matmuls",
                      **{"pass": "fwd+bwd"})
            if s and m:
                out.append(f"{impl} separable {dname} N=65536 D=512 fwd+bwd: "
                           f"{s['ms'] / m['ms']:.2f}x four plain matmuls (target <= 1.5x)")
    return out


if __name__ == "__main__":
    main()
