"""The Triton backend's core ops, registered with ``torch.library.triton_op`` so that
``torch.compile`` traces into the kernels (on a GPU each launch goes through ``wrap_triton``).

Same schemas and semantics as the C++ core ops of csrc/ops.cpp (DESIGN.md section 5), plus a
last argument ``deterministic`` (bit-identical results run to run for this call, whatever the
global mode; the C++ kernels have no atomics and need none), under the names
``factorcl::triton_<op>``:

- ``triton_pair_mlp_stats`` / ``triton_pair_mlp_stats_backward`` (joined by register_autograd),
- ``triton_pair_mlp_loss`` (gradients formed in its forward; backward scales them),
- the same three for ``pair_dot``.

triton_op uses each function body as the fake (meta) implementation as well: the bodies only
allocate with torch and launch kernels, with no data-dependent Python.

On the GPU the loss op cannot avoid a second sweep: ``ds_ij`` needs ``lse_i``, known only after
all columns are seen, and nothing of size N*M is kept. So it is the stats forward followed by
the recomputing backward with constant upstream gradients (c_lse, c_pos, c_rowsum).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Optional

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import custom_op, triton_op, wrap_triton
from torch.types import Number

from .._autograd import register_core_autograd
from .._vmap import register_core_vmap
from . import _config
from ._common import ACT_CODES, OUT_CODES
from ._dot_kernels import dot_bwd_kernel, dot_ds_kernel, dot_fwd_kernel
from ._mlp_kernels import mlp_bwd_kernel, mlp_dw_kernel, mlp_fwd_kernel

_MLP_KEY = ["N", "M", "H", "L"]
_DOT_KEY = ["N", "M", "D"]
_MLP_ACCUMULATORS = ["dA_ptr", "dB_ptr", "dW_ptr", "dBias_ptr", "dWout_ptr", "dBout_ptr"]
_DOT_ACCUMULATORS = ["dG_ptr", "dH_ptr"]


def _tuners(kernel, configs_by_family, key, accumulators=None):
    """{(family, fixed): Autotuner}. ``accumulators``: the arguments a launch adds into, which
    autotuning (it replays the kernel once per configuration) restores to their values before it
    (``restore_value``), not to zero: the concat backward's row pass adds chunk after chunk into
    the same buffers (allocated zeroed), and under torch.compile inductor keys a user kernel's
    tuner on its integer arguments too, so that each chunk tunes at its first launch; a
    ``reset_to_zero`` there erased the earlier chunks' sums (inductor benchmarks on copies of
    restore_value arguments). ``fixed`` holds only the family's first configuration: the
    deterministic mode never tunes, so its reduction order is the same in every process. Single-
    configuration Autotuners do not benchmark; going through an Autotuner either way keeps one
    launch path for eager and for torch.compile."""
    out = {}
    for fam, cfgs in configs_by_family.items():
        for fixed in (False, True):
            out[fam, fixed] = triton.autotune(
                configs=cfgs[:1] if fixed else cfgs, key=key, restore_value=accumulators
            )(kernel)
    return out


# Autotuning replays a kernel: the backward kernels name their accumulators for restore_value.
_MLP_FWD = _tuners(mlp_fwd_kernel, _config.MLP_FWD_CONFIGS, _MLP_KEY)
_MLP_BWD = _tuners(mlp_bwd_kernel, _config.MLP_CONFIGS, _MLP_KEY, _MLP_ACCUMULATORS)
_MLP_DW = _tuners(mlp_dw_kernel, _config.MLP_DW_CONFIGS, ["H"])
_DOT_FWD = _tuners(dot_fwd_kernel, _config.DOT_CONFIGS, _DOT_KEY)
_DOT_BWD = _tuners(dot_bwd_kernel, _config.DOT_BWD_CONFIGS, _DOT_KEY, _DOT_ACCUMULATORS)
_DOT_DS = _tuners(dot_ds_kernel, _config.DOT_CONFIGS, _DOT_KEY)

_tracing = threading.local()


def autotune_choices() -> dict[str, list[dict]]:
    """The tile configuration each autotuned kernel chose, per key seen so far in this process:
    ``{"mlp_fwd": [{"key": [...], "config": "BI: 16, BJ: 8, ..., num_warps: 8, ..."}], ...}``
    (the key is (N, M, H, L) or (N, M, D), then the argument dtypes). Empty before any tuning,
    under the interpreter and with ``FACTORCL_TRITON_AUTOTUNE=0``."""
    kernels = {"mlp_fwd": _MLP_FWD, "mlp_bwd": _MLP_BWD, "dot_fwd": _DOT_FWD, "dot_bwd": _DOT_BWD,
               "dot_ds": _DOT_DS}
    out = {}
    for name, tuners in kernels.items():
        rows = []
        for (fam, fixed), tuner in tuners.items():
            if fixed:
                continue
            for key, cfg in getattr(tuner, "cache", {}).items():
                rows.append({"family": fam, "key": [str(k) for k in key], "config": str(cfg)})
        out[name] = rows
    return out


def _like(grad: Tensor, t: Tensor) -> Tensor:
    """``grad`` in the dtype and memory layout of ``t``, as the fake functions promise
    (``empty_like``): the accumulators are contiguous float32, the inputs need not be."""
    if grad.dtype == t.dtype and grad.stride() == t.stride():
        return grad
    out = torch.empty_like(t)
    out.copy_(grad)
    return out


def _needs_i64(elements: int) -> bool:
    """Whether the kernels need 64-bit row offsets (constexpr I64, _common._row_offsets): an
    operand of ``elements`` elements has offsets past 2^31 - 1."""
    return elements > 2**31


# The kernels number rows and columns in 32 bits (program ids times tile sizes, tl.cdiv(N, BI) =
# (N + BI - 1) // BI, i0 + BI <= N): 2^16 below 2^31 keeps every such sum of a count and a tile
# (or chunk) size in range (tl.cdiv(2^31 - 1, 256) was -8388607).
MAX_ROWS = 2**31 - 2**16


def _check_row_counts(N: int, M: int) -> None:
    if max(N, M) > MAX_ROWS:
        raise ValueError(f"the triton backend takes at most 2^31 - 2^16 rows and columns (its "
                         f"kernels number them in 32 bits), got N = {N}, M = {M}")


def _check_mlp_call(A, B, hidden_weights, hidden_biases, w_out, b_out, activation,
                    out_activation, pos_offset) -> None:
    """The public op's checks again at each registered op, as the C++ ops repeat theirs (a direct
    torch.ops call with an offset out of range, a short w_out or an unknown activation got
    garbage); 16-bit inputs are the kernels' own (the public API takes them on GPUs only)."""
    from ..ops import _GPU_DTYPES, _check_pair_mlp

    _check_pair_mlp(A, B, hidden_weights, hidden_biases, w_out, b_out, activation,
                    out_activation, pos_offset, _GPU_DTYPES)


