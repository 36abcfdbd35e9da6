"""Materialising PyTorch reference of both critic families: the test oracle, the benchmark
baseline and the ``backend="reference"`` path. Memory grows as N*M*H: use it on small shapes.

Autograd differentiates it; nothing here is fused.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "pair_mlp_scores",
    "pair_dot_scores",
    "stats_from_scores",
    "pair_mlp_stats",
    "pair_dot_stats",
    "concat_critic_stats",
    "separable_critic_stats",
    "tiled_pair_scores",
    "tiled_infonce_loss",
]


def _act(x: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return torch.relu(x)
    if activation == "tanh":
        return torch.tanh(x)
    raise ValueError(f"activation must be 'relu' or 'tanh', got {activation!r}")


def _out_act(s: Tensor, out_activation: str) -> Tensor:
    if out_activation == "none":
        return s
    if out_activation == "softplus":
        return F.softplus(s)  # beta=1, threshold=20, as nn.Softplus()
    raise ValueError(f"out_activation must be 'none' or 'softplus', got {out_activation!r}")


def pair_mlp_scores(
    A: Tensor,
    B: Tensor,
    hidden_weights: Sequence[Tensor],
    hidden_biases: Sequence[Tensor],
    w_out: Tensor,
    b_out: Tensor,
    activation: str = "relu",
    out_activation: str = "none",
) -> Tensor:
    """All N x M concat-critic scores from the split first layer: A [N, H], B [M, H] -> s [N, M].

    Materialises the [N, M, H] pair activations.
    """
    h = _act(A[:, None, :] + B[None, :, :], activation)
    for w, b in zip(hidden_weights, hidden_biases):
        h = _act(torch.matmul(h, w.t()) + b, activation)
    s = torch.matmul(h, w_out) + b_out
    return _out_act(s, out_activation)


def pair_dot_scores(G: Tensor, H: Tensor) -> Tensor:
    """Separable-critic scores s = G H^T: G [N, D], H [M, D] -> [N, M]."""
    return G @ H.t()


def stats_from_scores(
    s: Tensor, pos_offset: Optional[int] = 0, exclude_offset: Optional[int] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(lse, pos, rowsum) of a score matrix s [N, M] (DESIGN.md section 2)."""
    n, m = s.shape
    rows = torch.arange(n, device=s.device)
    if exclude_offset is not None:
        excluded = torch.zeros(n, m, dtype=torch.bool, device=s.device)
        excluded[rows, rows + exclude_offset] = True
        lse = torch.logsumexp(s.masked_fill(excluded, float("-inf")), dim=1)
        rowsum = s.masked_fill(excluded, 0.0).sum(dim=1)
    else:
        lse = torch.logsumexp(s, dim=1)
        rowsum = s.sum(dim=1)
    if pos_offset is None:
        pos = torch.zeros(n, dtype=s.dtype, device=s.device)
    else:
        pos = s[rows, rows + pos_offset]
    return lse, pos, rowsum


def pair_mlp_stats(
    A: Tensor,
    B: Tensor,
    hidden_weights: Sequence[Tensor],
    hidden_biases: Sequence[Tensor],
    w_out: Tensor,
    b_out: Tensor,
    activation: str = "relu",
    out_activation: str = "none",
    pos_offset: Optional[int] = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of the core op ``factorcl::pair_mlp_stats``."""
    s = pair_mlp_scores(A, B, hidden_weights, hidden_biases, w_out, b_out, activation,
                        out_activation)
    return stats_from_scores(s, pos_offset)


def pair_dot_stats(
    G: Tensor, H: Tensor, pos_offset: Optional[int] = 0, exclude_offset: Optional[int] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of the core op ``factorcl::pair_dot_stats``."""
    return stats_from_scores(pair_dot_scores(G, H), pos_offset, exclude_offset)


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
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`factorcl_ext.concat_critic_stats` (the split first layer included)."""
    A = u @ w_u.t()
    B = v @ w_v.t() + b_0
    return pair_mlp_stats(
        A, B, hidden_weights, hidden_biases, w_out, b_out.reshape(()), activation, out_activation,
        pos_offset,
    )


def separable_critic_stats(
    g: Tensor,
    h: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    normalize: bool = False,
    pos_offset: Optional[int] = 0,
    exclude_offset: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`factorcl_ext.separable_critic_stats`."""
    if normalize:
        g = F.normalize(g, dim=1)
        h = F.normalize(h, dim=1)
    return pair_dot_stats(g / temperature, h, pos_offset, exclude_offset)



def tiled_pair_scores(f, rows: Tensor, cols: Tensor, rows_first: bool = True) -> Tensor:
    """The authors' formulation: tile rows [N, a] and cols [M, b] into all N x M pairs,
    concatenate each pair and run the MLP ``f`` (one output) on it; returns s [N, M]."""
    n, m = rows.shape[0], cols.shape[0]
    r = rows.unsqueeze(1).repeat(1, m, 1)
    c = cols.unsqueeze(0).repeat(n, 1, 1)
    pairs = torch.cat([r, c] if rows_first else [c, r], dim=-1)
    return f(pairs).squeeze(-1)


def tiled_infonce_loss(f, x: Tensor, y: Tensor) -> Tensor:
    """The authors' ``InfoNCECritic.forward``: negative InfoNCE bound of ``s_ij = f([x_j; y_i])``
    with the positives evaluated separately, as they wrote it (the benchmark baseline)."""
    n = y.shape[0]
    t0 = f(torch.cat([x, y], dim=-1))
    t1 = tiled_pair_scores(f, y, x, rows_first=False)
    return -(t0.mean() - (t1.logsumexp(dim=1).mean() - math.log(n)))
