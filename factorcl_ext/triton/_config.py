"""Launch settings of the Triton backend: tile configurations, dot precision, grid size and the
deterministic mode.

Tile parameters (all powers of two; Triton's tl.dot wants every dimension >= 16):

- concat critic: ``BI`` rows x ``BJ`` columns form one pair tile of ``P = BI*BJ`` pairs (the M
  dimension of every tl.dot); ``BK`` is the slice of a layer's input features (the K dimension),
  ``BN`` the slice of its output features (the N dimension);
- separable critic: ``BI`` x ``BJ`` score tile, ``BD`` slice of the embedding width.

Under ``TRITON_INTERPRET=1`` one small fixed configuration is used (numpy runs each program in
turn: small tiles keep the tests fast and still exercise every mask). On a GPU the forward
kernels and the non-deterministic backward kernels are autotuned among a short list per
architecture family, keyed on (N, M, H, L) and the dtypes (the Autotuner adds the dtype of every
tensor argument to the key). Deterministic mode uses the first configuration of the list, never
autotuning, so that the reduction order is fixed across processes as well as runs; so does every
launch when ``FACTORCL_TRITON_AUTOTUNE=0`` is in the environment at import.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

import torch
import triton

from .. import _backends

INTERPRETED = _backends.triton_interpreted()

_deterministic = _backends.env_flag("FACTORCL_TRITON_DETERMINISTIC", False)

# FACTORCL_TRITON_AUTOTUNE=0: every launch uses the family's first (fixed) configuration instead of
# autotuning. Autotuning compiles and times every configuration of a list for each new (N, M, H,
# L, dtype): tens of seconds per new shape, which a test suite of many small shapes (or a short
# job) pays on every shape; the fixed tile is the one the deterministic mode uses.
AUTOTUNE = _backends.env_flag("FACTORCL_TRITON_AUTOTUNE", True)


def set_deterministic(flag: bool) -> None:
    """Make the Triton backend's gradients bit-identical run to run (``True``) or fast (``False``).

    Also on when ``torch.use_deterministic_algorithms(True)`` is in force, or when the environment
    variable ``FACTORCL_TRITON_DETERMINISTIC=1`` was set at import. The setting is read when an op
    runs (under ``torch.compile``: when it is traced).
    """
    global _deterministic
    _deterministic = bool(flag)


def is_deterministic() -> bool:
    return _deterministic or torch.are_deterministic_algorithms_enabled()


@contextlib.contextmanager
def deterministic(flag: bool = True) -> Iterator[None]:
    """Context manager form of :func:`set_deterministic`."""
    global _deterministic
    old = _deterministic
    _deterministic = bool(flag)
    try:
        yield
    finally:
        _deterministic = old


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 for float32 when torch's CUDA matmuls use it
    (``torch.set_float32_matmul_precision("high")`` or the newer
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"``; the legacy getter raises once the
    newer setting has been used), else IEEE."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.fp32_precision == "tf32":
        return "tf32"
    return "ieee"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and statistics dtype: float32 for 16-bit inputs, else the input dtype."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def num_programs(device: torch.device, num_blocks: int, per_sm: int = 1) -> int:
    """Persistent grid size: ``per_sm`` programs per SM on a GPU (one where each program owns a
    float32 slot of the weight gradients, so the grid is capped rather than one program per row
    block). Under the interpreter 3, so that a program walks several blocks and the persistent
    loop is tested."""
    if INTERPRETED or device.type != "cuda":
        cap = 3
    else:
        cap = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(cap, num_blocks))


def column_splits(device: torch.device, row_blocks: int, col_blocks: int) -> int:
    """How many shares of its columns each row block's walk is split into, in the forward
    kernels and the concat backward's row pass, so that small batches still occupy the GPU:
    their programs own row blocks, and N = 512 rows make 32 blocks of 16 for 132 SMs on an
    H100. Each share gives partial results that ops.py combines in a fixed order (forward: a
    logsumexp and two sums; backward: dA partials and per-program slots). Enough shares for one
    program per SM at the largest row block (``row_blocks`` counts those), none emptier than a
    column block (``col_blocks`` at the largest column tile). Under the interpreter 3 where
    there are three column blocks, so that the tests cover the combination (not 2, which is the
    interpreter's dw_splits: a mix-up of the two would pass unseen)."""
    if INTERPRETED or device.type != "cuda":
        return max(1, min(3, col_blocks))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(col_blocks, triton.cdiv(sms, max(1, row_blocks))))


def _cfg(num_warps: int, num_stages: int, **kw) -> triton.Config:
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


# ---- concat critic (pair MLP) ----------------------------------------------------------------
MLP_INTERPRET = [_cfg(4, 1, BI=4, BJ=4, BK=16, BN=16)]

