"""Where the Triton backward kernels spend their time, without hardware counters.

    python benchmarks/triton_bwd_ablation.py             # GPU: N = 4096, H = 512, L = 1, bf16
    python benchmarks/triton_bwd_ablation.py --n 4096 --configs 0 3 --variants full no_dw_update
    python benchmarks/triton_bwd_ablation.py --critic separable --n 65536 --hidden 512
    TRITON_INTERPRET=1 python benchmarks/triton_bwd_ablation.py --check  # CPU: run each variant
    python benchmarks/triton_bwd_ablation.py --compile   # CPU: compile every variant for sm_90

On a GPU it times variants of ``mlp_bwd_kernel`` that leave one stage out or change how it is
done (device/METHOD.md: "time variants that leave one stage out ... and take differences"), for
each tile configuration of the device's list, with ``time_median`` (the median by
``triton.testing.do_bench``'s method, the backward's accumulation buffers zeroed before each run
outside the timed region), and prints a table: milliseconds, the backward's useful TFLOP/s
(4*L*H^2 per pair, DESIGN.md's count: forward+backward 6*L*H^2 less the forward's 2*L*H^2) and
the difference to ``full``. Exit status 1 when a (configuration, variant) failed.

Variants (edits of factorcl_ext/triton/_mlp_kernels.py made here, in a temporary module; the
package's kernel is not touched; each edit names the exact text it replaces and fails loudly if
the kernel no longer contains it):

- ``full``: the kernel's row pass with dB by float32 atomics and the weight gradient added into
  each program's float32 slot tile by tile (``FACTORCL_TRITON_DW=slots``; the only form before
  session 5);
- ``dw_chunk``: the production default since session 5 (``FACTORCL_TRITON_DW=chunk``): the
  same row pass without the slot updates, leaving each chunk's dz in a buffer, and
  ``mlp_dw_kernel`` reducing it per chunk (all chunks and their dW launches are timed);
- ``no_dw_update``: without the hidden weights' gradient (its tl.dot and its slot update);
- ``dw_dot_only``: the weight-gradient tl.dot, its result never stored (a store under a
  condition the compiler cannot decide, never true), so no slot traffic;
- ``dw_store_no_load``: the slot update as a plain store (half the traffic, no dependent load;
  wrong values, timing only);
- ``dw_atomic_slots``: float32 atomic adds into ``--slots`` shared slots (program p -> slot
  p mod slots) instead of a read-modify-write of the program's own slot: fewer slots that fit L2,
  order not fixed (a candidate for the non-deterministic mode; values are right);
- ``no_db_atomic``: without dB (ATOMIC_DB off);
- ``db_atomic_acq_rel``: the dB atomics with Triton's default ``sem="acq_rel"`` (the kernel uses
  ``relaxed`` since session 4; acq_rel puts MEMBAR.ALL.GPU and CCTL.IVALL around each one);
- ``full_grid2``: as shipped, with twice the persistent programs (2 per SM; twice the slots);
- ``forward``: the forward kernel with the same tile, for scale; ``forward_grid2``: with 2
  programs per SM (the forward keeps no slots for L <= 1, so its grid need not be capped at one
  program per SM; 8 warps per SM may be too few to hide the latency of each wgmma wait).

Separable critic (``--critic separable``, N = M, D = ``--hidden``; ``dot_bwd_kernel``):
``full``; ``no_dh_atomic`` (without dH); ``dh_store_not_atomic`` (dH by plain stores: atomics
against stores; wrong values, timing only); ``full_grid2``; ``dh_atomic_acq_rel`` (the dH
atomics as before session 4, acq_rel); ``dg_store_no_load`` (the dG update without its load);
``forward``, ``forward_grid2``. Useful backward FLOPs there: 4*N*M*D.

``--check`` (any device, meant for the interpreter): runs each variant of both critics once on a
small shape and checks that ``full`` and ``dw_atomic_slots`` give the production op's gradients
(float64).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from factorcl_ext.triton import _config, ops  # noqa: E402

KERNELS = ROOT / "factorcl_ext" / "triton"

_DW_UPDATE = """\
                            if not COL_PASS and not DW_CHUNK:
                                gw = tl.dot(tl.trans(dz), h_in.to(w.dtype), input_precision=PREC,
                                            out_dtype=ACC)
                                pw = (dWp + _row_offsets(l * H, H, I64)
                                      + _row_offsets(rn[:, None], H, I64) + rk[None, :])
                                mw = mn[:, None] & mk[None, :]
                                tl.store(pw, tl.load(pw, mask=mw, other=0.0) + gw, mask=mw)
