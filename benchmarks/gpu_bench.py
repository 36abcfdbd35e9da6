"""GPU benchmark of the fused critics against the ways a user would otherwise compute them.

    python benchmarks/gpu_bench.py           # full run (minutes); JSON in benchmarks/results/
    python benchmarks/gpu_bench.py --quick   # N = 256, 1024 and separable N = 4096
    python benchmarks/gpu_bench.py --check-targets OUT/gpu_bench-*.json   # no GPU needed

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
- ``cuda``: backend="cuda" (needs ``factorcl_ext.build_info()["cuda_kernels"]``: in the default
  list only then; asked for by --impls without it, the run stops before timing, exit 2);
- ``reference``: factorcl_ext.reference (materialises N x M x H; OOM is recorded, not fatal);
- ``compiled``: torch.compile of the reference;
- ``chunked``: row chunks of the materialising computation, each under activation checkpointing,
  so memory stays bounded: the cuBLAS approach a user would write by hand;
- separable only, ``matmuls``: the target's yardstick, the four plain products a recomputing
  forward+backward implies, in one timed region: S = G H^T (forward), S = G H^T again
  (recompute), dG = dS H and dH = dS^T G (forward only: the first product). Its TFLOP/s use the
  same DESIGN.md count as the other rows (6*N*M*D); it executes 8*N*M*D (``executed_tflops``).

Timing: CUDA events around each call, fresh random inputs per call (made outside the timed
region), warm-up first (compilation, autotuning); per row the median, min, max, quartiles and
(up to 64 runs) every time. The run measures the device's dense matmul rate (8192^3
torch.matmul, same dtype; fp32 follows --fp32-precision) at its start, after at least 200 ms of
warm-up products, and again at its end; rows are rated against the larger of the two (a lower
percentage: the conservative choice for the "% of the matmul rate" targets). Achieved TFLOP/s
follow the DESIGN.md FLOP count (useful work: per pair 2*L*H^2 forward, 6*L*H^2 forward+backward,
plus the first-layer products; separable 2*N*M*D and 6*N*M*D); L = 0 rows print pairs per second
instead (element-wise bound; TFLOP/s stay in the JSON).

Results: one JSON file per run, its path chosen at the start and rewritten (atomically) after
every row with "complete": false, set true at the end; a run cut short (time limit, SIGTERM, a
device error) leaves every row measured so far. Per row: the case (critic, dtype, n, m, layers,
hidden, dim = du or D, impl, pass), ms (median), min_ms, max_ms, q1_ms, q3_ms, iqr_ms, times_ms,
runs, tflops, matmul_peak_tflops (the rate this row's pct_peak is against), pct_peak,
pairs_per_s, peak_extra_bytes / peak_extra_mib (peak allocated during the call minus allocated
before it: inputs excluded; MiB = 2^20 bytes), peak_total_bytes / peak_total_mib, or "error".
"targets": one record per issue target (name, issue, status PASS / FAIL / NOT MEASURED, value,
comparison, threshold, unit, reason, rows with the fields used); the target functions are pure
functions of the rows, so ``--check-targets`` evaluates rows of several runs (the CUDA and the
Triton rows of separate stages) together, each row against its own run's matmul rate.

Exit status: 0 measured (the targets' verdicts do not change it); 1 no GPU, or every row errored;
2 bad request (an implementation unavailable in this build, nothing to time, an unreadable
--check-targets file); 3 stopped by a device error (a sticky CUDA error); 143 stopped by SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
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


def time_stats(times: list[float]) -> dict:
    """Median, min, max and quartiles of ``times`` (ms), and the times themselves up to 64."""
    ts = sorted(times)
    if len(ts) >= 2:
        q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    else:
        q1 = q3 = ts[0]
    out = {"ms": statistics.median(ts), "min_ms": ts[0], "max_ms": ts[-1], "q1_ms": q1,
           "q3_ms": q3, "iqr_ms": q3 - q1, "runs": len(ts)}
    if len(ts) <= 64:
        out["times_ms"] = list(times)  # in the order measured
    return out


def time_call(step, make_inputs, warmup: int, reps: int, budget_s: float) -> dict:
    """Milliseconds of ``step(make_inputs())`` by CUDA events (median, spread: time_stats), and
    its peak memory: peak allocated during the call minus allocated before it (``extra``: the
    inputs excluded) and the process's peak allocated (``total``), in bytes and MiB."""
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
    return {**time_stats(times), "peak_extra_bytes": int(peak_extra),
            "peak_extra_mib": peak_extra / 2**20, "peak_total_bytes": int(peak_total),
            "peak_total_mib": peak_total / 2**20}