def _check_dot_call(G, H, pos_offset, exclude_offset) -> None:
    """As :func:`_check_mlp_call`, for the separable critic's ops."""
    from ..ops import _GPU_DTYPES, _check_pair_dot

    _check_pair_dot(G, H, pos_offset, exclude_offset, _GPU_DTYPES)


def _check_row_vectors(n: int, like: Tensor, *named: tuple[str, Tensor]) -> None:
    """The backward's per-row inputs (upstream gradients, lse): floating [n] tensors on the
    inputs' device (a second line behind factorcl_ext.ops, as the C++ ops check theirs: a direct
    torch.ops call got integer gradients converted and short ones read past their end)."""
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but the inputs are on {like.device}")


def _deterministic(requested: bool) -> bool:
    """The call's ``deterministic`` argument, or the global mode (set_deterministic, the
    environment, torch.use_deterministic_algorithms)."""
    return bool(requested) or _config.is_deterministic()


def _launch(tuners, family, grid, args, kwargs, deterministic: bool) -> None:
    if getattr(_tracing, "fake", False):
        return
    fixed = deterministic or not _config.AUTOTUNE
    with _on_device_of(next(a for a in args if isinstance(a, Tensor))):
        _launchable(tuners[family, fixed])[grid](*args, **kwargs)


def _on_device_of(t: Tensor):
    """``t``'s GPU made the current device for a launch, where it is not already. Triton launches
    on the current device and its current stream: tensors on ``cuda:1`` while ``cuda:0`` is
    current would be read by a kernel on device 0, unordered with the work torch queued for them
    on device 1 (the C++ ops hold a device guard for the same reason). Nothing to do for CPU
    tensors (the interpreter) and fake ones (tracing: the compiled program guards its launches)."""
    if t.device.type != "cuda" or is_fake(t) or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def _launchable(tuner):
    """``wrap_triton(tuner)`` on a GPU, so that torch.compile traces the launch; the tuner itself
    under the interpreter, where the ops are opaque custom ops (``_register``) and torch 2.11's
    wrap_triton, unlike 2.14's, wraps an interpreted kernel into a launcher that fails
    ("'function' object has no attribute 'fn'")."""
    return tuner if _config.INTERPRETED else wrap_triton(tuner)