"""
_DW_HEAD = _DW_UPDATE.rsplit("                                tl.store", 1)[0]
_DB_ATOMIC = '            tl.atomic_add(pb, tl.sum(d3, axis=0), mask=mb, sem="relaxed")\n'

EDITS = {
    "full": [],
    "no_dw_update": [(_DW_UPDATE, "")],
    "dw_dot_only": [(_DW_UPDATE, _DW_HEAD + """\
                                if N < 0:
                                    tl.store(pw, gw, mask=mw)
""")],
    "dw_store_no_load": [(_DW_UPDATE, _DW_HEAD + """\
                                tl.store(pw, gw, mask=mw)
""")],
    "dw_atomic_slots": [
        ("    dWp = dW_ptr + gp * L * H * H\n",
         "    dWp = dW_ptr + (gp % DW_SLOTS) * L * H * H\n"),
        ("                   BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):\n"  # noqa: E501
         '    """Recomputing backward',
         "                   BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,\n"  # noqa: E501
         "                   DW_SLOTS: tl.constexpr):\n"
         '    """Recomputing backward'),
        (_DW_UPDATE, _DW_HEAD + """\
                                tl.atomic_add(pw, gw, mask=mw, sem="relaxed")
"""),
    ],
    "dw_chunk": [],
    "no_db_atomic": [],
    "full_grid2": [],
    "db_atomic_acq_rel": [(_DB_ATOMIC, _DB_ATOMIC.replace('sem="relaxed"', 'sem="acq_rel"'))],
}
_DG_UPDATE = "                    tl.store(pg, tl.load(pg, mask=mg, other=0.0) + dg, mask=mg)\n"
_DH_ATOMIC = ("                        tl.atomic_add(dH_ptr + _row_offsets(rj[:, None], D, I64) + rd[None, :],\n"  # noqa: E501
              '                                      dh, mask=mj[:, None] & md[None, :], sem="relaxed")')  # noqa: E501
DOT_EDITS = {
    "full": [],
    "no_dh_atomic": [],
    "full_grid2": [],
    "dh_store_not_atomic": [(_DH_ATOMIC, _DH_ATOMIC.replace("tl.atomic_add(", "tl.store(")
                             .replace(', sem="relaxed"', ""))],
    "dh_atomic_acq_rel": [(_DH_ATOMIC, _DH_ATOMIC.replace('sem="relaxed"', 'sem="acq_rel"'))],
    "dg_store_no_load": [(_DG_UPDATE, "                    tl.store(pg, dg, mask=mg)\n")],
}
CRITICS = {  # critic -> (kernel source, edits)
    "concat": ("_mlp_kernels.py", EDITS),
    "separable": ("_dot_kernels.py", DOT_EDITS),
}
FORWARDS = ["forward", "forward_grid2"]
VARIANTS = sorted({*EDITS, *DOT_EDITS, *FORWARDS}, key=[*EDITS, *DOT_EDITS, *FORWARDS].index)


def variants_of(critic: str) -> list[str]:
    return [*CRITICS[critic][1], *FORWARDS]


def programs(a, variant: str) -> int:
    """The persistent grid: one program per SM as the ops launch it; twice that for *_grid2."""
    return a.g_row * (2 if variant.endswith("_grid2") else 1)