def matmul_peak(dtype: torch.dtype, n: int = 8192, min_warmup_s: float = 0.2,
                reps: int = 20) -> dict:
    """Dense torch.matmul TFLOP/s of this device in ``dtype`` (n^3 product, median of ``reps``).
    Products run back to back for at least ``min_warmup_s`` first, so that the clocks have come
    up (a few products may not be enough)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    torch.cuda.synchronize()
    t0, count = time.perf_counter(), 0
    while True:
        for _ in range(4):
            torch.matmul(a, b)
        count += 4
        torch.cuda.synchronize()
        if time.perf_counter() - t0 >= min_warmup_s:
            break
    warm_s = time.perf_counter() - t0
    res = time_call(lambda x: torch.matmul(*x), lambda: (a, b), warmup=0, reps=reps, budget_s=10)
    keep = ("ms", "min_ms", "max_ms", "iqr_ms", "runs")
    return {"tflops": 2 * n**3 / (res["ms"] * 1e-3) / 1e12, "n": n, "warmup_s": warm_s,
            "warmup_products": count, **{k: res[k] for k in keep}}


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
                    # the negative bound, as every other implementation's step returns
                    return -factorcl_ext.infonce_lower_bound(st.lse, st.pos, n)
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
        # the yardstick: the plain products a recomputing forward+backward implies, no softmax:
        # S = G H^T (forward), S = G H^T again (the backward's recompute), dG = dS H and
        # dH = dS^T G (a transposed operand); S stands in for dS. Forward only: the first.
        g, h = x["g"].detach(), x["h"].detach()
        s = g @ h.t()
        if fwd_only:
            return s
        torch.mm(g, h.t(), out=s)  # the recompute, into the same buffer
        return s @ h, s.t() @ g

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
                    return -factorcl_ext.infonce_lower_bound(st.lse, st.pos, n)
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

IMPLS = ["triton", "triton_det", "triton_dwslots", "triton_dotfused", "cuda", "reference",
         "compiled", "chunked", "matmuls"]
DEFAULT_IMPLS = ["triton", "cuda", "reference", "compiled", "chunked", "matmuls"]
CONCAT_ONLY = ("triton_dwslots",)
SEPARABLE_ONLY = ("matmuls", "triton_dotfused")
MATERIALISING = ("reference", "compiled")  # limited by --max-ref-n


class UsageError(Exception):
    """A request this run cannot serve; main prints it as one line and exits 2."""


class _Terminated(BaseException):
    """SIGTERM (gpu_session.sh's stage time limit): stop, keeping what was measured."""


def _terminate(signum, frame):
    raise _Terminated()


def unavailable(impl: str, info: dict):
    """Why ``impl`` cannot run with the build described by ``info`` (build_info()), or None."""
    if impl == "cuda" and not info.get("cuda_kernels"):
        why = ("this build of factorcl_ext has no CUDA kernels "
               "(build_info()['cuda_kernels'] is False")
        if info.get("extension_error"):
            first = (str(info["extension_error"]).splitlines() or [""])[0]
            why += f"; extension error: {first[:120]}"
        return why + ")"
    if impl.startswith("triton") and not info.get("triton", True):
        return "Triton is not installed (build_info()['triton'] is False)"
    return None


def resolve_impls(requested, info: dict, defaults=DEFAULT_IMPLS,
                  flag: str = "--impls") -> tuple[list[str], list[str]]:
    """The implementations to run and notes to print. ``requested`` None: ``defaults`` less what
    this build lacks (each noted); asked for by name (with ``flag``), an unavailable one is a
    UsageError. (profile_kernels.py's --backends too.)"""
    if requested is None:
        impls = [i for i in defaults if unavailable(i, info) is None]
        notes = [f"{i} left out of the default list: {unavailable(i, info)}"
                 for i in defaults if unavailable(i, info) is not None]
        return impls, notes
    bad = [f"{flag} {i} is not available: {unavailable(i, info)}"
           for i in dict.fromkeys(requested) if unavailable(i, info) is not None]
    if bad:
        raise UsageError("; ".join(bad) + " (nothing was run)")
    return list(dict.fromkeys(requested)), []


def plan_cases(args, impls: list[str]) -> list[dict]:
    """Every (critic, dtype, L, N, pass, impl) the run will time, in order, as row keys."""
    cases = []
    for dname in args.dtypes:
        for layers in args.layers:
            for n in args.ns:
                for pass_name in ("fwd", "fwd+bwd"):
                    for impl in impls:
                        if impl in SEPARABLE_ONLY:
                            continue
                        if impl in MATERIALISING and n > args.max_ref_n:
                            continue
                        cases.append({"critic": "concat", "dtype": dname, "n": n, "m": n,
                                      "layers": layers, "hidden": args.hidden, "dim": args.dim,
                                      "impl": impl, "pass": pass_name})
        for n in args.sep_ns:
            for pass_name in ("fwd", "fwd+bwd"):
                for impl in impls:
                    if impl in CONCAT_ONLY:
                        continue
                    if impl in MATERIALISING and n > 4 * args.max_ref_n:
                        continue
                    cases.append({"critic": "separable", "dtype": dname, "n": n, "m": n,
                                  "dim": args.sep_dim, "impl": impl, "pass": pass_name})
    return cases


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


def run_case(step, make_inputs, args, heavy: bool) -> dict:
    """time_call's result, or {"error": ...}; ``"fatal": True`` when the device is unusable
    afterwards (a sticky CUDA error: every later call would fail too)."""
    try:
        res = time_call(step, make_inputs, warmup=2 if heavy else args.warmup,
                        reps=args.reps, budget_s=args.budget)
    except torch.cuda.OutOfMemoryError:
        res = {"error": "OOM"}
    except Exception as exc:  # record and go on: one broken baseline must not end the run
        res = {"error": _describe(exc)}
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception as exc:
        why = f"device unusable after this case: {_describe(exc)}"
        res["error"] = f"{res['error']}; {why}" if "error" in res else why
        res["fatal"] = True
    return res


def chunk_rows(n, h, layers, dtype, budget_bytes=2 * 2**30) -> int:
    """Rows per chunk so that one chunk's pair activations stay near ``budget_bytes``."""
    per_row = n * h * torch.finfo(dtype).bits // 8 * (2 + 2 * layers)
    return max(1, min(n, budget_bytes // max(per_row, 1)))


def measure_case(case: dict, args, compiled_cache: dict) -> dict:
    """Time one planned case (run_case's result)."""
    fwd_only = case["pass"] == "fwd"
    dtype = DTYPES[case["dtype"]]
    n, impl = case["n"], case["impl"]
    try:
        if case["critic"] == "concat":
            chunk = chunk_rows(n, case["hidden"], case["layers"], dtype)
            step = concat_step(impl, n, fwd_only, chunk, compiled_cache)

            def make_inputs():
                return concat_inputs(n, case["dim"], case["hidden"], case["layers"], dtype,
                                     not fwd_only)
        else:
            chunk = max(1, min(n, (1 << 30) // (n * 4)))
            step = separable_step(impl, n, fwd_only, chunk, compiled_cache)

            def make_inputs():
                return separable_inputs(n, case["dim"], dtype, not fwd_only)
    except Exception as exc:
        return {"error": _describe(exc)}
    return run_case(step, make_inputs, args, heavy=impl in MATERIALISING)


def rate_row(row: dict, peak_tflops, basis: str) -> None:
    """Rate ``row`` against the matmul peak ``peak_tflops`` (``basis``: which measurement)."""
    if peak_tflops is None:
        return
    row["matmul_peak_tflops"] = peak_tflops
    row["matmul_peak_basis"] = basis
    if "tflops" in row:
        row["pct_peak"] = 100 * row["tflops"] / peak_tflops


def make_row(case: dict, res: dict, peak_tflops=None, autotune=None) -> dict:
    """One JSON row: the case's keys, the timing, rates by the DESIGN.md FLOP count."""
    row = {**case, **res}
    if autotune is not None and case["impl"].startswith("triton"):
        row["autotune"] = autotune
    if "ms" not in res:
        return row
    fwd_only = case["pass"] == "fwd"
    n, m, sec = case["n"], case.get("m", case["n"]), res["ms"] * 1e-3
    if case["critic"] == "concat":
        flops = concat_critic_flops(n, m, case["hidden"], case["layers"], case["dim"],
                                    case["dim"], backward=not fwd_only)
    else:
        flops = separable_critic_flops(n, m, case["dim"], backward=not fwd_only)
        if case["impl"] == "matmuls":  # the yardstick executes 8*N*M*D (forward: 2*N*M*D)
            row["executed_tflops"] = (2 if fwd_only else 8) * n * m * case["dim"] / sec / 1e12
            row["products"] = YARDSTICK[case["pass"]]
    row["flops"] = flops
    row["tflops"] = flops / sec / 1e12
    row["pairs_per_s"] = n * m / sec
    row["gpairs_s"] = n * m / sec / 1e9
    rate_row(row, peak_tflops, "start")
    return row


# what a ``matmuls`` row timed (rows without this field: files before 2026-12, G H^T + 3 S H)
YARDSTICK = {"fwd": "S = G H^T", "fwd+bwd": "S = G H^T; S = G H^T; dG = dS H; dH = dS^T G"}

HEADER = (f"{'critic':9s} {'dtype':5s} {'N':>6s} {'L':>2s} {'impl':15s} {'pass':8s} "
          f"{'ms':>9s} {'iqr ms':>8s} {'TFLOP/s':>8s} {'%peak':>6s} {'Gpairs/s':>9s} "
          f"{'peak MiB':>9s}")


def format_row(row: dict) -> str:
    """One printed line; L = 0 concat rows in pairs per second only (DESIGN.md: element-wise
    bound), their TFLOP/s stay in the JSON."""
    lead = (f"{row['critic']:9s} {row['dtype']:5s} {row['n']:6d} {row.get('layers', ''):>2} "
            f"{row['impl']:15s} {row['pass']:8s}")
    if "error" in row:
        return f"{lead} {row['error']}"
    if row["critic"] == "concat" and row.get("layers") == 0:
        rate = f"{'-':>8s} {'-':>6s}"
    else:
        pct = row.get("pct_peak")
        rate = f"{row['tflops']:8.1f} " + (f"{pct:6.1f}" if pct is not None else f"{'-':>6s}")
    return (f"{lead} {row['ms']:9.3f} {row.get('iqr_ms', float('nan')):8.3f} {rate} "
            f"{row['gpairs_s']:9.2f} {row.get('peak_extra_mib', float('nan')):9.1f}")


def write_json_atomic(path: Path, doc: dict) -> None:
    """Write ``doc`` to ``path`` through a temporary file and os.replace: a reader (or a kill)
    sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


UNITS = {
    "ms, min_ms, max_ms, q1_ms, q3_ms, iqr_ms, times_ms": "milliseconds, CUDA events",
    "tflops, matmul_peak_tflops, executed_tflops": "1e12 FLOP/s; tflops by DESIGN.md's count",
    "pct_peak": "100 * tflops / matmul_peak_tflops (the row's own peak)",
    "pairs_per_s": "N*M pairs per second (gpairs_s: the same / 1e9)",
    "peak_extra_bytes, peak_total_bytes": "bytes (extra: allocated during the call minus "
                                          "before it, inputs excluded)",
    "peak_extra_mib, peak_total_mib": "MiB = 2^20 bytes",
}
PEAK_NOTE = ("rows are rated against the larger of the matmul rates measured at the start and at "
             "the end of the run (the lower percentage: conservative for the '% of the matmul "
             "rate' targets); a run that did not complete has the start rate only "
             "(matmul_peak_basis per row)")


class ResultFile:
    """The run's JSON file, rewritten after every row, "complete": false until finish()."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.doc = {**header, "complete": False, "aborted": None, "finished": None,
                    "matmul_peak_tflops": {}, "matmul_peak": {"start": {}, "end": {},
                                                              "note": PEAK_NOTE},
                    "units": UNITS, "rows": [], "targets": [], "autotune_choices": None}
        self.write()

    @property
    def rows(self) -> list[dict]:
        return self.doc["rows"]

    def write(self) -> None:
        self.doc["targets"] = check_targets(self.rows)
        write_json_atomic(self.path, self.doc)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write()

    def finish(self, complete: bool, aborted=None) -> None:
        self.doc["complete"] = complete
        self.doc["aborted"] = aborted
        self.doc["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        try:
            self.doc["autotune_choices"] = _autotune_choices()
        except Exception as exc:  # never lose the rows over it
            self.doc["autotune_choices"] = {"error": _describe(exc)}
        self.write()


def device_info() -> dict:
    dev = torch.cuda.get_device_properties(0)
    return {"device": dev.name, "capability": f"{dev.major}.{dev.minor}"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 256, 1024 and separable N = 4096")
    p.add_argument("--ns", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--sep-ns", type=int, nargs="*", default=[4096, 16384, 65536],
                   help="separable critic N = M (none: no separable rows)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--dim", type=int, default=128, help="input width du = dv of the concat critic")
    p.add_argument("--sep-dim", type=int, default=512)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=None, metavar="IMPL",
                   help="of: " + " ".join(IMPLS) + "; default: " + " ".join(DEFAULT_IMPLS)
                        + " (cuda only where built); "
                        "one named here that this build lacks stops the run (exit 2)")
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
    p.add_argument("--check-targets", nargs="+", metavar="FILE.json", default=None,
                   help="no timing, no GPU: evaluate the issues' targets on the rows of these "
                        "result files together (a directory: its gpu_bench-*.json) and print "
                        "one line per target")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.check_targets is not None:
            return check_targets_cli(args.check_targets)
        if args.quick:
            args.ns, args.sep_ns = [256, 1024], [4096]
        info = factorcl_ext.build_info()
        impls, notes = resolve_impls(args.impls, info)
        cases = plan_cases(args, impls)
        if not cases:
            raise UsageError(f"nothing to time: no case for --impls {' '.join(impls)} with "
                             f"--ns {args.ns} --sep-ns {args.sep_ns}")
        idle = [i for i in impls if not any(c["impl"] == i for c in cases)]
        if args.impls is not None and idle:  # named, and nothing of it would be timed
            raise UsageError(f"nothing to time for --impls {' '.join(idle)} with --ns {args.ns} "
                             f"--sep-ns {args.sep_ns} (separable only: "
                             f"{', '.join(SEPARABLE_ONLY)})")
    except UsageError as exc:
        print(f"gpu_bench.py: {exc}", file=sys.stderr)
        return 2
    autotune = None
    if info.get("triton", True):
        from factorcl_ext.triton import _config as triton_config

        if args.no_autotune:
            triton_config.AUTOTUNE = False
        autotune = bool(triton_config.AUTOTUNE)

    if not torch.cuda.is_available():
        print("gpu_bench.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "the CPU benchmarks are benchmarks/cpu_table.py", file=sys.stderr)
        return 1
    torch.set_float32_matmul_precision(args.fp32_precision)
    dev = device_info()
    started = datetime.datetime.now()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (f"gpu_bench-{dev['device'].replace(' ', '_')}-"
                       f"{started.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json")
    result = ResultFile(path, {
        **dev, "started": started.isoformat(timespec="seconds"), "torch": torch.__version__,
        "triton": _triton_version(), "build_info": info, "fp32_precision": args.fp32_precision,
        "autotune": autotune, "impls": impls, "argv": sys.argv[1:] if argv is None else argv,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("FACTORCL", "TRITON"))},
    })
    print(f"# {dev['device']}, torch {torch.__version__}, fp32 precision {args.fp32_precision}, "
          f"Triton autotune {autotune}", flush=True)
    for note in notes:
        print(f"# note: {note}")
    for impl in impls:
        if not any(c["impl"] == impl for c in cases):
            print(f"# note: {impl}: no case in this run (critic, --ns / --sep-ns, --max-ref-n)")
    print(f"# {len(cases)} cases; {path} is rewritten after every row", flush=True)

    try:
        old_handler = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        old_handler = None
    status, aborted = 0, None
    try:
        peaks = result.doc["matmul_peak"]
        for name in args.dtypes:
            peaks["start"][name] = matmul_peak(DTYPES[name])
            result.doc["matmul_peak_tflops"][name] = peaks["start"][name]["tflops"]
        result.write()
        print("# dense matmul rate at the start: " + ", ".join(
            f"{k} {v['tflops']:.1f} TFLOP/s" for k, v in peaks["start"].items()))
        print("# %peak below: against that rate; the JSON and the targets: against the larger "
              "of the start and end rates")
        compiled_cache: dict = {}
        compile_every_case()  # one compiled function serves every N, L, dtype and pass
        print(HEADER, flush=True)
        for case in cases:
            res = measure_case(case, args, compiled_cache)
            row = make_row(case, res, result.doc["matmul_peak_tflops"].get(case["dtype"]),
                           autotune)
            result.add(row)
            print(format_row(row), flush=True)
            if row.get("fatal"):
                status, aborted = 3, f"stopped by a device error: {row['error']}"
                break
        if status == 0:
            try:
                for name in args.dtypes:
                    peaks["end"][name] = matmul_peak(DTYPES[name])
            except Exception as exc:  # keep the start rates
                peaks["end_error"] = _describe(exc)
            used = {k: max(v["tflops"], peaks["end"].get(k, v)["tflops"])
                    for k, v in peaks["start"].items()}
            basis = "max(start, end)" if "end_error" not in peaks else "start"
            result.doc["matmul_peak_tflops"] = used
            for row in result.rows:
                rate_row(row, used.get(row["dtype"]), basis)
            print("# dense matmul rate at the end: " + ", ".join(
                f"{k} {v['tflops']:.1f} TFLOP/s" for k, v in peaks["end"].items())
                + f"; used: {', '.join(f'{k} {v:.1f}' for k, v in used.items())}")
    except _Terminated:
        status, aborted = 143, "terminated by SIGTERM (a stage time limit?)"
    except BaseException as exc:  # KeyboardInterrupt, or a bug: keep what was measured
        aborted = f"stopped by {_describe(exc)}"
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        result.finish(complete=aborted is None, aborted=aborted)
        for rec in result.doc["targets"]:
            print("# target: " + format_target(rec))
        for kernel, choices in (result.doc["autotune_choices"] or {}).items():
            for c in choices if isinstance(choices, list) else []:
                print(f"# autotune {kernel} {','.join(c['key'])}: {c['config']}")
        print(f"# wrote {path}" + (f" (INCOMPLETE: {aborted})" if aborted else ""), flush=True)
    if status:
        print(f"gpu_bench.py: {aborted}", file=sys.stderr)
        return status
    if result.rows and all("error" in r for r in result.rows):
        print(f"gpu_bench.py: every timed row errored ({len(result.rows)} rows; see {path})",
              file=sys.stderr)
        return 1
    return 0


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


# --------------------------------------------------------------------------------------------
# the issues' targets: pure functions of result rows
# --------------------------------------------------------------------------------------------

CONCAT_CASE = {"critic": "concat", "dtype": "bf16", "n": 4096, "m": 4096, "layers": 1,
               "hidden": 512, "pass": "fwd+bwd"}
MEMORY_CASE = {**CONCAT_CASE, "n": 16384, "m": 16384}
SEPARABLE_CASE = {"critic": "separable", "dtype": "bf16", "n": 65536, "m": 65536, "dim": 512,
                  "pass": "fwd+bwd"}
MEMORY_LIMIT_BYTES = 1e9  # "under 1 GB": decimal gigabyte
RATE_FIELDS = ("ms", "tflops", "matmul_peak_tflops", "matmul_peak_basis", "pct_peak")
MEMORY_FIELDS = ("peak_extra_bytes", "peak_extra_mib", "peak_total_bytes")


def row_key(row: dict) -> dict:
    """The fields that identify a row (and its source file, where loaded from one)."""
    names = (("impl", "critic", "dtype", "layers", "n", "m", "hidden", "pass")
             if row.get("critic") == "concat" else ("impl", "critic", "dtype", "n", "m", "dim",
                                                    "pass"))
    key = {k: row.get(k) for k in names}
    key["m"] = row.get("m", row.get("n"))
    if "source" in row:
        key["source"] = row["source"]
    return key


def _case_text(impl: str, case: dict) -> str:
    shape = (f"H={case['hidden']} L={case['layers']}" if case["critic"] == "concat"
             else f"D={case['dim']}")
    return (f"{impl} {case['critic']} {case['dtype']} N=M={case['n']} {shape} "
            f"{case['pass']}")


def _matches(row: dict, impl: str, case: dict) -> bool:
    if row.get("impl") != impl:
        return False
    return all((row.get("m", row.get("n")) if k == "m" else row.get(k)) == v
               for k, v in case.items())


def _timed(row: dict) -> bool:
    ms = row.get("ms")
    return "error" not in row and isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0


def select_row(rows: list, impl: str, case: dict):
    """(row, None): the row of ``impl`` at ``case`` that the targets read, the last measured
    one if several (files in the order given); (None, why) where there is none, or only errored
    ones."""
    found = [r for r in rows if _matches(r, impl, case)]
    good = [r for r in found if _timed(r)]
    if good:
        return good[-1], None
    if found:
        return None, f"{_case_text(impl, case)} errored: {found[-1].get('error', 'no time')}"
    return None, f"no {_case_text(impl, case)} row"


def _peak_bytes(row: dict):
    if row.get("peak_extra_bytes") is not None:
        return row["peak_extra_bytes"]
    if row.get("peak_mb") is not None:  # files written before 2026-12: MiB under that name
        return row["peak_mb"] * 2**20
    return None


def _one_run(rows: list, needs) -> tuple[list, str | None]:
    """The rows of the last run (``source`` file; rows without one are one run) that timed
    every one of ``needs``: a ratio is measured side by side, never across runs (another process,
    another moment of a shared machine). (rows, None), or (all rows, why) where no run has them
    all, so that the record still names what is missing."""
    sources = list(dict.fromkeys(r.get("source") for r in rows))
    for source in reversed(sources):
        run = [r for r in rows if r.get("source") == source]
        if all(select_row(run, impl, case)[0] is not None for impl, case, _ in needs):
            return run, None
    found = []
    for impl, case, _ in needs:
        row, _why = select_row(rows, impl, case)
        if row is not None:
            found.append(f"{impl} in {row.get('source', 'the rows given')}")
    if len(found) < len(needs):
        return rows, None  # some row is missing altogether: _evaluate says which
    return rows, ("no run timed " + " and ".join(impl for impl, _, _ in needs)
                  + " side by side (a ratio is measured in one run): " + "; ".join(found))


def _evaluate(name, issue, description, comparison, threshold, unit, rows, needs, value_fn,
              detail_fn) -> dict:
    """One target record. ``needs``: [(impl, case, fields)], the rows of ``rows`` it reads (all
    from one run where there are several: :func:`_one_run`); ``value_fn`` maps those rows to
    (value or None, why not)."""
    rec = {"name": name, "issue": issue, "description": description, "comparison": comparison,
           "threshold": threshold, "unit": unit, "value": None, "passed": None,
           "status": "NOT MEASURED", "reason": None, "detail": None, "rows": []}
    if len(needs) > 1:
        rows, why = _one_run(rows, needs)
        if why is not None:
            rec["reason"] = why
            return rec
    picked, missing = [], []
    for impl, case, fields in needs:
        row, why = select_row(rows, impl, case)
        picked.append(row)
        if row is None:
            missing.append(why)
            continue
        rec["rows"].append({"key": row_key(row), "fields": {f: row.get(f) for f in fields},
                            "matching_rows": sum(_matches(r, impl, case) and _timed(r)
                                                 for r in rows)})
    if missing:
        rec["reason"] = "; ".join(missing)
        return rec
    value, why = value_fn(*picked)
    if value is None:
        rec["reason"] = why
        return rec
    passed = {">=": value >= threshold, "<=": value <= threshold, "<": value < threshold}
    rec.update(value=value, passed=bool(passed[comparison]), detail=detail_fn(*picked))
    rec["status"] = "PASS" if rec["passed"] else "FAIL"
    return rec


def _peak_tflops(row, fallback_peaks):
    """The matmul rate ``row`` is rated against: its own, else ``fallback_peaks``' for its dtype."""
    return row.get("matmul_peak_tflops") or (fallback_peaks or {}).get(row.get("dtype"))


def _pct(row, fallback_peaks):
    peak = _peak_tflops(row, fallback_peaks)
    if not peak or row.get("tflops") is None:
        return None, f"{_case_text(row['impl'], CONCAT_CASE)}: no matmul peak or TFLOP/s"
    return 100 * row["tflops"] / peak, None


def check_targets(rows: list, matmul_peaks=None) -> list[dict]:
    """The H100 targets of the Triton and CUDA issues, evaluated on ``rows`` (from one run or
    several). Each row is rated against its own ``matmul_peak_tflops`` (the run that measured
    it); ``matmul_peaks`` {dtype: TFLOP/s} serves rows that lack one. Returns one record per
    target, always all of them: PASS, FAIL or NOT MEASURED with the reason."""
    rows = list(rows)
    out = []

    def rate_target(impl, threshold):
        def value(r):
            return _pct(r, matmul_peaks)

        def detail(r):
            peak = _peak_tflops(r, matmul_peaks)
            return (f"{r['ms']:.3f} ms, {r['tflops']:.1f} of {peak:.1f} TFLOP/s "
                    f"({r.get('matmul_peak_basis', 'given')} matmul rate)")
        return _evaluate(f"{impl}_concat_rate", impl,
                         f"{_case_text(impl, CONCAT_CASE)}: % of the dense bf16 matmul rate",
                         ">=", threshold, "% of the dense matmul rate",
                         rows, [(impl, CONCAT_CASE, RATE_FIELDS)], value, detail)

    def time_ratio(name, impl, other, description, comparison, threshold, speedup):
        """``impl``'s concat time against ``other``'s: ``other / impl`` (a speed-up) or
        ``impl / other``."""
        num, den = (other, impl) if speedup else (impl, other)
        return _evaluate(
            name, impl, f"{_case_text(impl, CONCAT_CASE)}: {description}", comparison, threshold,
            f"x ({num} ms / {den} ms)", rows,
            [(impl, CONCAT_CASE, ("ms",)), (other, CONCAT_CASE, ("ms",))],
            lambda a, b: ((b["ms"] / a["ms"]) if speedup else (a["ms"] / b["ms"]), None),
            lambda a, b: f"{impl} {a['ms']:.3f} ms, {other} {b['ms']:.3f} ms")

    out.append(rate_target("triton", 50.0))
    out.append(time_ratio("triton_concat_vs_chunked", "triton", "chunked",
                          "speed-up over the row-chunked cuBLAS baseline", ">=", 2.0,
                          speedup=True))

    def memory(r):
        b = _peak_bytes(r)
        return (None, f"{_case_text('triton', MEMORY_CASE)}: no peak memory recorded") \
            if b is None else (float(b), None)
    out.append(_evaluate(
        "triton_concat_memory", "triton",
        f"{_case_text('triton', MEMORY_CASE)}: peak extra memory of the call",
        "<", MEMORY_LIMIT_BYTES, "bytes (1 GB = 1e9 bytes)",
        rows, [("triton", MEMORY_CASE, MEMORY_FIELDS)], memory,
        lambda r: f"{_peak_bytes(r) / 2**20:.1f} MiB; process peak "
                  f"{(r.get('peak_total_bytes') or 0) / 2**20:.1f} MiB"))
    out.append(_evaluate(
        "triton_separable_vs_matmuls", "triton",
        f"{_case_text('triton', SEPARABLE_CASE)}: time over the four plain products",
        "<=", 1.5, "x (triton ms / matmuls ms)",
        rows, [("triton", SEPARABLE_CASE, ("ms",)),
               ("matmuls", SEPARABLE_CASE, ("ms", "products"))],
        lambda t, m: (t["ms"] / m["ms"], None),
        lambda t, m: f"triton {t['ms']:.3f} ms, four matmuls {m['ms']:.3f} ms"
                     + ("" if m.get("products") else "; the matmuls row is the older "
                        "yardstick, G H^T and three S H")))
    out.append(rate_target("cuda", 60.0))
    out.append(time_ratio("cuda_concat_vs_triton", "cuda", "triton",
                          "time over the Triton backend's", "<=", 1.0, speedup=False))
    return out


def format_target(rec: dict) -> str:
    """One line: PASS / FAIL / NOT MEASURED, the target, the value against the threshold."""
    head = f"{rec['status']:12s} {rec['name']}: {rec['description']}"
    if rec["status"] == "NOT MEASURED":
        return f"{head}: not measured: {rec['reason']}"
    if rec["unit"].startswith("bytes"):
        value = (f"{rec['value']:.0f} bytes = {rec['value'] / 1e9:.3f} GB {rec['comparison']} "
                 f"{rec['threshold'] / 1e9:g} GB")
    elif rec["unit"].startswith("%"):
        value = f"{rec['value']:.1f} % {rec['comparison']} {rec['threshold']:g} %"
    else:
        value = f"{rec['value']:.2f}x {rec['comparison']} {rec['threshold']:g}x"
    return f"{head}: {value} ({rec['detail']})"


def load_results(paths) -> tuple[list[dict], list[dict]]:
    """Rows of gpu_bench.py result files (a directory: its gpu_bench-*.json), each tagged with
    its ``source``; rows of files written before 2026-12 get their file's matmul rate and
    peak_extra_bytes from peak_mb (MiB). Also one summary per file. UsageError if unreadable."""
    files = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("gpu_bench-*.json")) if p.is_dir() else [p])
    if not files:
        raise UsageError(f"no result files in {' '.join(map(str, paths))}")
    rows, summaries = [], []
    for path in files:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {path}: {_describe(exc)}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
            raise UsageError(f"{path}: not a gpu_bench.py result (no 'rows' list)")
        peaks = doc.get("matmul_peak_tflops") or {}
        for r in doc["rows"]:
            r = dict(r, source=str(path))
            r.setdefault("m", r.get("n"))
            if "matmul_peak_tflops" not in r and peaks.get(r.get("dtype")):
                rate_row(r, peaks[r["dtype"]], "file")
            if "peak_extra_bytes" not in r and r.get("peak_mb") is not None:
                r["peak_extra_bytes"] = r["peak_mb"] * 2**20
                r["peak_extra_mib"] = r["peak_mb"]
            rows.append(r)
        summaries.append({"path": str(path), "device": doc.get("device"),
                          "rows": len(doc["rows"]), "complete": doc.get("complete", True),
                          "aborted": doc.get("aborted")})
    return rows, summaries


def check_targets_cli(paths) -> int:
    """--check-targets: the targets on the rows of several result files; exit 0 once read."""
    try:
        rows, summaries = load_results(paths)
    except UsageError as exc:
        print(f"gpu_bench.py: {exc}", file=sys.stderr)
        return 2
    for s in summaries:
        state = "complete" if s["complete"] else f"INCOMPLETE ({s['aborted'] or 'cut short'})"
        print(f"# {s['path']}: {s['rows']} rows, {state}, {s['device']}")
    devices = {s["device"] for s in summaries}
    if len(devices) > 1:
        print(f"# warning: rows from different devices: {sorted(map(str, devices))}")
    for rec in check_targets(rows):
        print("# target: " + format_target(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
