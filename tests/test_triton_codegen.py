"""What the Triton kernels compile to on Hopper, checked without a GPU.

benchmarks/triton_compile_check.py compiles each kernel ahead of time for sm_90 (as a launch on
aligned tensors with sizes that are multiples of 16 specialises it) and counts instructions in
its SASS. These tests hold the facts the kernels' speed rests on, so that a change that loses one
fails here rather than on a rare GPU lease:

- every tl.dot becomes Hopper tensor-core instructions (HGMMA), not mma.sync or FMA loops;
- the gradient atomics are plain reductions (REDG): no GPU-wide fence (MEMBAR.ALL.GPU) or L1
  invalidation (CCTL.IVALL) around them, which Triton's default acq_rel semantics put there
  (seen before session 4 in both backward kernels);
- the fixed (deterministic-mode) tiles do not spill to local memory (no LDL / STL);
- the forward-only concat tiles' K loops issue fewer instructions than their wgmma work takes.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from factorcl_ext import _backends

from conftest import load_benchmark

pytestmark = [
    pytest.mark.skipif(not _backends.has_triton(), reason="needs the triton package"),
    pytest.mark.skipif(_backends.triton_interpreted(),
                       reason="TRITON_INTERPRET is set: the kernels are not compiled"),
]


@pytest.fixture(scope="module")
def check():
    import triton

    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not os.access(tool, os.X_OK):
        pytest.skip("this triton package carries no cuobjdump")
    return load_benchmark("triton_compile_check")


def kernels(check):
    """(label, kernel, signature, constexprs, config) of both critics, bf16, L = 1, first tile
    (and the forward-only concat tiles, and the separable critic's 128 x 128 score tiles where
    they do not spill)."""
    from factorcl_ext.triton import _config
    from factorcl_ext.triton._dot_kernels import dot_bwd_kernel, dot_ds_kernel, dot_fwd_kernel
    from factorcl_ext.triton._mlp_kernels import mlp_bwd_kernel, mlp_dw_kernel, mlp_fwd_kernel

    mlp = dict(L=1, ACT=0, OUT=0, HAS_POS=True, PREC="ieee", I64=False)
    dot = dict(HAS_POS=True, HAS_EXCL=False, PREC="ieee", I64=False)
    mcfg, dcfg = _config.MLP_HOPPER[0], _config.DOT_HOPPER[0]
    wcfg = _config.MLP_DW_CONFIGS["hopper"][0]
    return [
        ("mlp_fwd", mlp_fwd_kernel, check.mlp_signature, mlp, mcfg),
        *[(f"mlp_fwd {c.kwargs['BI']}x{c.kwargs['BJ']} BN={c.kwargs['BN']}", mlp_fwd_kernel,
           check.mlp_signature, mlp, c) for c in _config.MLP_HOPPER_FWD],
        ("mlp_bwd row", mlp_bwd_kernel, check.mlp_signature,
         dict(mlp, SCALED=True, COL_PASS=False, ATOMIC_DB=True, DW_CHUNK=True), mcfg),
        ("mlp_bwd row slots", mlp_bwd_kernel, check.mlp_signature,
         dict(mlp, SCALED=True, COL_PASS=False, ATOMIC_DB=True, DW_CHUNK=False), mcfg),
        ("mlp_bwd col", mlp_bwd_kernel, check.mlp_signature,
         dict(mlp, SCALED=True, COL_PASS=True, ATOMIC_DB=False, DW_CHUNK=False), mcfg),
        ("mlp_dw first", mlp_dw_kernel, check.mlp_signature,
         dict(FIRST=True, ACT=0, PREC="ieee", I64=False), wcfg),
        ("mlp_dw hidden", mlp_dw_kernel, check.mlp_signature,
         dict(FIRST=False, ACT=0, PREC="ieee", I64=False), wcfg),
        ("dot_fwd", dot_fwd_kernel, check.dot_signature, dot, dcfg),
        ("dot_fwd 128x128", dot_fwd_kernel, check.dot_signature, dot, _config.DOT_HOPPER_WIDE[0]),
        ("dot_ds", dot_ds_kernel, check.dot_signature, dict(dot, SCALED=True), dcfg),
        # (256 x 128: a few spilled registers, in the masked epilogue and set-up, not the loop)
        *[(f"dot_ds 128x128 BD={c.kwargs['BD']}", dot_ds_kernel, check.dot_signature,
           dict(dot, SCALED=True), c) for c in _config.DOT_HOPPER_WIDE if c.kwargs["BI"] == 128],
        ("dot_bwd row", dot_bwd_kernel, check.dot_signature,
         dict(dot, SCALED=True, COL_PASS=False, ATOMIC_DH=True), dcfg),
        ("dot_bwd col", dot_bwd_kernel, check.dot_signature,
         dict(dot, SCALED=True, COL_PASS=True, ATOMIC_DH=False), dcfg),
    ]


def test_sm90_kernels_use_wgmma_relaxed_reductions_and_no_local_memory(check):
    seen = {}
    for label, kernel, sigf, constexprs, cfg in kernels(check):
        k = check.compile_kernel(kernel, sigf(kernel, "bf16"), dict(constexprs), cfg, 90)
        ops = check.sass_counts(k.asm["cubin"])
        seen[label] = ops
        assert ops["HGMMA"] > 0 and ops["HMMA"] == 0, f"{label}: not on wgmma: {ops}"
        assert ops["MEMBAR.ALL.GPU"] == 0 and ops["CCTL.IVALL"] == 0, (
            f"{label}: a GPU-wide fence or L1 invalidation (acq_rel atomics?): {ops}")
        assert ops["ATOMG"] == 0, f"{label}: value-returning atomics where a reduction does: {ops}"
        assert ops["LDL"] == 0 and ops["STL"] == 0, f"{label}: local memory (spills): {ops}"
    # the row passes reduce dB / dH with float32 atomics; the column passes own their rows
    assert seen["mlp_bwd row"]["REDG"] > 0 and seen["dot_bwd row"]["REDG"] > 0, seen
    assert seen["mlp_bwd col"]["REDG"] == 0 and seen["dot_bwd col"]["REDG"] == 0, seen
    assert seen["dot_ds"]["REDG"] == 0, seen


def test_forward_only_concat_tiles_keep_the_tensor_cores_busy(check):
    """The forward-only concat tiles (_config.MLP_HOPPER_FWD) exist because their K loop issues
    fewer instructions than the time of its wgmma work (the first tile's loop is issue-bound
    about 2x, by the same count): if a change to the loop body undoes that, they lose their
    reason."""
    from factorcl_ext.triton import _config
    from factorcl_ext.triton._mlp_kernels import mlp_fwd_kernel

    mlp = dict(L=1, ACT=0, OUT=0, HAS_POS=True, PREC="ieee", I64=False)
    for cfg in _config.MLP_HOPPER_FWD:
        k = check.compile_kernel(mlp_fwd_kernel, check.mlp_signature(mlp_fwd_kernel, "bf16"),
                                 dict(mlp), cfg, 90)
        loops = check.hgmma_loops(k.asm["cubin"], cfg.num_warps)
        assert loops, f"{cfg}: no wgmma loop found"
        for loop in loops:
            assert loop["issue"] <= loop["wgmma"], f"{cfg}: issue-bound loop {loop}"


def test_every_backward_ablation_variant_compiles_for_sm90(tmp_path):
    """benchmarks/triton_bwd_ablation.py's variants are edits of the kernels' source: each must
    still lower for Hopper, so that a GPU lease is not spent on one that does not."""
    mod = load_benchmark("triton_bwd_ablation")
    lines = mod.compile_variants(tmp_path)
    assert len(lines) == sum(len(edits) for _, edits in mod.CRITICS.values())
    by_name = {line.split(":")[0]: line for line in lines}
    assert "MEMBAR.ALL.GPU" in by_name["separable dh_atomic_acq_rel"]  # the old atomics, kept
    assert "MEMBAR" not in by_name["separable full"] and "MEMBAR" not in by_name["concat full"]
