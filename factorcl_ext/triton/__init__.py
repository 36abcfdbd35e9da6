"""Triton backend of factorcl_ext's core ops (GPU; CPU tensors under ``TRITON_INTERPRET=1``).

``factorcl_ext.ops`` calls these as ``backend="triton"``: ``pair_mlp_stats``, ``pair_mlp_loss``,
``pair_dot_stats``, ``pair_dot_loss`` (plus the two hand-written backward ops), with the schemas
of csrc/ops.cpp, registered as ``torch.ops.factorcl.triton_*`` by ``torch.library.triton_op``.

Determinism: gradients are bit-identical run to run with ``set_deterministic(True)`` (or the
``deterministic()`` context manager, ``torch.use_deterministic_algorithms(True)``, or
``FACTORCL_TRITON_DETERMINISTIC=1`` in the environment at import). It costs a second, column-side
recomputing sweep of the backward instead of float32 atomics, and a fixed tile configuration
instead of autotuning.

Weight gradients of the concat critic: ``set_dw_mode("chunk")`` (default) reduces them as a GEMM
over chunks of pairs (a buffer of at most ``FACTORCL_TRITON_CHUNK_MB``, 256 MiB), ``"slots"``
in per-program float32 slots, pair tile by pair tile (``FACTORCL_TRITON_DW`` at import;
``using_dw_mode(mode)`` is the context-manager form). Both are deterministic.

Gradients of the separable critic: ``set_dot_bwd_mode("chunk")`` (default) writes dS for chunks
of rows into the same bounded buffer and forms ``dS H`` and ``dS^T G`` with cuBLAS; ``"fused"``
accumulates them tile by tile in the backward kernel, dH by float32 atomics
(``FACTORCL_TRITON_DOT_BWD`` at import; ``using_dot_bwd_mode(mode)``). The deterministic mode
always runs the fused kernel as a row pass and a column pass.

Autotuning: on a GPU each new (N, M, H, L, dtype) compiles and times a short list of tile
configurations (tens of seconds, once per shape and process). ``FACTORCL_TRITON_AUTOTUNE=0`` in the
environment at import uses the fixed first configuration instead (what the GPU tests do).

``TRITON_INTERPRET`` is read by Triton when the kernels are decorated, i.e. when this package is
first imported: set it before importing factorcl_ext.triton.
"""

from ._config import (
    deterministic,
    dot_bwd_mode,
    dw_mode,
    is_deterministic,
    set_deterministic,
    set_dot_bwd_mode,
    set_dw_mode,
    using_dot_bwd_mode,
    using_dw_mode,
)
from .ops import (
    pair_dot_loss,
    pair_dot_stats,
    pair_dot_stats_backward,
    pair_mlp_loss,
    pair_mlp_stats,
    pair_mlp_stats_backward,
)

__all__ = [
    "deterministic",
    "is_deterministic",
    "set_deterministic",
    "dw_mode",
    "set_dw_mode",
    "using_dw_mode",
    "dot_bwd_mode",
    "set_dot_bwd_mode",
    "using_dot_bwd_mode",
    "pair_dot_loss",
    "pair_dot_stats",
    "pair_dot_stats_backward",
    "pair_mlp_loss",
    "pair_mlp_stats",
    "pair_mlp_stats_backward",
]