def _register(name: str):
    """``torch.library.triton_op`` on a GPU. Under the interpreter the kernels are launched
    directly (``_launchable``) and cannot run on fake tensors; there the op is an opaque
    ``custom_op`` whose fake implementation is the same body with the launches skipped, so that
    torch.compile still traces the ops (as opaque calls) without a graph break."""

    def wrap(fn):
        if not _config.INTERPRETED:
            return triton_op(name, mutates_args=())(fn)
        op = custom_op(name, fn, mutates_args=())

        @functools.wraps(fn)
        def fake(*args, **kwargs):
            _tracing.fake = True
            try:
                return fn(*args, **kwargs)
            finally:
                _tracing.fake = False

        op.register_fake(fake)
        return op

    return wrap


# --------------------------------------------------------------------------------------------
# concat critic (pair MLP)
# --------------------------------------------------------------------------------------------


class _MlpArgs:
    """Contiguous operands of one pair-MLP call and its launch geometry."""

    def __init__(self, A, B, hidden_weights, hidden_biases, w_out, b_out, activation,
                 out_activation, pos_offset, deterministic):
        _check_row_counts(A.shape[0], B.shape[0])
        # the callers' tensors: gradients take their layouts
        self.src = (A, B, list(hidden_weights), list(hidden_biases), w_out, b_out)
        self.A = A.contiguous()
        self.B = B.contiguous()
        self.N, self.H = A.shape
        self.M = B.shape[0]
        self.L = len(hidden_weights)
        dtype = A.dtype
        if self.L:
            self.W = torch.stack([w.contiguous() for w in hidden_weights])
            self.Bias = torch.stack([b.contiguous() for b in hidden_biases])
        else:  # never read when L == 0
            self.W = A.new_zeros(1)
            self.Bias = A.new_zeros(1)
        self.w_out = w_out.contiguous()
        self.b_out = b_out.reshape(()).contiguous()
        self.act = ACT_CODES[activation]
        self.out = OUT_CODES[out_activation]
        self.has_pos = pos_offset is not None
        self.pos_offset = int(pos_offset) if pos_offset is not None else 0
        self.acc = _config.acc_dtype(dtype)
        self.prec = _config.dot_precision(dtype)
        self.family = _config.config_family(A.device, dtype)
        self.i64 = _needs_i64(max(self.N, self.M, self.L * self.H) * self.H)
        # every tile either kernel may launch with (the forward's list holds the backward's):
        # grid sizes, scratch slots and chunk alignment hold for any of them
        self.configs = _config.MLP_FWD_CONFIGS[self.family]
        bi_min = _config.min_kwarg(self.configs, lambda k: k["BI"])
        bj_min = _config.min_kwarg(self.configs, lambda k: k["BJ"])
        self.p_max = _config.max_kwarg(self.configs, lambda k: k["BI"] * k["BJ"])
        # grid sizes do not depend on the configuration, so neither do the slot buffers
        self.g_row = _config.num_programs(A.device, triton.cdiv(self.N, bi_min))
        self.g_col = _config.num_programs(A.device, triton.cdiv(self.M, bj_min))
        # the backward's power of two for 16-bit dz (_mlp_dz_scale); unscaled until it is set
        self.scale, self.scaled = self.A, False
        self.det = _deterministic(deterministic)

    def scratch(self, programs: int, layers: int) -> tuple[Tensor, int, int]:
        """Program-private pre-activation slots [programs, layers, P_max, H] (input dtype)."""
        if layers == 0:
            return self.A.new_zeros(1), 0, 0
        z = self.A.new_empty((programs, layers, self.p_max, self.H))
        return z, layers * self.p_max * self.H, self.p_max * self.H

    def constexprs(self) -> dict:
        return dict(L=self.L, ACT=self.act, OUT=self.out, HAS_POS=self.has_pos, PREC=self.prec,
                    I64=self.i64)

    def bwd_constexprs(self) -> dict:
        return dict(self.constexprs(), SCALED=self.scaled)


def _ds_bound(grads) -> Tensor:
    """The largest finite |g_lse_i| + |g_pos_i| + |g_rowsum_i| (0-dim): a bound on the score
    gradients |ds_ij| of row i, since exp(s_ij - lse_i) <= 1 (and out_act' <= 1)."""
    bound = grads[0].abs() + grads[1].abs() + grads[2].abs()
    return torch.where(torch.isfinite(bound), bound, 0.0).amax()


def _pow2_scale(top: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, 1 / scale), a [1] and a 0-dim device tensor (no host sync): the power of two that
    takes the bound ``top`` into (2^13, 2^14], below float16's largest number (65504)."""
    scale = torch.exp2(14.0 - torch.ceil(torch.log2(top.clamp_min(2.0 ** -100))))
    return scale.reshape(1), 1.0 / scale