# GPU lists: tiles whose forward and backward compile for sm90/sm80 with no or few register
# spills (benchmarks/triton_compile_check.py prints them without a GPU). The first entry is the
# fixed deterministic-mode tile (no spills in either kernel). Pair tiles of 128 pairs amortise
# each per-program weight-gradient update (an H x H read-modify-write) over 128 pairs; larger
# output slices (BN) mean fewer recomputations of the first-layer activations in the forward.
MLP_HOPPER = [
    _cfg(8, 3, BI=16, BJ=8, BK=32, BN=64),
    _cfg(8, 3, BI=16, BJ=8, BK=64, BN=128),
    _cfg(8, 3, BI=16, BJ=8, BK=64, BN=64),
    _cfg(8, 2, BI=16, BJ=16, BK=32, BN=64),
    _cfg(4, 3, BI=8, BJ=8, BK=64, BN=64),
    _cfg(8, 3, BI=8, BJ=8, BK=32, BN=256),  # forward: h0 recomputed H/256 times only
    # the widest slice whose backward neither spills (bf16) nor exceeds shared memory: its
    # backward's two wgmma loops take about 300 / 228 issue cycles for 256 of wgmma each
    # (session 9 count, hgmma_loops), the first tile's 284 / 152 for 128
    _cfg(8, 3, BI=16, BJ=8, BK=32, BN=128),
]
# Forward-only tiles (their backward spills hundreds of bytes and needs more than the 227 KB of
# shared memory an sm90 block can have). The forward's K loop forms act(A_i + B_j) for its P
# pairs and BK features in registers on every step, whatever the width BN of the output slice,
# so a wide slice spreads that work over more tensor-core work: in the sm90 bf16 build
# (session 9) the first Hopper tile's K-loop body holds 142 instructions per warp for two
# 64 x 64 x 16 wgmma per warpgroup (about 284 issue cycles of 8 warps on 4 schedulers against
# 128 cycles of tensor-core work at 4096 FLOP per cycle per SM: issue-bound), 16 x 8 pairs with
# BN = 256 hold 165 for 512 cycles of wgmma, 16 x 16 pairs with BN = 128 hold 187 for 512.
MLP_HOPPER_FWD = [
    _cfg(8, 3, BI=16, BJ=8, BK=32, BN=256),
    _cfg(8, 3, BI=16, BJ=16, BK=32, BN=128),
]
MLP_AMPERE = [
    _cfg(8, 3, BI=16, BJ=8, BK=32, BN=64),
    _cfg(8, 3, BI=16, BJ=8, BK=64, BN=64),
    _cfg(4, 3, BI=8, BJ=8, BK=64, BN=64),
    _cfg(8, 2, BI=16, BJ=16, BK=32, BN=64),
]

# ---- backward modes ---------------------------------------------------------------------------


class _Mode:
    """A run-time choice among named modes, first read from an environment variable at import."""

    def __init__(self, env: str, modes: tuple[str, ...]):
        self.env, self.modes = env, modes
        # read as env_flag reads the boolean switches: case and spaces aside, empty is unset
        self.value = os.environ.get(env, "").strip().lower() or modes[0]
        if self.value not in modes:
            raise ValueError(f"{env} must be one of {modes}, got {self.value!r}")

    def set(self, mode: str) -> None:
        if mode not in self.modes:
            raise ValueError(f"mode must be one of {self.modes}, got {mode!r}")
        self.value = mode

    @contextlib.contextmanager
    def using(self, mode: str) -> Iterator[None]:
        old = self.value
        self.set(mode)
        try:
            yield
        finally:
            self.value = old


# Both chunked modes below keep per-pair values of a chunk of pairs in one buffer of at most
# CHUNK_BYTES (FACTORCL_TRITON_CHUNK_MB, 256 MiB, read at import): memory bounded by a constant,
# not by N * M.
CHUNK_MB_MAX = 2048


def chunk_bytes(mib: str) -> int:
    """FACTORCL_TRITON_CHUNK_MB in bytes. At most CHUNK_MB_MAX (with a warning): the kernels
    address a layer's rows of the concat backward's chunk buffer with 32-bit offsets, which a
    buffer of 2 GiB keeps below 2^31 elements."""
    try:
        value = float(mib)
    except ValueError:
        raise ValueError(f"FACTORCL_TRITON_CHUNK_MB must be a number of MiB, got {mib!r}") from None
    if not value > 0:
        raise ValueError(f"FACTORCL_TRITON_CHUNK_MB must be positive, got {mib!r}")
    if value > CHUNK_MB_MAX:
        warnings.warn(f"FACTORCL_TRITON_CHUNK_MB={mib}: using {CHUNK_MB_MAX} MiB, the largest "
                      "chunk buffer the Triton kernels address", stacklevel=2)
        value = CHUNK_MB_MAX
    return int(value * 2**20)


