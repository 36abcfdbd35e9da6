"""Compile the Triton kernels ahead of time for sm90 / sm80, without a GPU, and print each
variant's registers, spills, shared memory and what its machine code (SASS) holds: a check that
every kernel lowers for a real target (the interpreter does not lower anything) and a look at
what a GPU would run.

    python benchmarks/triton_compile_check.py              # first config of each list, all dtypes
    python benchmarks/triton_compile_check.py --all-configs --dtypes bf16 --layers 1
    python benchmarks/triton_compile_check.py --act tanh     # the concat kernels with tanh

The kernels are compiled as a launch specialises them when every pointer is 16-byte aligned and
every integer argument a multiple of 16 (N, M, H = 4096, 512, ...): Triton marks such arguments
divisible by 16, which is what lets it vectorise loads and pipeline them with cp.async (without
it the same kernels compile to 2-byte loads and no pipelining, and the report would describe
code that never runs). ``loop=Ni:I/W`` per innermost wgmma loop (sm90): N instructions per
iteration, about I cycles to issue them against W cycles of tensor-core work (hgmma_loops).
SASS counts: HGMMA (Hopper tensor-core instructions), HMMA (mma.sync), REDG/ATOMG (global
reductions / atomics), MEMBAR.ALL.GPU and CCTL.IVALL (the GPU-wide fence and L1 invalidation
that acq_rel atomics bring), LDL/STL (local memory: spills).

Must run without TRITON_INTERPRET (it needs the real @triton.jit functions).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: this script compiles the kernels for a GPU target")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from factorcl_ext.triton import _config  # noqa: E402
from factorcl_ext.triton._common import ACT_CODES  # noqa: E402
from factorcl_ext.triton._dot_kernels import (  # noqa: E402
    dot_bwd_kernel,
    dot_ds_kernel,
    dot_fwd_kernel,
)
from factorcl_ext.triton._mlp_kernels import (  # noqa: E402
    mlp_bwd_kernel,
    mlp_dw_kernel,
    mlp_fwd_kernel,
)

TL = {"bf16": "bf16", "f16": "fp16", "f32": "fp32", "f64": "fp64"}


def acc_of(dt: str) -> str:
    return "fp64" if dt == "f64" else "fp32"


def mlp_signature(kernel, dt: str) -> dict:
    t, a = TL[dt], acc_of(dt)
    sig = {}
    for name in kernel.arg_names:
        if name in ("A_ptr", "B_ptr", "W_ptr", "Bias_ptr", "Wout_ptr", "Bout_ptr", "Z_ptr",
                    "Hin_ptr", "Dz_ptr"):
            sig[name] = "*" + t
        elif name.endswith("_ptr"):
            sig[name] = "*" + a
        else:
            sig[name] = "i32"
    return sig


def dot_signature(kernel, dt: str) -> dict:
    t, a = TL[dt], acc_of(dt)
    sig = {}
    for name in kernel.arg_names:
        if name in ("G_ptr", "H_ptr", "dS_ptr"):
            sig[name] = "*" + t
        elif name.endswith("_ptr"):
            sig[name] = "*" + a
        else:
            sig[name] = "i32"
    return sig


SASS_OPS = ("HGMMA", "HMMA", "REDG", "ATOMG", "MEMBAR.ALL.GPU", "CCTL.IVALL", "LDL", "STL")


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def _resource_usage(cubin: bytes):
    """(registers, stack bytes) per thread, read from the cubin with the bundled cuobjdump."""
    import re

    out = _cuobjdump(cubin, "-res-usage")
    regs = re.search(r"REG:(\d+)", out)
    spill = re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else "?"), (int(spill.group(1)) if spill else "?")


@functools.lru_cache(maxsize=4)
def _instructions(cubin: bytes) -> list[tuple[int, str]]:
    """(address, text) of every instruction of the kernel's SASS (one cuobjdump per cubin, shared
    by sass_counts and hgmma_loops)."""
    import re

    out = []
    for line in _cuobjdump(cubin, "-sass").splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?);", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def sass_counts(cubin: bytes) -> dict:
    """How many instructions of each SASS_OPS kind the kernel's machine code holds."""
    import re

    ops = [re.match(r"(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", text).group(1)
           for _, text in _instructions(cubin)]
    return {name: sum(1 for op in ops if op == name or op.startswith(name + "."))
            for name in SASS_OPS}


def hgmma_loops(cubin: bytes, num_warps: int) -> list[dict]:
    """The innermost loops of the machine code that hold Hopper tensor-core instructions, each
    with its instructions per iteration, its wgmma FLOPs per block and two estimates in cycles
    per iteration: ``issue`` = instructions x warps / 4 (an SM issues one warp instruction per
    cycle on each of its 4 schedulers) and ``wgmma`` = FLOPs / 4096 (an H100 SXM's dense
    16-bit tensor-core rate per SM per cycle, 989 TFLOP/s over 132 SMs at 1.83 GHz; TF32 at
    half that rate, so its FLOPs count twice). A loop whose issue estimate passes its wgmma
    estimate keeps the tensor cores waiting on the other instructions of the loop. Estimates
    from instruction counts, not measurements."""
    import re

    ins = _instructions(cubin)
    back = []  # (target, branch address) of every backward branch
    for addr, text in ins:
        m = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            back.append((int(m.group(1), 16), addr))
    with_mma = [(a, b) for a, b in back
                if any("HGMMA" in t for x, t in ins if a <= x <= b)]
    loops = []
    for a, b in with_mma:
        if any(a <= a2 and b2 <= b and (a2, b2) != (a, b) for a2, b2 in with_mma):
            continue  # not innermost
        body = [t for x, t in ins if a <= x <= b]
        flop = 0
        for t in body:
            m = re.search(r"HGMMA\.(\d+)x(\d+)x(\d+)", t)
            if m:  # per warpgroup, in 16-bit-rate FLOPs
                rate = 2 if ".TF32" in t else 1
                flop += 2 * rate * int(m.group(1)) * int(m.group(2)) * int(m.group(3))
        flop *= num_warps // 4
        loops.append(dict(start=hex(a), instructions=len(body), flop=flop,
                          issue=len(body) * num_warps / 4, wgmma=flop / 4096))
    return loops