def _mlp_dz_scale(a: _MlpArgs, grads) -> tuple[Tensor, Optional[Tensor]]:
    """For 16-bit inputs with hidden layers: (scale, 1 / scale) by which the backward multiplies
    ds, so that every dz it rounds to the input dtype (for its tl.dot and the chunk buffer) sits
    in float16's range; the float32 gradients are multiplied back. (a.A, None) otherwise.

    Bounds, each a bound on a layer's |dz| (act' and out_act' are at most 1): dz_(L-1) <=
    max|ds| max|w_out|, dz_(l-1) <= (bound of dz_l) * max_k sum_n |W_l[n, k]|; the largest goes
    to (2^13, 2^14]. Without it an InfoNCE loss's 1/N coefficients times softmax terms near 1/M
    (times w_out) fall below float16's smallest normal number at common batch sizes. The scale
    is capped so that ds itself (float32) stays far from overflow. Infinite or NaN upstream
    gradients are left out of the bound and reach the gradients as they would without it."""
    if a.A.dtype not in (torch.float16, torch.bfloat16) or a.L == 0 or a.N == 0 or a.M == 0:
        return a.A, None
    b = _ds_bound(grads)
    bound = b * a.w_out.abs().amax().float()
    top = bound
    for l in range(a.L - 1, 0, -1):
        bound = bound * a.W[l].abs().float().sum(0).amax()
        top = torch.maximum(top, bound)
    # finite top only (weights with inf / NaN: no scale); ds * scale <= 2^74
    top = torch.where(torch.isfinite(top), torch.maximum(top, b * 2.0 ** -60), 2.0 ** 14)
    return _pow2_scale(top)


def _column_splits(device: torch.device, configs, N: int, M: int) -> int:
    """Shares of the column blocks per row block (_config.column_splits) for an N x M problem,
    counted at the largest tiles of ``configs`` (the same for any tile the tuner picks)."""
    return _config.column_splits(device,
                                 triton.cdiv(N, _config.max_kwarg(configs, lambda k: k["BI"])),
                                 triton.cdiv(M, _config.max_kwarg(configs, lambda k: k["BJ"])))


def _split_stats(like: Tensor, dtype: torch.dtype, splits: int, n: int) -> list[Tensor]:
    """Statistics buffers (``dtype``, on the device of ``like``) of a forward whose rows'
    columns run in ``splits`` ranges: one [n] vector each when there is one range, else
    [splits, n] partials for _combine_stats."""
    shape = (n,) if splits == 1 else (splits, n)
    return [like.new_empty(shape, dtype=dtype) for _ in range(3)]


def _combine_stats(lse, pos, rowsum):
    """(lse, pos, rowsum) of the whole rows from [splits, N] partials of column ranges (as is
    when there was one range): a logsumexp and two sums over the ranges, in a fixed order. An
    empty range holds lse -inf and zero sums; Inf and NaN pass as in one logsumexp."""
    if lse.dim() == 1:
        return lse, pos, rowsum
    return torch.logsumexp(lse, 0), pos.sum(0), rowsum.sum(0)


def _mlp_forward(a: _MlpArgs) -> tuple[Tensor, Tensor, Tensor]:
    splits = _column_splits(a.A.device, a.configs, a.N, a.M)
    lse, pos, rowsum = _split_stats(a.A, a.acc, splits, a.N)
    # the forward keeps only the layers below the last one
    z, zps, zls = a.scratch(a.g_row * splits, a.L if a.L >= 2 else 0)
    args = (a.A, a.B, a.W, a.Bias, a.w_out, a.b_out, z, lse, pos, rowsum,
            a.N, a.M, a.H, a.pos_offset, zps, zls)
    _launch(_MLP_FWD, a.family, (a.g_row, splits), args, a.constexprs(), a.det)
    return _combine_stats(lse, pos, rowsum)