CHUNK_BYTES = chunk_bytes(os.environ.get("FACTORCL_TRITON_CHUNK_MB", "256"))

# Concat critic: how the backward forms the hidden weights' gradient dW_l = sum over pairs of
# dz_l^T h_(l-1) (FACTORCL_TRITON_DW at import, set_dw_mode() at run time):
#
# - "chunk" (default): the backward kernel leaves dz (and the inputs of layers >= 2) of a chunk of
#   pairs in the buffer, and mlp_dw_kernel reduces them as one GEMM whose reduction dimension is
#   the chunk's pairs: [BN, BK] output tiles held in registers, split over the pairs into a few
#   float32 partials summed in a fixed order. Memory traffic per pair: one write and about
#   H / BK reads of dz (2 bytes per feature in bf16).
# - "slots": each backward program adds every pair tile's dz^T h into its own float32 H x H slot
#   (a read-modify-write of 8 H^2 bytes per tile of P pairs, 8 H^2 / P bytes per pair: 16 KiB at
#   H = 512, P = 128), slots summed afterwards. Measured on an H100 in session 2 (12.7 % of the
#   bf16 matmul rate for the whole forward + backward); kept for comparison.
#
# Both are deterministic.
DW_MODES = ("chunk", "slots")
_DW = _Mode("FACTORCL_TRITON_DW", DW_MODES)

# Separable critic: how the backward forms dG = dS H and dH = dS^T G (FACTORCL_TRITON_DOT_BWD at
# import, set_dot_bwd_mode() at run time):
#
# - "chunk" (default): dot_ds_kernel writes dS of a chunk of whole rows into the buffer in the
#   input dtype (the rounding the fused kernel applies before its tl.dot as well), and cuBLAS
#   forms dG of those rows and adds dS^T G into a float32 dH: dense library products, and
#   2 bytes per pair written and read back (bf16) in place of a read-modify-write of a [BI, D]
#   float32 dG block and BJ x D float32 atomics into dH per score tile (the fused form measured
#   on an H100 in session 2: forward + backward 11.5x the time of the four plain products).
#   Deterministic with a fixed configuration; not yet timed on a GPU.
# - "fused": dot_bwd_kernel, tile by tile: dG read-modify-written by its owning row program, dH by
#   float32 atomics; the deterministic mode (set_deterministic) runs it as a row pass and a
#   column pass instead, whichever mode is set.
DOT_BWD_MODES = ("chunk", "fused")
_DOT_BWD = _Mode("FACTORCL_TRITON_DOT_BWD", DOT_BWD_MODES)


def set_dw_mode(mode: str) -> None:
    """How the concat critic's backward forms the hidden weights' gradient: ``"chunk"`` or
    ``"slots"`` (see the comment above DW_MODES). Both are deterministic."""
    _DW.set(mode)


def dw_mode() -> str:
    return _DW.value


def using_dw_mode(mode: str):
    """Context manager form of :func:`set_dw_mode`."""
    return _DW.using(mode)


def set_dot_bwd_mode(mode: str) -> None:
    """How the separable critic's backward forms its products: ``"chunk"`` or ``"fused"`` (see
    the comment above DOT_BWD_MODES)."""
    _DOT_BWD.set(mode)


def dot_bwd_mode() -> str:
    return _DOT_BWD.value


def using_dot_bwd_mode(mode: str):
    """Context manager form of :func:`set_dot_bwd_mode`."""
    return _DOT_BWD.using(mode)