def compile_kernel(kernel, sig, constexprs, cfg, arch):
    """The compiled kernel, specialised as a launch with aligned pointers and integer arguments
    that are multiples of 16 would be."""
    for name in constexprs:
        sig[name] = "constexpr"
    for name in cfg.kwargs:
        sig[name] = "constexpr"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if sig.get(name) != "constexpr"}
    src = ASTSource(kernel, sig, constexprs={**constexprs, **cfg.kwargs}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def compile_one(kernel, sig, constexprs, cfg, arch):
    t0 = time.time()
    k = compile_kernel(kernel, sig, constexprs, cfg, arch)
    n_regs, n_spills = _resource_usage(k.asm["cubin"])
    loops = hgmma_loops(k.asm["cubin"], cfg.num_warps) if arch >= 90 else []
    return (k.metadata.shared, n_regs, n_spills, sass_counts(k.asm["cubin"]), loops,
            time.time() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "f32", "f64"], choices=list(TL))
    p.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--all-configs", action="store_true")
    p.add_argument("--act", choices=list(ACT_CODES), default="relu",
                   help="the hidden activation the concat kernels are compiled for")
    p.add_argument("--i64", action="store_true",
                   help="the 64-bit row offsets of operands of 2^31 elements or more")
    args = p.parse_args()
    failures = 0
    for arch in args.arch:
        fam = "hopper" if arch >= 90 else "ampere"
        for dt in args.dtypes:
            key = "fp64" if dt == "f64" else fam
            mlp_cfgs = _config.MLP_CONFIGS[key]
            mlp_fwd_cfgs = _config.MLP_FWD_CONFIGS[key]
            dot_cfgs = _config.DOT_CONFIGS[key]
            if not args.all_configs:
                mlp_cfgs, mlp_fwd_cfgs, dot_cfgs = mlp_cfgs[:1], mlp_fwd_cfgs[:1], dot_cfgs[:1]
            prec = "ieee" if dt != "f32" else "tf32"
            jobs = []
            for L in args.layers:
                common = dict(L=L, ACT=ACT_CODES[args.act], OUT=1, HAS_POS=True, PREC=prec,
                              I64=args.i64)
                for cfg in mlp_fwd_cfgs:
                    jobs.append((f"mlp_fwd L={L}", mlp_fwd_kernel, mlp_signature, common, cfg))
                for cfg in mlp_cfgs:
                    for col, chunk in ((False, True), (False, False), (True, False)):
                        jobs.append((f"mlp_bwd L={L} col={int(col)} chunk={int(chunk)}",
                                     mlp_bwd_kernel, mlp_signature,
                                     dict(common, SCALED=dt in ("bf16", "f16") and L > 0,
                                          COL_PASS=col, ATOMIC_DB=not col,
                                          DW_CHUNK=chunk), cfg))
            for first in (True, False):
                jobs.append((f"mlp_dw first={int(first)}", mlp_dw_kernel, mlp_signature,
                             dict(FIRST=first, ACT=ACT_CODES[args.act], PREC=prec, I64=args.i64),
                             _config.MLP_DW_CONFIGS[key][0]))
            dcommon = dict(HAS_POS=True, HAS_EXCL=True, PREC=prec, I64=args.i64)
            dscaled = dict(dcommon, SCALED=dt in ("bf16", "f16"))
            for cfg in dot_cfgs:
                jobs.append(("dot_fwd", dot_fwd_kernel, dot_signature, dcommon, cfg))
                jobs.append(("dot_ds", dot_ds_kernel, dot_signature, dscaled, cfg))
            for cfg in _config.DOT_BWD_CONFIGS[key][:len(dot_cfgs)]:
                for col in (False, True):
                    jobs.append((f"dot_bwd col={int(col)}", dot_bwd_kernel, dot_signature,
                                 dict(dscaled, COL_PASS=col, ATOMIC_DH=not col), cfg))
            for label, kernel, sigf, constexprs, cfg in jobs:
                name = (f"sm{arch} {dt:4s} {label:26s} {cfg.kwargs} "
                        f"w{cfg.num_warps} s{cfg.num_stages}")
                try:
                    shared, regs, spills, ops, loops, secs = compile_one(
                        kernel, sigf(kernel, dt), constexprs, cfg, arch)
                    sass = " ".join(f"{k}={v}" for k, v in ops.items() if v)
                    # per wgmma loop: instructions, issue / tensor-core cycle estimates
                    lp = " ".join(f"loop={x['instructions']}i:{x['issue']:.0f}/{x['wgmma']:.0f}"
                                  for x in loops)
                    print(f"{name}: smem={shared} regs={regs} stack={spills} {sass} {lp} "
                          f"({secs:.1f}s)", flush=True)
                except Exception as exc:  # report every failure, keep going
                    failures += 1
                    msg = str(exc).strip().splitlines()
                    print(f"{name}: FAILED {type(exc).__name__}: {msg[-1] if msg else ''}",
                          flush=True)
    if failures:
        sys.exit(f"{failures} kernel variant(s) failed to compile")


if __name__ == "__main__":
    main()