def _mlp_backward(a: _MlpArgs, lse, g_lse, g_pos, g_row):
    det = a.det
    N, M, H, L = a.N, a.M, a.H, a.L
    lse = lse.to(a.acc).contiguous()
    grads = [g.to(a.acc).contiguous() for g in (g_lse, g_pos, g_row)]
    a.scale, inv = _mlp_dz_scale(a, grads)
    a.scaled = inv is not None
    # the row pass splits its rows' columns as the forward does (small N): one dA partial and
    # one set of slots per share, summed in order below
    splits = _column_splits(a.A.device, a.configs, N, M)
    dA = a.A.new_zeros((N, H) if splits == 1 else (splits, N, H), dtype=a.acc)
    dB = a.A.new_zeros((M, H), dtype=a.acc)
    G = a.g_row * splits
    chunked = L > 0 and _config.dw_mode() == "chunk"
    dW = a.A.new_zeros((G, L, H, H) if L and not chunked else (1,), dtype=a.acc)
    dBias = a.A.new_zeros((G, L, H) if L else (1,), dtype=a.acc)
    dWout = a.A.new_zeros((G, H), dtype=a.acc)
    dBout = a.A.new_zeros((G,), dtype=a.acc)
    accs = (dA, dB, dW, dBias, dWout, dBout)
    row_kw = dict(a.bwd_constexprs(), COL_PASS=False, ATOMIC_DB=not det)
    # program-private slots for the passes over the whole pair grid (one buffer for both)
    grids = ([] if chunked else [G]) + ([a.g_col] if det else [])
    if grids:
        z, zps, zls = a.scratch(max(grids), L)
        whole = _mlp_bwd_args(a, z, z, lse, grads, accs, zps, zls, 0, N, 0, M, 0)
    if chunked:
        dW_layers = _mlp_row_pass_chunked(a, lse, grads, accs, row_kw, det, splits)
    else:
        _launch(_MLP_BWD, a.family, (a.g_row, splits), whole, dict(row_kw, DW_CHUNK=False),
                det)
        dW_layers = [dW[:, l].sum(0) for l in range(L)]
    if det:
        _launch(_MLP_BWD, a.family, (a.g_col,), whole,
                dict(a.bwd_constexprs(), COL_PASS=True, ATOMIC_DB=False, DW_CHUNK=False), det)
    A, B, W, b, w_out, b_out = a.src
    # one sum per layer (not views of one sum): custom-op outputs may not alias each other;
    # summing the per-program slots in a fixed order keeps the weight gradients deterministic
    dBias_layers = [dBias[:, l].sum(0) for l in range(L)]
    dWout, dBout = dWout.sum(0), dBout.sum().reshape(b_out.shape)
    if splits > 1:
        dA = dA.sum(0)
    if inv is not None:
        dA, dB, dWout, dBout = dA * inv, dB * inv, dWout * inv, dBout * inv
        dW_layers = [g * inv for g in dW_layers]
        dBias_layers = [g * inv for g in dBias_layers]
    return (
        _like(dA, A),
        _like(dB, B),
        [_like(dW_layers[l], W[l]) for l in range(L)],
        [_like(dBias_layers[l], b[l]) for l in range(L)],
        _like(dWout, w_out),
        _like(dBout, b_out),
    )


def _mlp_bwd_args(a: _MlpArgs, z, hin, lse, grads, accs, zps, zls, row0, row1, col0, col1,
                  chunk_w) -> tuple:
    return (a.A, a.B, a.W, a.Bias, a.w_out, a.b_out, z, hin, lse, *grads, *accs, a.scale,
            a.N, a.M, a.H, a.pos_offset, zps, zls, row0, row1, col0, col1, chunk_w)


def _mlp_row_pass_chunked(a: _MlpArgs, lse, grads, accs, row_kw, det, splits: int,
                          launch_bwd=None) -> list[Tensor]:
    """The backward's row pass chunk by chunk of pairs, each followed by mlp_dw_kernel per layer
    (_config.DW_MODES): returns the hidden weights' gradients [H, H] per layer. ``splits``:
    shares of a chunk's column blocks per row block (the accumulators hold one slot per
    program and share). ``launch_bwd(grid, args, kwargs)`` replaces the autotuned backward
    launch (benchmarks)."""
    if launch_bwd is None:
        def launch_bwd(grid, args, kwargs):
            _launch(_MLP_BWD, a.family, grid, args, kwargs, det)
    N, M, H, L = a.N, a.M, a.H, a.L
    bi_max = _config.max_kwarg(a.configs, lambda k: k["BI"])
    bj_max = _config.max_kwarg(a.configs, lambda k: k["BJ"])
    per_pair = (2 * L - 1) * H * a.A.element_size()  # dz of every layer, inputs of layers >= 2
    rows, cols = _config.dw_chunk(N, M, per_pair, bi_max, bj_max)
    zls = rows * cols * H
    z = a.A.new_empty((L, rows * cols, H))
    hin = a.A.new_empty((L - 1, rows * cols, H)) if L >= 2 else z
    dw_cfg = _config.MLP_DW_CONFIGS[a.family][0].kwargs
    tiles = triton.cdiv(H, dw_cfg["BN"]) * triton.cdiv(H, dw_cfg["BK"])
    dw_splits = _config.dw_splits(a.A.device, tiles)
    part = a.A.new_zeros((L, dw_splits, H, H), dtype=a.acc)
    bi_min = _config.min_kwarg(a.configs, lambda k: k["BI"])
    for row0 in range(0, N, rows):
        row1 = min(N, row0 + rows)
        grid = min(a.g_row, _config.num_programs(a.A.device, triton.cdiv(row1 - row0, bi_min)))
        for col0 in range(0, M, cols):
            col1 = min(M, col0 + cols)
            launch_bwd((grid, splits),
                       _mlp_bwd_args(a, z, hin, lse, grads, accs, 0, zls, row0, row1, col0,
                                     col1, cols),
                       dict(row_kw, DW_CHUNK=True))
            for l in range(L):
                _launch(_MLP_DW, a.family, (tiles * dw_splits,),
                        (a.A, a.B, z[l], hin[l - 1] if l else z[l], part[l],
                         N, M, H, row0, row1, col0, col1, cols, dw_splits),
                        dict(FIRST=l == 0, ACT=a.act, PREC=a.prec, I64=a.i64), det)
    return [part[l].sum(0) for l in range(L)]