def load_variant(critic: str, name: str, tmp: Path):
    """The kernels module with variant ``name``'s edits, imported from a file (Triton reads a
    kernel's source through inspect)."""
    file, edits = CRITICS[critic]
    src = (KERNELS / file).read_text().replace("from ._common import",
                                               "from factorcl_ext.triton._common import")
    for old, new in edits.get(name, []):
        if src.count(old) != 1:
            raise SystemExit(f"variant {name}: the kernel no longer contains the text it edits "
                             f"({src.count(old)} matches of {old.splitlines()[0].strip()!r}...)")
        src = src.replace(old, new)
    path = tmp / f"{critic}_kernels_{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"_fcl_ablation_{critic}_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_problem(n: int, d_hidden: int, layers: int, dtype, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    h = d_hidden
    A, B = r(n, h), r(n, h)
    Ws = [r(h, h, scale=h ** -0.5) for _ in range(layers)]
    bs = [r(h, scale=0.1) for _ in range(layers)]
    w_out, b_out = r(h, scale=h ** -0.5), r((), scale=0.1)
    return A, B, Ws, bs, w_out, b_out


def launcher(mod, variant: str, a: "ops._MlpArgs", cfg, slots: int):
    """A zero-argument function that runs one backward (or forward) launch of ``variant``."""
    N, M, H, L = a.N, a.M, a.H, a.L
    G = programs(a, variant)
    kw = dict(a.constexprs(), **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dev = a.A.device
    g = torch.Generator().manual_seed(1)  # the same upstream values for every variant
    lse, *grads = [torch.randn(N, generator=g, dtype=torch.float64).to(dev, a.acc)
                   for _ in range(4)]
    if variant.startswith("forward"):
        z, zps, zls = a.scratch(G, L if L >= 2 else 0)
        outs = [a.A.new_empty(N, dtype=a.acc) for _ in range(3)]

        def run():
            mod.mlp_fwd_kernel[(G,)](a.A, a.B, a.W, a.Bias, a.w_out, a.b_out, z, *outs,
                                     N, M, H, a.pos_offset, zps, zls, **kw)
            return outs
        return run
    acc = dict(device=dev, dtype=a.acc)
    bufs = [torch.zeros(N, H, **acc), torch.zeros(M, H, **acc),
            torch.zeros((G, L, H, H) if L else (1,), **acc),
            torch.zeros((G, L, H) if L else (1,), **acc),
            torch.zeros(G, H, **acc), torch.zeros(G, **acc)]
    kw.update(COL_PASS=False, ATOMIC_DB=variant != "no_db_atomic", SCALED=a.scaled)
    if variant == "dw_chunk":
        tile = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

        def launch_bwd(grid, args, kwargs):
            mod.mlp_bwd_kernel[grid](*args, **kwargs, **tile)

        def launch():
            return ops._mlp_row_pass_chunked(a, lse, grads, bufs, a.bwd_constexprs() | dict(
                COL_PASS=False, ATOMIC_DB=True), False, 1, launch_bwd)
        return _with_reset(bufs, launch, lambda dws: (
            [*bufs[:2], torch.stack(dws)[None], *bufs[3:]], lse, grads))
    z, zps, zls = a.scratch(G, L)
    kw["DW_CHUNK"] = False
    if variant == "dw_atomic_slots":
        kw["DW_SLOTS"] = slots

    def launch():
        mod.mlp_bwd_kernel[(G,)](a.A, a.B, a.W, a.Bias, a.w_out, a.b_out, z, z, lse, *grads,
                                 *bufs, a.scale, N, M, H, a.pos_offset, zps, zls, 0, N, 0, M, 0,
                                 **kw)
    return _with_reset(bufs, launch, lambda _: (bufs, lse, grads))


def _with_reset(bufs, launch, result):
    """``run()``: zero the accumulation buffers, launch, return ``result(launch's value)``.
    ``run.reset`` and ``run.launch`` apart, so that a timer zeroes outside its timed region
    (time_median); the forward launchers have no ``reset``."""
    def reset():
        for b in bufs:
            b.zero_()

    def run():
        reset()
        return result(launch())
    run.reset, run.launch = reset, launch
    return run


def time_median(fn, warmup_ms: float = 100, rep_ms: float = 500, device: str = "cuda") -> float:
    """Median milliseconds of ``fn.launch()`` (or ``fn()``) by CUDA events: the method of
    ``triton.testing.do_bench(fn, warmup, rep, return_mode="median")`` (L2 flushed before each
    run), with ``fn.reset()`` (zeroing the output buffers) before each run, outside the events:
    do_bench would time the zeroing as part of the kernel."""
    reset = getattr(fn, "reset", lambda: None)
    launch = getattr(fn, "launch", fn)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)  # the L2 flush

    def timed(k):
        times = []
        for _ in range(k):
            reset()
            flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            launch()
            end.record()
            times.append((start, end))
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in times]

    reset()
    launch()  # compilation and autotuning, outside the estimate (as do_bench)
    torch.cuda.synchronize()
    estimate = statistics.median(timed(5))
    timed(max(1, int(warmup_ms / max(estimate, 1e-3))))
    return statistics.median(timed(max(1, int(rep_ms / max(estimate, 1e-3)))))


