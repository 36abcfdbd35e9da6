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
from typing import Iterator

import torch
import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_deterministic = os.environ.get("FACTORCL_TRITON_DETERMINISTIC", "0") not in ("", "0")

# FACTORCL_TRITON_AUTOTUNE=0: every launch uses the family's first (fixed) configuration instead of
# autotuning. Autotuning compiles and times every configuration of a list for each new (N, M, H,
# L, dtype): tens of seconds per new shape, which a test suite of many small shapes (or a short
# job) pays on every shape; the fixed tile is the one the deterministic mode uses.
AUTOTUNE = os.environ.get("FACTORCL_TRITON_AUTOTUNE", "1") not in ("", "0")


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
    """tl.dot input precision: TF32 for float32 unless the user asked torch for "highest"."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and statistics dtype: float32 for 16-bit inputs, else the input dtype."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def num_programs(device: torch.device, num_blocks: int) -> int:
    """Persistent grid size: one program per SM on a GPU (each program owns a float32 slot of the
    weight gradients, so the grid is capped rather than one program per row block). Under the
    interpreter 3, so that a program walks several blocks and the persistent loop is tested."""
    if INTERPRETED or device.type != "cuda":
        cap = 3
    else:
        cap = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(cap, num_blocks))


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
]
MLP_AMPERE = [
    _cfg(8, 3, BI=16, BJ=8, BK=32, BN=64),
    _cfg(8, 3, BI=16, BJ=8, BK=64, BN=64),
    _cfg(4, 3, BI=8, BJ=8, BK=64, BN=64),
    _cfg(8, 2, BI=16, BJ=16, BK=32, BN=64),
]

# ---- concat critic: hidden weights' gradient (mlp_dw_kernel) ----------------------------------
# How the backward forms the hidden weights' gradient dW_l = sum over pairs of dz_l^T h_(l-1):
#
# - "chunk" (default): the backward kernel leaves dz (and the inputs of layers >= 2) of a chunk of
#   pairs in a buffer (at most DW_CHUNK_BYTES), and mlp_dw_kernel reduces them as one GEMM whose
#   reduction dimension is the chunk's pairs: [BN, BK] output tiles held in registers, split
#   over the pairs into a few float32 partials summed in a fixed order. Memory traffic per pair:
#   one write and about H / BK reads of dz (2 bytes per feature in bf16).
# - "slots": each backward program adds every pair tile's dz^T h into its own float32 H x H slot
#   (a read-modify-write of 8 H^2 bytes per tile of P pairs, 8 H^2 / P bytes per pair: 16 KiB at
#   H = 512, P = 128), slots summed afterwards. Measured on an H100 in session 2 (12.7 % of the
#   bf16 matmul rate for the whole forward + backward); kept for comparison.
#
# FACTORCL_TRITON_DW=slots|chunk and FACTORCL_TRITON_DW_CHUNK_MB (256) are read at import;
# set_dw_mode() changes the mode at run time.
DW_MODES = ("chunk", "slots")
_dw_mode = os.environ.get("FACTORCL_TRITON_DW", "chunk")
if _dw_mode not in DW_MODES:
    raise ValueError(f"FACTORCL_TRITON_DW must be one of {DW_MODES}, got {_dw_mode!r}")
DW_CHUNK_BYTES = int(float(os.environ.get("FACTORCL_TRITON_DW_CHUNK_MB", "256")) * 2**20)


def set_dw_mode(mode: str) -> None:
    """How the concat critic's backward forms the hidden weights' gradient: ``"chunk"`` or
    ``"slots"`` (see the comment above DW_MODES). Both are deterministic."""
    global _dw_mode
    if mode not in DW_MODES:
        raise ValueError(f"dw mode must be one of {DW_MODES}, got {mode!r}")
    _dw_mode = mode


def dw_mode() -> str:
    return _dw_mode


@contextlib.contextmanager
def using_dw_mode(mode: str) -> Iterator[None]:
    """Context manager form of :func:`set_dw_mode`."""
    old = _dw_mode
    set_dw_mode(mode)
    try:
        yield
    finally:
        set_dw_mode(old)


def dw_chunk(N: int, M: int, stored_per_pair: int, row_align: int, col_align: int
             ) -> tuple[int, int]:
    """(rows, columns) of a chunk of pairs whose ``stored_per_pair`` bytes fit DW_CHUNK_BYTES:
    whole columns of rows first (so that a chunk's backward has every row block to spread over
    the programs), multiples of the largest tile so that no pair tile straddles two chunks, at
    least one tile."""
    rows = triton.cdiv(N, row_align) * row_align
    cols = triton.cdiv(M, col_align) * col_align
    pairs = max(1, DW_CHUNK_BYTES // max(1, stored_per_pair))
    if rows * cols <= pairs:
        return rows, cols
    if pairs // rows >= col_align:
        return rows, pairs // rows // col_align * col_align
    return max(row_align, pairs // col_align // row_align * row_align), col_align


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
DOT_CONFIGS = {"interpret": DOT_INTERPRET, "hopper": DOT_HOPPER, "ampere": DOT_AMPERE,
               "fp64": DOT_FP64}


def config_family(device: torch.device, dtype: torch.dtype) -> str:
    """Key of MLP_CONFIGS / DOT_CONFIGS for a call."""
    fam = family(device)
    return "fp64" if fam != "interpret" and dtype == torch.float64 else fam


def max_kwarg(configs, fn) -> int:
    return max(fn(c.kwargs) for c in configs)


def min_kwarg(configs, fn) -> int:
    return min(fn(c.kwargs) for c in configs)
