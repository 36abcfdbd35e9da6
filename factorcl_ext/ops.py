"""Public ops: the concat and separable critic statistics, their fused training losses, and the
MI bounds that follow from the statistics.

Layering (DESIGN.md section 5): the public functions apply the first layer (concat critic) or the
normalisation and temperature (separable critic) with ordinary PyTorch ops, which autograd
differentiates, and then call a core custom op of the ``factorcl`` namespace:

- ``pair_mlp_stats`` / ``pair_mlp_loss`` on ``A = u w_u^T`` [N, H] and ``B = v w_v^T + b_0`` [M, H],
- ``pair_dot_stats`` / ``pair_dot_loss`` on ``G = g / tau`` [N, D] and ``H = h`` [M, D].

The C++ (CPU, CUDA) kernels are the dispatcher's implementations of ``torch.ops.factorcl.*``;
their autograd (a hand-written backward op for the stats, pre-computed gradients for the losses)
and fake (meta) implementations are registered here with ``torch.library``, so ``torch.compile``
traces through them without graph breaks.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backends, reference
from ._autograd import register_core_autograd
from ._vmap import register_core_vmap

__all__ = [
    "CriticStats",
    "concat_critic_stats",
    "concat_critic_loss",
    "separable_critic_stats",
    "separable_critic_loss",
    "pair_mlp_stats",
    "pair_mlp_loss",
    "pair_dot_stats",
    "pair_dot_loss",
    "infonce_lower_bound",
    "nce_club_upper_bound",
]

ACTIVATIONS = ("relu", "tanh")
OUT_ACTIVATIONS = ("none", "softplus")
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_CPU_DTYPES = (torch.float32, torch.float64)
_GPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_FLOAT_DTYPES = _GPU_DTYPES


class CriticStats(NamedTuple):
    """Per-row statistics of an N x M score matrix s (each [N])."""

    lse: Tensor  #: log sum_j exp(s_ij)
    pos: Tensor  #: s_(i, i + pos_offset); zeros when pos_offset is None
    rowsum: Tensor  #: sum_j s_ij


# --------------------------------------------------------------------------------------------
# Validation: every bad input raises a ValueError / TypeError naming the argument and the shapes.
# --------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, ndim: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:  # the kernels read strided memory
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def _check_same(
    named: Sequence[tuple[str, Tensor]], allowed: Optional[Sequence[torch.dtype]] = None
) -> tuple[torch.device, torch.dtype]:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}: all inputs "
                "must be on one device"
            )
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}: all inputs "
                "must have one dtype"
            )
    dtype, device = first.dtype, first.device
    if allowed is None:
        allowed = _CPU_DTYPES if device.type == "cpu" else _GPU_DTYPES
    if dtype not in allowed:
        raise TypeError(
            f"{first_name} has dtype {dtype}; supported on {device.type}: "
            + ", ".join(str(d) for d in allowed)
        )
    return device, dtype


def _check_offset(name: str, offset, n: int, m: int, *, optional: bool = True) -> Optional[int]:
    if offset is None:
        if not optional:
            raise TypeError(f"{name} must be an int")
        return None
    if isinstance(offset, torch.SymInt):
        # an offset computed from a dynamic batch size (a rank's rank * N) under torch.compile or
        # torch.export: int() would specialise the graph on it; the C++ ops take SymInt
        torch._check(offset >= 0, lambda: f"{name} must be >= 0")
        torch._check(n + offset <= m, lambda: f"{name}: need N + {name} <= M")
        return offset
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(offset).__name__}")
    offset = int(offset)
    if offset < 0 or n + offset > m:
        raise ValueError(
            f"{name}={offset} is out of range for {n} rows and {m} columns: "
            f"need 0 <= {name} and N + {name} <= M"
        )
    return offset


def _check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _check_rows_cols(rows_name: str, rows: Tensor, cols_name: str, cols: Tensor) -> tuple[int, int]:
    n, m = rows.shape[0], cols.shape[0]
    if n == 0 or m == 0:
        raise ValueError(
            f"empty batch: {rows_name} has shape {tuple(rows.shape)} and {cols_name} has shape "
            f"{tuple(cols.shape)}; both need at least one row"
        )
    return n, m


def _check_pair_mlp(
    A, B, hidden_weights, hidden_biases, w_out, b_out, activation, out_activation, pos_offset,
    dtypes: Optional[Sequence[torch.dtype]] = None,
):
    _check_tensor("A", A, 2)
    _check_tensor("B", B, 2)
    if not (isinstance(hidden_weights, (list, tuple)) and isinstance(hidden_biases, (list, tuple))):
        raise TypeError("hidden_weights and hidden_biases must be lists (or tuples) of tensors")
    if len(hidden_weights) != len(hidden_biases):
        raise ValueError(
            f"hidden_weights has {len(hidden_weights)} layers but hidden_biases has "
            f"{len(hidden_biases)}"
        )
    n, m = _check_rows_cols("A", A, "B", B)
    h = A.shape[1]
    if B.shape[1] != h:
        raise ValueError(f"A has shape {tuple(A.shape)} and B {tuple(B.shape)}: widths must agree")
    if h == 0:
        raise ValueError(f"hidden width H must be at least 1, got A of shape {tuple(A.shape)}")
    for i, (w, b) in enumerate(zip(hidden_weights, hidden_biases)):
        _check_tensor(f"hidden_weights[{i}]", w, 2)
        _check_tensor(f"hidden_biases[{i}]", b, 1)
        if tuple(w.shape) != (h, h) or tuple(b.shape) != (h,):
            raise ValueError(
                f"hidden layer {i}: expected weight ({h}, {h}) and bias ({h},), got "
                f"{tuple(w.shape)} and {tuple(b.shape)}"
            )
    _check_tensor("w_out", w_out, 1)
    _check_tensor("b_out", b_out)
    if tuple(w_out.shape) != (h,):
        raise ValueError(f"w_out must have shape ({h},), got {tuple(w_out.shape)}")
    if b_out.numel() != 1 or b_out.dim() > 1:
        raise ValueError(f"b_out must be a scalar (shape () or (1,)), got {tuple(b_out.shape)}")
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("out_activation", out_activation, OUT_ACTIVATIONS)
    named = [("A", A), ("B", B)]
    named += [(f"hidden_weights[{i}]", w) for i, w in enumerate(hidden_weights)]
    named += [(f"hidden_biases[{i}]", b) for i, b in enumerate(hidden_biases)]
    named += [("w_out", w_out), ("b_out", b_out)]
    device, _ = _check_same(named, dtypes)
    pos_offset = _check_offset("pos_offset", pos_offset, n, m)
    return device, pos_offset


def _check_pair_dot(G, H, pos_offset, exclude_offset,
                    dtypes: Optional[Sequence[torch.dtype]] = None):
    _check_tensor("g", G, 2)
    _check_tensor("h", H, 2)
    n, m = _check_rows_cols("g", G, "h", H)
    if G.shape[1] != H.shape[1]:
        raise ValueError(
            f"g has shape {tuple(G.shape)} and h {tuple(H.shape)}: embedding widths must agree"
        )
    device, _ = _check_same([("g", G), ("h", H)], dtypes)
    pos_offset = _check_offset("pos_offset", pos_offset, n, m)
    exclude_offset = _check_offset("exclude_offset", exclude_offset, n, m)
    if m == 1 and exclude_offset is not None:
        raise ValueError("exclude_offset with a single column leaves nothing in the logsumexp")
    return device, pos_offset, exclude_offset


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_coefficients(**coefs) -> tuple[float, ...]:
    out = []
    for name, c in coefs.items():
        if isinstance(c, (torch.SymFloat, torch.SymInt)):
            # a traced 1/N of a dynamic batch size (torch.export, make_fx; under torch.compile
            # dynamo hands the checks a float and keeps it symbolic itself): float() would
            # specialise the graph on it, and the ops take it as a Scalar
            out.append(c)
            continue
        if isinstance(c, bool) or not isinstance(c, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(c).__name__}")
        out.append(float(c))
    return tuple(out)


_LN2 = math.log(2.0)


def _log_count(n, like: Tensor):
    """``log(n)`` of a count such as a batch size, as ``log2(n) * ln 2`` (within an ulp of
    ``math.log(n)``), to combine with the 0-dim tensor ``like``. Under torch.compile with dynamic
    shapes ``n`` is symbolic, and ``math.log`` of it would specialise the graph on its value,
    while log2 is one of the math functions dynamo keeps symbolic; eager code takes the same
    formula, so that compiled and eager values agree to the bit. torch.export's graphs allow no
    log of a symbolic size: when exporting with a dynamic batch, the log is a tensor op on the
    size instead (0-dim, ``like``'s dtype and device)."""
    if isinstance(n, torch.SymInt) and torch.compiler.is_exporting():
        size = torch.full((), n, dtype=torch.float64, device=like.device)
        return (torch.log2(size) * _LN2).to(like.dtype)
    return math.log2(n) * _LN2


def _check_count(name: str, n) -> None:
    if isinstance(n, torch.SymInt):  # traced size (torch.export, make_fx): not numbers.Integral
        torch._check(n >= 1, lambda: f"{name} must be a positive int")
        return
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _autocast_enabled(device: torch.device) -> bool:
    return device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype the fused core ops run in under ``torch.autocast`` on ``device``; None outside it.

    CUDA: the autocast dtype, as for any matrix product (DESIGN.md section 6). CPU: float32,
    since the CPU kernels have no 16-bit path (autocast's float32 policy): autocast's bfloat16
    matrix products around the op, such as the first layer, stay in bfloat16.
    """
    if not _autocast_enabled(device):
        return None
    return torch.float32 if device.type == "cpu" else torch.get_autocast_dtype(device.type)


def _autocast(dtype: Optional[torch.dtype], t):
    """``t`` cast to ``dtype`` where autocast would cast it (a floating tensor other than
    float64); anything else unchanged."""
    if dtype is None or not isinstance(t, Tensor) or not t.is_floating_point():
        return t
    return t if t.dtype in (dtype, torch.float64) else t.to(dtype)


def _without_autocast(device: torch.device):
    """The reference backend runs in the dtype the fused op was given, as the compiled backends do:
    autocast is off inside it (otherwise its CPU pair products would run in bfloat16)."""
    if _autocast_enabled(device):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _autocast_mlp(A, B, hidden_weights, hidden_biases, w_out, b_out):
    """Under autocast, A and B come out of autocast matmuls in the low-precision dtype while the
    parameters stay float32: run the fused op in :func:`_autocast_dtype`."""
    if not (isinstance(A, Tensor) and isinstance(hidden_weights, (list, tuple))
            and isinstance(hidden_biases, (list, tuple))):
        return A, B, hidden_weights, hidden_biases, w_out, b_out
    dtype = _autocast_dtype(A.device)
    if dtype is None:
        return A, B, hidden_weights, hidden_biases, w_out, b_out
    return (
        _autocast(dtype, A), _autocast(dtype, B), [_autocast(dtype, w) for w in hidden_weights],
        [_autocast(dtype, b) for b in hidden_biases], _autocast(dtype, w_out),
        _autocast(dtype, b_out),
    )


def _autocast_dot(G, H):
    """Under autocast, G and H in :func:`_autocast_dtype` (a float32 memory bank against bfloat16
    embeddings, or bfloat16 embeddings on the CPU, just work)."""
    if not isinstance(G, Tensor):
        return G, H
    dtype = _autocast_dtype(G.device)
    return _autocast(dtype, G), _autocast(dtype, H)


def _wants_grad(*tensors: Tensor) -> bool:
    """Whether a loss op should form its input gradients. Under torch.vmap the batched tensors
    hide ``requires_grad`` (the vmap rule calls the op on the underlying entries, which autograd
    then records), so with a batched input it is always yes; eager or traced by torch.compile
    (where a check of the functorch transform stack was skipped, and a compiled vmap of the
    separable loss failed in backward with "compute_grad=False"). Under torch.jit.trace always
    yes: the trace serves calls with and without gradients (and its check, which traces again
    under no_grad, found the two graphs different)."""
    if torch.jit.is_tracing():
        return True
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad or torch._C._functorch.is_batchedtensor(t) for t in tensors)


# --------------------------------------------------------------------------------------------
# torch.library registrations of the C++ core ops: fake (shape) functions and autograd.
# --------------------------------------------------------------------------------------------


def _register_compiled_ops() -> None:
    @torch.library.register_fake("factorcl::pair_mlp_stats")
    def _pair_mlp_stats_fake(A, B, hidden_weights, hidden_biases, w_out, b_out, activation,
                             out_activation, pos_offset):
        torch._check(A.dim() == 2 and B.dim() == 2, lambda: "A and B must be 2-D")
        torch._check(A.shape[1] == B.shape[1], lambda: "A and B widths must agree")
        n = A.shape[0]
        dtype = _stats_dtype(A.dtype)
        return A.new_empty(n, dtype=dtype), A.new_empty(n, dtype=dtype), A.new_empty(n, dtype=dtype)

    @torch.library.register_fake("factorcl::pair_mlp_stats_backward")
    def _pair_mlp_stats_backward_fake(grad_lse, grad_pos, grad_rowsum, A, B, hidden_weights,
                                      hidden_biases, w_out, b_out, lse, activation,
                                      out_activation, pos_offset):
        return (
            torch.empty_like(A),
            torch.empty_like(B),
            [torch.empty_like(w) for w in hidden_weights],
            [torch.empty_like(b) for b in hidden_biases],
            torch.empty_like(w_out),
            torch.empty_like(b_out),
        )

    @torch.library.register_fake("factorcl::pair_mlp_loss")
    def _pair_mlp_loss_fake(A, B, hidden_weights, hidden_biases, w_out, b_out, activation,
                            out_activation, pos_offset, c_lse, c_pos, c_rowsum, compute_grad):
        loss = A.new_empty((), dtype=_stats_dtype(A.dtype))

        def grad_like(t):
            return torch.empty_like(t) if compute_grad else t.new_empty(0)

        return (
            loss,
            grad_like(A),
            grad_like(B),
            [grad_like(w) for w in hidden_weights],
            [grad_like(b) for b in hidden_biases],
            grad_like(w_out),
            grad_like(b_out),
        )

    @torch.library.register_fake("factorcl::pair_dot_stats")
    def _pair_dot_stats_fake(G, H, pos_offset, exclude_offset):
        torch._check(G.dim() == 2 and H.dim() == 2, lambda: "G and H must be 2-D")
        n = G.shape[0]
        dtype = _stats_dtype(G.dtype)
        return G.new_empty(n, dtype=dtype), G.new_empty(n, dtype=dtype), G.new_empty(n, dtype=dtype)

    @torch.library.register_fake("factorcl::pair_dot_stats_backward")
    def _pair_dot_stats_backward_fake(grad_lse, grad_pos, grad_rowsum, G, H, lse, pos_offset,
                                      exclude_offset):
        return torch.empty_like(G), torch.empty_like(H)

    @torch.library.register_fake("factorcl::pair_dot_loss")
    def _pair_dot_loss_fake(G, H, pos_offset, exclude_offset, c_lse, c_pos, c_rowsum,
                            compute_grad):
        loss = G.new_empty((), dtype=_stats_dtype(G.dtype))
        if compute_grad:
            return loss, torch.empty_like(G), torch.empty_like(H)
        return loss, G.new_empty(0), H.new_empty(0)

    register_core_autograd(
        "factorcl::",
        torch.ops.factorcl.pair_mlp_stats_backward,
        torch.ops.factorcl.pair_dot_stats_backward,
    )
    register_core_vmap("factorcl::")


if _backends.has_cpu_kernels():
    _register_compiled_ops()


def _has_tangent(args) -> bool:
    """Whether a tensor among ``args`` (lists included) is a forward-mode AD dual tensor."""
    unpack_dual = torch.autograd.forward_ad.unpack_dual
    for a in args:
        for t in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(t, Tensor) and unpack_dual(t).tangent is not None:
                return True
    return False


def _refuse_differentiating_transforms(name: str, backend: str, args) -> None:
    """The compiled backends' autograd is a hand-written backward (reverse mode, through
    ``torch.library.register_autograd``), which PyTorch runs for ``torch.autograd`` only. Forward-
    mode AD (``torch.autograd.forward_ad`` dual tensors, ``torch.func.jvp`` / ``jacfwd``) would
    pass a tangent straight through to the kernel and drop it: a silently zero derivative. The
    torch.func reverse transforms (``grad``, ``vjp``, ``jacrev``) fail inside PyTorch with a
    message about ``setup_context`` that names neither the op nor a way out. Both are refused
    here, naming the op. ``torch.vmap`` is let through (the ops run once per batch entry,
    ``_vmap``), and ``torch.func.functionalize``, which differentiates nothing. Under
    torch.compile the functorch transform stack cannot be read (dynamo cannot trace it; the
    reverse transforms fail inside PyTorch there), but a tangent can: a compiled ``jvp`` /
    ``jacfwd`` or dual tensor is refused too (its derivative came back as zeros)."""
    reverse_only = ("its hand-written backward is reverse-mode only, for torch.autograd "
                    "(.backward(), torch.autograd.grad). Use torch.autograd")
    how = why = None
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        kind = torch._C._functorch.TransformType
        undifferentiated = (kind.Vmap, kind.Functionalize)  # they differentiate nothing
        if any(i.key() not in undifferentiated
               for i in torch._C._functorch.get_interpreter_stack()):
            how = "torch.func transforms other than vmap (grad, vjp, jvp, jacrev, jacfwd, hessian)"
            why = reverse_only
    if how is None and torch.autograd.forward_ad._current_level >= 0 and _has_tangent(args):
        how, why = "forward-mode AD (dual tensors of torch.autograd.forward_ad)", reverse_only
    if how is not None:
        raise NotImplementedError(
            f"factorcl_ext: {name} with backend='{backend}' does not support {how}: {why}, or "
            "backend='reference', which is made of PyTorch ops and supports every transform"
        )


def _core(name: str, backend: str, deterministic: bool, args: tuple):
    """The core op ``name`` of a concrete (resolved) backend, called with the C++ op's arguments
    ``args``. ``deterministic``: the Triton twin takes it as its last argument; the C++ kernels
    are deterministic in every mode (no atomics; the CPU's reduction order is fixed for a thread
    count), so they need no flag."""
    _refuse_differentiating_transforms(name, backend, args)
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.factorcl, name)(*args)
    if backend == "triton":
        from . import triton as triton_backend

        op = getattr(triton_backend, name)
        # its schemas (inferred from annotations) take plain ints: a symbolic offset is made
        # concrete here, as before the C++ schemas took SymInt
        return op(*(int(a) if isinstance(a, torch.SymInt) else a for a in args), deterministic)
    raise AssertionError(backend)


# --------------------------------------------------------------------------------------------
# Core-level public functions (A, B already formed; G already scaled).
# --------------------------------------------------------------------------------------------


def pair_mlp_stats(
    A: Tensor,
    B: Tensor,
    hidden_weights: Sequence[Tensor],
    hidden_biases: Sequence[Tensor],
    w_out: Tensor,
    b_out: Tensor,
    *,
    activation: str = "relu",
    out_activation: str = "none",
    pos_offset: Optional[int] = 0,
    backend: str = "auto",
    deterministic: bool = False,
) -> CriticStats:
    """Concat-critic statistics from the split first layer.

    ``s_ij = out_act(w_out . MLP(act(A_i + B_j)) + b_out)`` with ``A`` [N, H], ``B`` [M, H]
    (``B`` includes the first-layer bias), ``hidden_weights[l]`` [H, H], ``hidden_biases[l]`` [H],
    ``w_out`` [H], ``b_out`` [] or [1]. Returns ``CriticStats(lse, pos, rowsum)``, each [N].
    ``deterministic=True``: bit-identical values and gradients run to run on every backend (the
    Triton backend then avoids atomics for this call, as its global deterministic mode does; the
    C++ kernels are deterministic always, the CPU's at a fixed thread count; ``reference`` is as
    deterministic as PyTorch's own ops). The same keyword is on every public op.
    """
    A, B, hidden_weights, hidden_biases, w_out, b_out = _autocast_mlp(
        A, B, hidden_weights, hidden_biases, w_out, b_out
    )
    device, pos_offset = _check_pair_mlp(
        A, B, hidden_weights, hidden_biases, w_out, b_out, activation, out_activation, pos_offset
    )
    backend = _backends.resolve(backend, device)
    _check_bool("deterministic", deterministic)
    b_out = b_out.reshape(())
    if backend == "reference":
        with _without_autocast(device):
            return CriticStats(*reference.pair_mlp_stats(
                A, B, hidden_weights, hidden_biases, w_out, b_out, activation, out_activation,
                pos_offset,
            ))
    out = _core("pair_mlp_stats", backend, deterministic, (
        A, B, list(hidden_weights), list(hidden_biases), w_out, b_out, activation,
        out_activation, pos_offset,
    ))
    return CriticStats(*out)


def pair_mlp_loss(
    A: Tensor,
    B: Tensor,
    hidden_weights: Sequence[Tensor],
    hidden_biases: Sequence[Tensor],
    w_out: Tensor,
    b_out: Tensor,
    *,
    c_lse: float = 0.0,
    c_pos: float = 0.0,
    c_rowsum: float = 0.0,
    activation: str = "relu",
    out_activation: str = "none",
    pos_offset: Optional[int] = 0,
    backend: str = "auto",
    deterministic: bool = False,
) -> Tensor:
    """``sum_i c_lse*lse_i + c_pos*pos_i + c_rowsum*rowsum_i`` of :func:`pair_mlp_stats`, 0-dim.

    The training fast path: the compiled backends form every gradient in the forward pass
    (when grad mode is on and an input requires grad) and backward only scales them.
    """
    A, B, hidden_weights, hidden_biases, w_out, b_out = _autocast_mlp(
        A, B, hidden_weights, hidden_biases, w_out, b_out
    )
    device, pos_offset = _check_pair_mlp(
        A, B, hidden_weights, hidden_biases, w_out, b_out, activation, out_activation, pos_offset
    )
    c_lse, c_pos, c_rowsum = _check_coefficients(c_lse=c_lse, c_pos=c_pos, c_rowsum=c_rowsum)
    if pos_offset is None and c_pos != 0.0:
        raise ValueError("c_pos is nonzero but pos_offset is None (no positives)")
    backend = _backends.resolve(backend, device)
    _check_bool("deterministic", deterministic)
    b_out = b_out.reshape(())
    if backend == "reference":
        with _without_autocast(device):
            lse, pos, rowsum = reference.pair_mlp_stats(
                A, B, hidden_weights, hidden_biases, w_out, b_out, activation, out_activation,
                pos_offset,
            )
        return (c_lse * lse + c_pos * pos + c_rowsum * rowsum).sum()
    compute_grad = _wants_grad(A, B, w_out, b_out, *hidden_weights, *hidden_biases)
    out = _core("pair_mlp_loss", backend, deterministic, (
        A, B, list(hidden_weights), list(hidden_biases), w_out, b_out, activation,
        out_activation, pos_offset, c_lse, c_pos, c_rowsum, compute_grad,
    ))
    return out[0]


def pair_dot_stats(
    G: Tensor,
    H: Tensor,
    *,
    pos_offset: Optional[int] = 0,
    exclude_offset: Optional[int] = None,
    backend: str = "auto",
    deterministic: bool = False,
) -> CriticStats:
    """Statistics of ``s = G H^T`` (G [N, D], H [M, D]); see :func:`separable_critic_stats`."""
    G, H = _autocast_dot(G, H)
    device, pos_offset, exclude_offset = _check_pair_dot(G, H, pos_offset, exclude_offset)
    backend = _backends.resolve(backend, device)
    _check_bool("deterministic", deterministic)
    if backend == "reference":
        with _without_autocast(device):
            return CriticStats(*reference.pair_dot_stats(G, H, pos_offset, exclude_offset))
    out = _core("pair_dot_stats", backend, deterministic, (G, H, pos_offset, exclude_offset))
    return CriticStats(*out)


def pair_dot_loss(
    G: Tensor,
    H: Tensor,
    *,
    c_lse: float = 0.0,
    c_pos: float = 0.0,
    c_rowsum: float = 0.0,
    pos_offset: Optional[int] = 0,
    exclude_offset: Optional[int] = None,
    backend: str = "auto",
    deterministic: bool = False,
) -> Tensor:
    """``sum_i c_lse*lse_i + c_pos*pos_i + c_rowsum*rowsum_i`` of :func:`pair_dot_stats`, 0-dim."""
    G, H = _autocast_dot(G, H)
    device, pos_offset, exclude_offset = _check_pair_dot(G, H, pos_offset, exclude_offset)
    c_lse, c_pos, c_rowsum = _check_coefficients(c_lse=c_lse, c_pos=c_pos, c_rowsum=c_rowsum)
    if pos_offset is None and c_pos != 0.0:
        raise ValueError("c_pos is nonzero but pos_offset is None (no positives)")
    backend = _backends.resolve(backend, device)
    _check_bool("deterministic", deterministic)
    if backend == "reference":
        with _without_autocast(device):
            lse, pos, rowsum = reference.pair_dot_stats(G, H, pos_offset, exclude_offset)
        return (c_lse * lse + c_pos * pos + c_rowsum * rowsum).sum()
    compute_grad = _wants_grad(G, H)
    out = _core("pair_dot_loss", backend, deterministic, (
        G, H, pos_offset, exclude_offset, c_lse, c_pos, c_rowsum, compute_grad,
    ))
    return out[0]


# --------------------------------------------------------------------------------------------
# Critic-level public functions.
# --------------------------------------------------------------------------------------------


def _first_layer(u, v, w_u, w_v, b_0) -> tuple[Tensor, Tensor]:
    _check_tensor("u", u, 2)
    _check_tensor("v", v, 2)
    _check_tensor("w_u", w_u, 2)
    _check_tensor("w_v", w_v, 2)
    _check_tensor("b_0", b_0, 1)
    h = w_u.shape[0]
    if w_u.shape[1] != u.shape[1]:
        raise ValueError(
            f"w_u has shape {tuple(w_u.shape)} but u has shape {tuple(u.shape)}: need w_u [H, du]"
        )
    if tuple(w_v.shape) != (h, v.shape[1]):
        raise ValueError(
            f"w_v has shape {tuple(w_v.shape)}, expected ({h}, {v.shape[1]}) for v of shape "
            f"{tuple(v.shape)} and w_u of shape {tuple(w_u.shape)}"
        )
    if tuple(b_0.shape) != (h,):
        raise ValueError(f"b_0 must have shape ({h},), got {tuple(b_0.shape)}")
    _check_rows_cols("u", u, "v", v)
    # Under autocast the two products run in the autocast dtype whatever the inputs' (bfloat16
    # features from an autocast encoder against float32 weights): check them in that dtype.
    named = [("u", u), ("v", v), ("w_u", w_u), ("w_v", w_v), ("b_0", b_0)]
    if _autocast_enabled(u.device):
        dtype = torch.get_autocast_dtype(u.device.type)
        _check_same([(name, _autocast(dtype, t)) for name, t in named], _FLOAT_DTYPES)
    else:
        _check_same(named)
    return u @ w_u.t(), torch.addmm(b_0, v, w_v.t())


def concat_critic_stats(
    u: Tensor,
    v: Tensor,
    w_u: Tensor,
    w_v: Tensor,
    b_0: Tensor,
    hidden_weights: Sequence[Tensor],
    hidden_biases: Sequence[Tensor],
    w_out: Tensor,
    b_out: Tensor,
    *,
    activation: str = "relu",
    out_activation: str = "none",
    pos_offset: Optional[int] = 0,
    backend: str = "auto",
    deterministic: bool = False,
) -> CriticStats:
    """Row statistics of the concat critic on all N x M pairs, without materialising them.

    ``s_ij = out_act(w_out . h_L + b_out)``, ``h_0 = act(w_u u_i + w_v v_j + b_0)``,
    ``h_l = act(W_l h_(l-1) + b_l)``. Shapes: u [N, du], v [M, dv], w_u [H, du], w_v [H, dv],
    b_0 [H], hidden_weights[l] [H, H], hidden_biases[l] [H], w_out [H], b_out [] or [1].
    Returns ``CriticStats(lse, pos, rowsum)``: ``lse_i = log sum_j exp s_ij``,
    ``pos_i = s_(i, i+pos_offset)`` (zeros when ``pos_offset`` is None),
    ``rowsum_i = sum_j s_ij``. Differentiable in every tensor argument.
    """
    A, B = _first_layer(u, v, w_u, w_v, b_0)
    return pair_mlp_stats(
        A, B, hidden_weights, hidden_biases, w_out, b_out, activation=activation,
        out_activation=out_activation, pos_offset=pos_offset, backend=backend,
        deterministic=deterministic,
    )


def concat_critic_loss(
    u: Tensor,
    v: Tensor,
    w_u: Tensor,
    w_v: Tensor,
    b_0: Tensor,
    hidden_weights: Sequence[Tensor],
    hidden_biases: Sequence[Tensor],
    w_out: Tensor,
    b_out: Tensor,
    *,
    c_lse: float = 0.0,
    c_pos: float = 0.0,
    c_rowsum: float = 0.0,
    activation: str = "relu",
    out_activation: str = "none",
    pos_offset: Optional[int] = 0,
    backend: str = "auto",
    deterministic: bool = False,
) -> Tensor:
    """Fused training loss ``sum_i c_lse*lse_i + c_pos*pos_i + c_rowsum*rowsum_i`` (0-dim) of
    :func:`concat_critic_stats`, gradients formed in the forward pass.

    The negative InfoNCE bound is ``c_lse=1/N, c_pos=-1/N`` minus ``log M``; the NCE-CLUB bound
    is ``c_pos=1/N, c_rowsum=-1/(N*M)``.
    """
    A, B = _first_layer(u, v, w_u, w_v, b_0)
    return pair_mlp_loss(
        A, B, hidden_weights, hidden_biases, w_out, b_out, c_lse=c_lse, c_pos=c_pos,
        c_rowsum=c_rowsum, activation=activation, out_activation=out_activation,
        pos_offset=pos_offset, backend=backend,
        deterministic=deterministic,
    )


def _scaled(g: Tensor, h: Tensor, temperature, normalize: bool) -> tuple[Tensor, Tensor]:
    _check_tensor("g", g, 2)
    _check_tensor("h", h, 2)
    g, h = _autocast_dot(g, h)
    _check_same([("g", g), ("h", h)])
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1 or temperature.dim() > 1:
            raise ValueError(
                "temperature must be a float or a 0-dim tensor, got shape "
                f"{tuple(temperature.shape)}"
            )
        if temperature.device != g.device:
            raise ValueError(f"temperature is on {temperature.device} but g is on {g.device}")
        temperature = temperature.reshape(()).to(g.dtype)
    elif isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(
            f"temperature must be a float or a tensor, got {type(temperature).__name__}"
        )
    elif not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    _check_bool("normalize", normalize)
    if normalize:
        g = F.normalize(g, dim=1)
        h = F.normalize(h, dim=1)
    return g / temperature, h


def separable_critic_stats(
    g: Tensor,
    h: Tensor,
    *,
    temperature: Union[float, Tensor] = 1.0,
    normalize: bool = False,
    pos_offset: Optional[int] = 0,
    exclude_offset: Optional[int] = None,
    backend: str = "auto",
    deterministic: bool = False,
) -> CriticStats:
    """Row statistics of the separable critic ``s_ij = (g_i . h_j) / temperature``.

    g [N, D], h [M, D]; ``normalize`` L2-normalises both first. ``temperature`` is a float or a
    0-dim tensor (which receives its gradient). ``exclude_offset`` removes column
    ``i + exclude_offset`` from row i's logsumexp and row sum (SimCLR's own view).
    """
    G, H = _scaled(g, h, temperature, normalize)
    return pair_dot_stats(
        G, H, pos_offset=pos_offset, exclude_offset=exclude_offset, backend=backend,
        deterministic=deterministic,
    )


def separable_critic_loss(
    g: Tensor,
    h: Tensor,
    *,
    c_lse: float = 0.0,
    c_pos: float = 0.0,
    c_rowsum: float = 0.0,
    temperature: Union[float, Tensor] = 1.0,
    normalize: bool = False,
    pos_offset: Optional[int] = 0,
    exclude_offset: Optional[int] = None,
    backend: str = "auto",
    deterministic: bool = False,
) -> Tensor:
    """Fused training loss of :func:`separable_critic_stats` (0-dim)."""
    G, H = _scaled(g, h, temperature, normalize)
    return pair_dot_loss(
        G, H, c_lse=c_lse, c_pos=c_pos, c_rowsum=c_rowsum, pos_offset=pos_offset,
        exclude_offset=exclude_offset, backend=backend,
        deterministic=deterministic,
    )


def _check_row_stats(*named: tuple[str, Tensor]) -> None:
    """Per-row statistics of one batch: 1-D tensors of one length."""
    for name, t in named:
        _check_tensor(name, t, 1)
    (first_name, first), *rest = named
    for name, t in rest:
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first_name} has "
                             f"{tuple(first.shape)}: the statistics of one batch's rows")


def infonce_lower_bound(lse: Tensor, pos: Tensor, num_cols: int) -> Tensor:
    """InfoNCE lower bound ``I_NCE = mean(pos) - mean(lse) + log M``, M = ``num_cols``: the number
    of columns in each row's logsumexp (stats with ``exclude_offset`` leave one out: pass M - 1,
    as ``FusedSeparableCritic.infonce_lower_bound`` does)."""
    _check_row_stats(("lse", lse), ("pos", pos))
    _check_count("num_cols", num_cols)
    return pos.mean() - lse.mean() + _log_count(num_cols, lse)


def nce_club_upper_bound(pos: Tensor, rowsum: Tensor, num_cols: int) -> Tensor:
    """NCE-CLUB upper bound ``I_CLUB = mean(pos) - sum(rowsum) / (N*M)``, M = ``num_cols``: the
    number of columns in each row's sum (M - 1 with ``exclude_offset``)."""
    _check_row_stats(("pos", pos), ("rowsum", rowsum))
    _check_count("num_cols", num_cols)
    return pos.mean() - rowsum.sum() / (rowsum.shape[0] * num_cols)