@_register("factorcl::triton_pair_mlp_stats")
def pair_mlp_stats(A: Tensor, B: Tensor, hidden_weights: list[Tensor],
                   hidden_biases: list[Tensor], w_out: Tensor, b_out: Tensor, activation: str,
                   out_activation: str, pos_offset: Optional[int], deterministic: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(lse, pos, rowsum) of the concat critic on A [N, H], B [M, H]; see factorcl_ext.ops."""
    _check_mlp_call(A, B, hidden_weights, hidden_biases, w_out, b_out, activation,
                    out_activation, pos_offset)
    a = _MlpArgs(A, B, hidden_weights, hidden_biases, w_out, b_out, activation, out_activation,
                 pos_offset, deterministic)
    return _mlp_forward(a)


@_register("factorcl::triton_pair_mlp_stats_backward")
def pair_mlp_stats_backward(grad_lse: Tensor, grad_pos: Tensor, grad_rowsum: Tensor, A: Tensor,
                            B: Tensor, hidden_weights: list[Tensor],
                            hidden_biases: list[Tensor], w_out: Tensor, b_out: Tensor,
                            lse: Tensor, activation: str, out_activation: str,
                            pos_offset: Optional[int], deterministic: bool
                            ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], Tensor, Tensor]:
    _check_mlp_call(A, B, hidden_weights, hidden_biases, w_out, b_out, activation,
                    out_activation, pos_offset)
    a = _MlpArgs(A, B, hidden_weights, hidden_biases, w_out, b_out, activation, out_activation,
                 pos_offset, deterministic)
    _check_row_vectors(a.N, A, ("grad_lse", grad_lse), ("grad_pos", grad_pos),
                       ("grad_rowsum", grad_rowsum), ("lse", lse))
    return _mlp_backward(a, lse, grad_lse, grad_pos, grad_rowsum)


@_register("factorcl::triton_pair_mlp_loss")
def pair_mlp_loss(A: Tensor, B: Tensor, hidden_weights: list[Tensor], hidden_biases: list[Tensor],
                  w_out: Tensor, b_out: Tensor, activation: str, out_activation: str,
                  pos_offset: Optional[int], c_lse: Number, c_pos: Number, c_rowsum: Number,
                  compute_grad: bool, deterministic: bool
                  ) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor], Tensor, Tensor]:
    _check_mlp_call(A, B, hidden_weights, hidden_biases, w_out, b_out, activation,
                    out_activation, pos_offset)
    a = _MlpArgs(A, B, hidden_weights, hidden_biases, w_out, b_out, activation, out_activation,
                 pos_offset, deterministic)
    lse, pos, rowsum = _mlp_forward(a)
    loss = (c_lse * lse + c_pos * pos + c_rowsum * rowsum).sum()
    if not compute_grad:
        return (loss, A.new_empty(0), B.new_empty(0), [w.new_empty(0) for w in hidden_weights],
                [b.new_empty(0) for b in hidden_biases], w_out.new_empty(0), b_out.new_empty(0))
    consts = [torch.full_like(lse, c) for c in (c_lse, c_pos, c_rowsum)]
    return (loss, *_mlp_backward(a, lse, *consts))


# --------------------------------------------------------------------------------------------
# separable critic (pair dot)
# --------------------------------------------------------------------------------------------


class _DotArgs:
    def __init__(self, G, H, pos_offset, exclude_offset, deterministic):
        _check_row_counts(G.shape[0], H.shape[0])
        self.src = (G, H)
        self.det = _deterministic(deterministic)
        self.G = G.contiguous()
        self.H = H.contiguous()
        self.N, self.D = G.shape
        self.M = H.shape[0]
        self.has_pos = pos_offset is not None
        self.pos_offset = int(pos_offset) if pos_offset is not None else 0
        self.has_excl = exclude_offset is not None
        self.exclude_offset = int(exclude_offset) if exclude_offset is not None else 0
        self.acc = _config.acc_dtype(G.dtype)
        self.prec = _config.dot_precision(G.dtype)
        self.family = _config.config_family(G.device, G.dtype)
        self.i64 = _needs_i64(max(self.N, self.M) * self.D)
        self.configs = _config.DOT_CONFIGS[self.family]
        self.bi_min = _config.min_kwarg(self.configs, lambda k: k["BI"])
        self.bj_min = _config.min_kwarg(self.configs, lambda k: k["BJ"])
        self.g_row = _config.num_programs(G.device, triton.cdiv(self.N, self.bi_min))
        self.g_col = _config.num_programs(G.device, triton.cdiv(self.M, self.bj_min))

    def head(self) -> tuple:
        return (self.N, self.M, self.D, self.pos_offset, self.exclude_offset)

    def constexprs(self) -> dict:
        return dict(HAS_POS=self.has_pos, HAS_EXCL=self.has_excl, PREC=self.prec, I64=self.i64)


def _dot_forward(a: _DotArgs):
    splits = _column_splits(a.G.device, a.configs, a.N, a.M)
    lse, pos, rowsum = _split_stats(a.G, a.acc, splits, a.N)
    args = (a.G, a.H, lse, pos, rowsum, *a.head())
    _launch(_DOT_FWD, a.family, (a.g_row, splits), args, a.constexprs(), a.det)
    return _combine_stats(lse, pos, rowsum)


def _ds_scale(a: _DotArgs, grads) -> tuple[Tensor, Optional[Tensor]]:
    """For 16-bit inputs: (scale, 1 / scale) by which the kernels multiply dS before rounding it
    to the input dtype (the float32 gradients are multiplied back), putting the largest bound on
    |dS| (_ds_bound) in (2^13, 2^14]: without it an InfoNCE loss's 1/N coefficients times softmax
    terms near 1/M fall below float16's smallest normal number (6e-5) from N = M = 128 on, and a
    loss-scaled gradient above 65504 overflows. Infinite or NaN upstream gradients are left out
    of the bound and reach the gradients as they would without it. (any tensor, None)
    otherwise."""
    if a.G.dtype not in (torch.float16, torch.bfloat16) or a.N == 0:
        return grads[0], None
    return _pow2_scale(_ds_bound(grads))


def _dot_backward(a: _DotArgs, lse, g_lse, g_pos, g_row):
    det = a.det
    lse = lse.to(a.acc).contiguous()
    grads = [g.to(a.acc).contiguous() for g in (g_lse, g_pos, g_row)]
    scale, inv = _ds_scale(a, grads)
    if not det and _config.dot_bwd_mode() == "chunk":
        return _dot_backward_chunked(a, lse, grads, scale, inv)
    dG = a.G.new_zeros((a.N, a.D), dtype=a.acc)
    dH = a.G.new_zeros((a.M, a.D), dtype=a.acc)
    args = (a.G, a.H, lse, *grads, dG, dH, scale, *a.head())
    kw = dict(a.constexprs(), SCALED=inv is not None)
    _launch(_DOT_BWD, a.family, (a.g_row,), args, dict(kw, COL_PASS=False, ATOMIC_DH=not det),
            det)
    if det:
        _launch(_DOT_BWD, a.family, (a.g_col,), args, dict(kw, COL_PASS=True, ATOMIC_DH=False),
                det)
    if inv is not None:
        dG, dH = dG * inv, dH * inv
    return _like(dG, a.src[0]), _like(dH, a.src[1])


# aten's mm / addmm with out_dtype (float32 results of 16-bit products; CUDA kernels only)
_OUT_DTYPE_MM = all("dtype" in op.overloads() for op in (torch.ops.aten.mm, torch.ops.aten.addmm))


def _mm_acc(a: Tensor, b: Tensor, acc: Optional[Tensor]) -> Tensor:
    """``acc + a @ b`` (``a @ b`` when acc is None): for 16-bit a and b in float32, the products
    accumulated in float32 by cuBLAS (``out_dtype``; elsewhere through float32 copies: the CPU,
    for the interpreter, and a torch without those overloads); float32 / float64 in their own
    dtype, acc in place."""
    if a.dtype in (torch.float16, torch.bfloat16):
        if a.is_cuda and _OUT_DTYPE_MM:
            if acc is None:
                return torch.mm(a, b, out_dtype=torch.float32)
            if _addmm_out_dtype_traces():
                return torch.addmm(acc, a, b, out_dtype=torch.float32)
            return acc.add_(torch.mm(a, b, out_dtype=torch.float32))
        a, b = a.float(), b.float()
    return torch.mm(a, b) if acc is None else acc.addmm_(a, b)


@functools.cache
def _addmm_out_dtype_traces() -> bool:
    """Whether ``torch.addmm(..., out_dtype=)`` has a working fake implementation, which
    torch.compile and the triton_op's fake pass run: torch 2.11's (the GPU machine's) takes
    out_dtype for ``beta`` and raises a TypeError; 2.14's works. Without it the sum is a product
    and an in-place add, in eager and traced runs alike (same rounding: one float32 add)."""
    import logging

    from torch._subclasses import fake_tensor

    log = logging.getLogger(fake_tensor.__name__)  # it logs the failure at ERROR level
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with fake_tensor.FakeTensorMode():
            x = torch.empty(2, 2, dtype=torch.bfloat16)
            torch.addmm(torch.empty(2, 2), x, x, out_dtype=torch.float32)
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        return False
    finally:
        log.setLevel(level)
    return True


def _dot_backward_chunked(a: _DotArgs, lse, grads, scale, inv):
    """_config.DOT_BWD_MODES "chunk": dS of whole rows, chunk by chunk, into a buffer of at most
    CHUNK_BYTES (one row at least); dG of those rows = dS H and dH += dS^T G by cuBLAS. ``scale``
    and ``inv``: _ds_scale."""
    N, M, D = a.N, a.M, a.D
    if N == 0 or M == 0:
        return torch.zeros_like(a.src[0]), torch.zeros_like(a.src[1])
    bi_max = _config.max_kwarg(a.configs, lambda k: k["BI"])
    rows = _config.ds_chunk_rows(N, M, a.G.element_size(), bi_max)
    buf = a.G.new_empty(rows * M)
    dG = a.G.new_empty((N, D)) if rows < N else None
    dH = None
    for row0 in range(0, N, rows):
        row1 = min(N, row0 + rows)
        ds = buf[: (row1 - row0) * M].view(row1 - row0, M)
        tiles = triton.cdiv(row1 - row0, a.bi_min) * triton.cdiv(M, a.bj_min)
        _launch(_DOT_DS, a.family, (_config.num_programs(a.G.device, tiles, per_sm=4),),
                (a.G, a.H, lse, *grads, ds, scale, *a.head(), row0, row1),
                dict(a.constexprs(), SCALED=inv is not None), False)
        # every column is in the chunk: these rows of dG are complete (rounded once)
        rows_dG = torch.mm(ds, a.H) if inv is None else _mm_acc(ds, a.H, None) * inv
        if dG is None:
            dG = rows_dG
        else:
            dG[row0:row1] = rows_dG
        dH = _mm_acc(ds.t(), a.G[row0:row1], dH)
    if inv is not None:
        dH = dH * inv
    return _like(dG, a.src[0]), _like(dH, a.src[1])


@_register("factorcl::triton_pair_dot_stats")
def pair_dot_stats(G: Tensor, H: Tensor, pos_offset: Optional[int],
                   exclude_offset: Optional[int], deterministic: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(lse, pos, rowsum) of s = G H^T; see factorcl_ext.ops.pair_dot_stats."""
    _check_dot_call(G, H, pos_offset, exclude_offset)
    return _dot_forward(_DotArgs(G, H, pos_offset, exclude_offset, deterministic))


@_register("factorcl::triton_pair_dot_stats_backward")
def pair_dot_stats_backward(grad_lse: Tensor, grad_pos: Tensor, grad_rowsum: Tensor, G: Tensor,
                            H: Tensor, lse: Tensor, pos_offset: Optional[int],
                            exclude_offset: Optional[int], deterministic: bool
                            ) -> tuple[Tensor, Tensor]:
    _check_dot_call(G, H, pos_offset, exclude_offset)
    a = _DotArgs(G, H, pos_offset, exclude_offset, deterministic)
    _check_row_vectors(a.N, G, ("grad_lse", grad_lse), ("grad_pos", grad_pos),
                       ("grad_rowsum", grad_rowsum), ("lse", lse))
    return _dot_backward(a, lse, grad_lse, grad_pos, grad_rowsum)


@_register("factorcl::triton_pair_dot_loss")
def pair_dot_loss(G: Tensor, H: Tensor, pos_offset: Optional[int], exclude_offset: Optional[int],
                  c_lse: Number, c_pos: Number, c_rowsum: Number, compute_grad: bool,
                  deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    _check_dot_call(G, H, pos_offset, exclude_offset)
    a = _DotArgs(G, H, pos_offset, exclude_offset, deterministic)
    lse, pos, rowsum = _dot_forward(a)
    loss = (c_lse * lse + c_pos * pos + c_rowsum * rowsum).sum()
    if not compute_grad:
        return loss, G.new_empty(0), H.new_empty(0)
    consts = [torch.full_like(lse, c) for c in (c_lse, c_pos, c_rowsum)]
    dG, dH = _dot_backward(a, lse, *consts)
    return loss, dG, dH


register_core_autograd("factorcl::triton_", pair_mlp_stats_backward, pair_dot_stats_backward)
register_core_vmap("factorcl::triton_")