def dw_chunk(N: int, M: int, stored_per_pair: int, row_align: int, col_align: int
             ) -> tuple[int, int]:
    """(rows, columns) of a chunk of pairs whose ``stored_per_pair`` bytes fit CHUNK_BYTES:
    whole columns of rows first (so that a chunk's backward has every row block to spread over
    the programs), multiples of the largest tile so that no pair tile straddles two chunks, at
    least one tile."""
    rows = triton.cdiv(N, row_align) * row_align
    cols = triton.cdiv(M, col_align) * col_align
    pairs = max(1, CHUNK_BYTES // max(1, stored_per_pair))
    if rows * cols <= pairs:
        return rows, cols
    if pairs // rows >= col_align:
        return rows, pairs // rows // col_align * col_align
    return max(row_align, pairs // col_align // row_align * row_align), col_align


def ds_chunk_rows(N: int, M: int, element_size: int, align: int) -> int:
    """Rows of a chunk of whole rows of dS (M elements each) that fit CHUNK_BYTES: a multiple of
    ``align`` where more than ``align`` rows fit, at least one row."""
    rows = max(1, CHUNK_BYTES // max(1, M * element_size))
    if rows >= N:
        return N
    return rows // align * align if rows > align else rows


def dw_splits(device: torch.device, tiles: int) -> int:
    """Splits of mlp_dw_kernel's pair reduction: enough programs to fill the GPU (2 under the
    interpreter, so that the split is tested)."""
    if INTERPRETED or device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, sms // max(1, tiles))


# One fixed configuration per family (no autotuning): BN x BK output tile, BQI x BQJ pairs per
# reduction step. 128 x 128 float32 accumulators over 8 warps; 64 pairs per tl.dot.
MLP_DW_CONFIGS = {
    "interpret": [_cfg(4, 1, BN=16, BK=16, BQI=4, BQJ=4)],
    "hopper": [_cfg(8, 3, BN=128, BK=128, BQI=8, BQJ=8)],
    "ampere": [_cfg(8, 3, BN=128, BK=64, BQI=8, BQJ=8)],
    "fp64": [_cfg(4, 2, BN=32, BK=32, BQI=4, BQJ=8)],
}


# ---- separable critic (pair dot) -------------------------------------------------------------
DOT_INTERPRET = [_cfg(4, 1, BI=16, BJ=16, BD=16)]
DOT_HOPPER = [
    _cfg(8, 3, BI=128, BJ=64, BD=32),
    _cfg(8, 3, BI=64, BJ=128, BD=32),
    _cfg(4, 3, BI=64, BJ=64, BD=32),
    _cfg(8, 4, BI=128, BJ=64, BD=64),
]
DOT_AMPERE = [
    _cfg(8, 3, BI=128, BJ=64, BD=32),
    _cfg(4, 3, BI=64, BJ=64, BD=32),
    _cfg(8, 3, BI=64, BJ=128, BD=32),
]
# Wider score tiles for the kernels that only form scores (the forward and dot_ds_kernel). A
# [BI, BJ] tile reads (BI + BJ) D operand elements for 2 BI BJ D FLOPs, and a program reads its G
# rows again for every column tile: at N = M = 65536, D = 512, bf16, 128 x 64 tiles move 103 GB
# from L2, and session 2's forward took 19.2 ms, 5.4 TB/s: bound by L2 bandwidth, not by the
# tensor cores, by that arithmetic. 128 x 128 tiles move 69 GB, 256 x 128 tiles 52 GB. sm90 build
# (triton_compile_check.py, bf16): dot_ds_kernel no spills in any of them; the forward at 255
# registers, no spills at 128 x 128 with BD = 32, 8 bytes with BD = 64, 48 bytes at 256 x 128
# (stored once per row block, outside the tile loop); the fused backward, which also holds the
# dG / dH products, would spill more.
DOT_HOPPER_WIDE = [
    _cfg(8, 4, BI=128, BJ=128, BD=32),
    _cfg(8, 3, BI=128, BJ=128, BD=64),
    _cfg(8, 3, BI=256, BJ=128, BD=32),
]


def family(device: torch.device) -> str:
    """'interpret', 'hopper' (sm90 and later) or 'ampere' (sm80-sm89 and older)."""
    if INTERPRETED or device.type != "cuda":
        return "interpret"
    major, _ = torch.cuda.get_device_capability(device)
    return "hopper" if major >= 9 else "ampere"


# float64 (tests only) doubles every operand's footprint: one small tile that fits the shared
# memory of both families (the float32 tiles above would not on sm80).
MLP_FP64 = [_cfg(4, 2, BI=8, BJ=8, BK=32, BN=32)]
DOT_FP64 = [_cfg(4, 2, BI=32, BJ=32, BD=32)]

MLP_CONFIGS = {"interpret": MLP_INTERPRET, "hopper": MLP_HOPPER, "ampere": MLP_AMPERE,
               "fp64": MLP_FP64}
# the forward tunes over these (a superset of MLP_CONFIGS), the backward over MLP_CONFIGS
MLP_FWD_CONFIGS = dict(MLP_CONFIGS, hopper=MLP_HOPPER + MLP_HOPPER_FWD)
# forward and dot_ds_kernel; the fused backward (dot_bwd_kernel) tunes over DOT_BWD_CONFIGS
DOT_CONFIGS = {"interpret": DOT_INTERPRET, "hopper": DOT_HOPPER + DOT_HOPPER_WIDE,
               "ampere": DOT_AMPERE, "fp64": DOT_FP64}
DOT_BWD_CONFIGS = {"interpret": DOT_INTERPRET, "hopper": DOT_HOPPER, "ampere": DOT_AMPERE,
                   "fp64": DOT_FP64}


def config_family(device: torch.device, dtype: torch.dtype) -> str:
    """Key of MLP_CONFIGS / DOT_CONFIGS for a call."""
    fam = family(device)
    return "fp64" if fam != "interpret" and dtype == torch.float64 else fam


def max_kwarg(configs, fn) -> int:
    return max(fn(c.kwargs) for c in configs)


def min_kwarg(configs, fn) -> int:
    return min(fn(c.kwargs) for c in configs)