def dot_launcher(mod, variant: str, a: "ops._DotArgs", cfg):
    """A zero-argument function that runs one separable backward (or forward) launch."""
    N, M, D = a.N, a.M, a.D
    G = programs(a, variant)
    kw = dict(a.constexprs(), **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dev = a.G.device
    g = torch.Generator().manual_seed(1)
    lse, *grads = [torch.randn(N, generator=g, dtype=torch.float64).to(dev, a.acc)
                   for _ in range(4)]
    if variant.startswith("forward"):
        outs = [a.G.new_empty(N, dtype=a.acc) for _ in range(3)]

        def run():
            mod.dot_fwd_kernel[(G,)](a.G, a.H, *outs, *a.head(), **kw)
            return outs
        return run
    bufs = [torch.zeros(N, D, device=dev, dtype=a.acc), torch.zeros(M, D, device=dev, dtype=a.acc)]
    scale, inv = ops._ds_scale(a, grads)  # 16-bit: the buffers hold the gradients times scale
    kw.update(COL_PASS=False, ATOMIC_DH=variant != "no_dh_atomic", SCALED=inv is not None)

    def launch():
        mod.dot_bwd_kernel[(G,)](a.G, a.H, lse, *grads, *bufs, scale, *a.head(), **kw)
    return _with_reset(bufs, launch, lambda _: (bufs, lse, grads))


def check_separable(tmp: Path) -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    Gm, Hm = (torch.randn(n, 20, generator=gen, dtype=torch.float64).to(dev) for n in (37, 37))
    a = ops._DotArgs(Gm, Hm, 0, None, False)
    for name in variants_of("separable"):
        out = dot_launcher(load_variant("separable", name, tmp), name, a, a.configs[0])()
        if name in ("full", "full_grid2"):
            (dG, dH), lse, (g_lse, g_pos, g_row) = out
            want = ops._dot_backward(a, lse, g_lse, g_pos, g_row)
            for w, g_, what in zip(want, (dG, dH), ("dG", "dH")):
                err = ((g_ - w).norm() / w.norm()).item()
                if not err < 1e-10:
                    raise SystemExit(f"separable {name}: {what} relative error {err:.2e}")
        print(f"separable {name}: ran"
              + (" and matches the op" if name in ("full", "full_grid2") else ""))


# concat variants whose values are right
CHECKED = ("full", "dw_atomic_slots", "dw_chunk", "full_grid2")


def check(tmp: Path, slots: int) -> None:
    """Each variant runs; those in CHECKED match the production backward. The
    small shape gives 3 programs: ``slots`` = 2 makes two of them share a slot."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n, h, layers = 11, 24, 1
    p = make_problem(n, h, layers, torch.float64, dev)
    a = ops._MlpArgs(*p, "relu", "none", 0, False)
    cfg = a.configs[0]
    want = None
    for name in variants_of("concat"):
        mod = load_variant("concat", name, tmp)
        out = launcher(mod, name, a, cfg, slots)()
        if name in CHECKED:
            bufs, lse, (g_lse, g_pos, g_row) = out
            got = [bufs[0], bufs[1], bufs[2].sum(0), bufs[3].sum(0), bufs[4].sum(0), bufs[5].sum()]
            if want is None:
                want = ops._mlp_backward(a, lse, g_lse, g_pos, g_row)
                want = [want[0], want[1], torch.stack(want[2]), torch.stack(want[3]), want[4],
                        want[5]]
            for w, g_, what in zip(want, got, ("dA", "dB", "dW", "dBias", "dWout", "dBout")):
                err = ((g_ - w).norm() / w.norm().clamp_min(1e-30)).item()
                if not err < 1e-10:
                    raise SystemExit(f"{name}: {what} relative error {err:.2e} against the op")
        print(f"concat {name}: ran" + (" and matches the op" if name in CHECKED else ""))
    check_separable(tmp)
    print("check passed")


def table(args, tmp: Path, bench, device: str) -> int:
    """Time every (configuration, variant) with ``bench(fn) -> ms`` and print the table; return
    how many failed."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             "fp64": torch.float64}[args.dtype]
    variants = args.variants or variants_of(args.critic)
    bad = [v for v in variants if v not in variants_of(args.critic)]
    if bad:
        raise SystemExit(f"not variants of the {args.critic} critic: {bad}")
    mods = {v: load_variant(args.critic, v, tmp) for v in variants}
    if args.critic == "concat":
        a = ops._MlpArgs(*make_problem(args.n, args.hidden, args.layers, dtype, device),
                         "relu", "none", 0, False)
        useful = 4 * args.layers * args.hidden ** 2 * args.n * args.n  # backward's share
        shape = f"H = {args.hidden}, L = {args.layers}"

        def make(v, cfg):
            return launcher(mods[v], v, a, cfg, args.slots)
        configs = a.configs
    else:
        Gm, Hm = (torch.randn(args.n, args.hidden, device=device, dtype=dtype) for _ in "gh")
        a = ops._DotArgs(Gm, Hm, 0, None, False)
        useful = 4 * args.n * args.n * args.hidden
        shape = f"D = {args.hidden}"

        def make(v, cfg):
            return dot_launcher(mods[v], v, a, cfg)
        configs = _config.DOT_BWD_CONFIGS[a.family]  # the fused backward's tiles
    idx = args.configs if args.configs else range(len(configs))
    name = torch.cuda.get_device_properties(0).name if device == "cuda" else device
    print(f"# {args.critic} critic, {name}, {args.dtype}, N = M = {args.n}, {shape}, "
          f"{a.g_row} programs, torch {torch.__version__}")
    print("| config | variant | ms (median) | bwd useful TFLOP/s | minus full, ms |")
    print("|---|---|---|---|---|")
    failed = 0
    for i in idx:
        cfg = configs[i]
        full_ms = None
        for v in variants:
            try:
                ms = bench(make(v, cfg))
            except Exception as e:  # a tile that does not compile for this variant
                print(f"| {i} | {v} | failed: {type(e).__name__}: {str(e)[:80]} | | |")
                failed += 1
                continue
            if v == "full":
                full_ms = ms
            fwd = v.startswith("forward")
            rate = f"{useful / (ms * 1e-3) / 1e12:.1f}" if not fwd else "-"
            diff = f"{ms - full_ms:+.2f}" if full_ms is not None and v != "full" and not fwd else ""
            print(f"| {i} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages} | {v} | {ms:.2f} "
                  f"| {rate} | {diff} |", flush=True)
    return failed


def compile_variants(tmp: Path, arch: int = 90) -> list[str]:
    """Compile every variant of both critics ahead of time for ``arch`` (no GPU needed, no
    interpreter): a variant whose edit breaks lowering fails here, not on a GPU lease. Returns
    one line per variant."""
    spec = importlib.util.spec_from_file_location(
        "triton_compile_check", ROOT / "benchmarks" / "triton_compile_check.py")
    cc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cc)
    out = []
    for critic, (_, edits) in CRITICS.items():
        for name in edits:
            mod = load_variant(critic, name, tmp)
            if critic == "concat":
                cfg = _config.MLP_HOPPER[0]
                kernel, sig = mod.mlp_bwd_kernel, cc.mlp_signature(mod.mlp_bwd_kernel, "bf16")
                cx = dict(L=1, ACT=0, OUT=0, HAS_POS=True, PREC="ieee", I64=False, COL_PASS=False,
                          ATOMIC_DB=name != "no_db_atomic", DW_CHUNK=name == "dw_chunk")
                if name == "dw_atomic_slots":
                    cx["DW_SLOTS"] = 8
            else:
                cfg = _config.DOT_HOPPER[0]
                kernel, sig = mod.dot_bwd_kernel, cc.dot_signature(mod.dot_bwd_kernel, "bf16")
                cx = dict(HAS_POS=True, HAS_EXCL=False, PREC="ieee", I64=False, COL_PASS=False,
                          ATOMIC_DH=name != "no_dh_atomic")
            k = cc.compile_kernel(kernel, sig, cx, cfg, arch)
            ops = cc.sass_counts(k.asm["cubin"])
            out.append(f"{critic} {name}: " + " ".join(f"{o}={v}" for o, v in ops.items() if v))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--critic", choices=list(CRITICS), default="concat")
    ap.add_argument("--n", type=int, default=4096, help="N = M")
    ap.add_argument("--hidden", type=int, default=512, help="H (concat) or D (separable)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--configs", type=int, nargs="*", help="indices into the device's tile list")
    ap.add_argument("--variants", nargs="*", choices=VARIANTS,
                    help="default: all of the critic's")
    ap.add_argument("--slots", type=int, default=8,
                    help="shared slots of dw_atomic_slots (--check: use 2, fewer than programs)")
    ap.add_argument("--check", action="store_true",
                    help="run each variant once on a small shape and check two against the op")
    ap.add_argument("--compile", action="store_true",
                    help="compile every variant for sm_90 without a GPU and print its SASS counts")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if args.compile:
            for line in compile_variants(tmp):
                print(line, flush=True)
            return
        if args.check:
            check(tmp, args.slots)
            # the table's code path on a tiny float64 problem, each launch run once, not timed
            device = "cuda" if torch.cuda.is_available() else "cpu"
            for critic in CRITICS:
                small = argparse.Namespace(**{**vars(args), "critic": critic, "n": 9, "hidden": 20,
                                              "dtype": "fp64", "configs": [0], "variants": None})
                if table(small, tmp, lambda fn: (fn(), 1.0)[1], device):
                    raise SystemExit(f"{critic}: a variant failed in the table")
            return
        if not torch.cuda.is_available() or _config.INTERPRETED:
            raise SystemExit("timing needs a GPU (use --check under TRITON_INTERPRET=1)")
        failed = table(args, tmp, time_median, "cuda")
        if failed:
            raise SystemExit(f"{failed} (configuration, variant) timings failed (see the table)")


if __name__ == "__main__":
    main()
