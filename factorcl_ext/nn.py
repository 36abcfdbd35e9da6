"""Drop-in modules for the FactorCL authors' critics and the widely used ``SupConLoss``.

``InfoNCECritic`` and ``CLUBInfoNCECritic`` take the authors' constructor arguments (plus
``backend=`` and ``deterministic=``, see :func:`factorcl_ext.pair_mlp_stats`), keep their
parameter names (``_f.0.weight`` ... as built by :func:`mlp`) so state dicts load unchanged, and
return the same values; the pairs are never materialised. Change one import line::

    from factorcl_ext.nn import InfoNCECritic, CLUBInfoNCECritic

``FusedConcatCritic`` and ``FusedSeparableCritic`` are the general modules: any rows / columns,
returning the three statistics and the bounds.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import _backends, ops
from .ops import CriticStats

__all__ = [
    "mlp",
    "InfoNCECritic",
    "CLUBInfoNCECritic",
    "SupConLoss",
    "FusedConcatCritic",
    "FusedSeparableCritic",
]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def mlp(dim: int, hidden_dim: int, output_dim: int, layers: int, activation: str) -> nn.Sequential:
    """The authors' MLP: Linear(dim, hidden), act, [Linear(hidden, hidden), act] * layers,
    Linear(hidden, output_dim)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise ValueError(f"layers must be a non-negative int, got {layers!r}")
    act = _ACTIVATIONS[activation]
    seq: list[nn.Module] = [nn.Linear(dim, hidden_dim), act()]
    for _ in range(layers):
        seq += [nn.Linear(hidden_dim, hidden_dim), act()]
    seq.append(nn.Linear(hidden_dim, output_dim))
    return nn.Sequential(*seq)


def _check_backend_options(backend: str, deterministic: bool) -> None:
    """The constructors' own check, so that a misspelt backend fails where it is written and not
    at the first call (whether the backend runs on the inputs' device is decided at the call)."""
    _backends.check_name(backend)
    ops._check_bool("deterministic", deterministic)


def _backend_repr(module) -> str:
    det = ", deterministic=True" if module.deterministic else ""
    return f"backend={module.backend!r}{det}"


class _ConcatMLP(nn.Module):
    """Holds ``_f`` (an authors' mlp with one output) and splits its first layer between the row
    input and the column input for the fused ops."""

    def __init__(self, in_dim: int, hidden_dim: int, layers: int, activation: str, backend: str,
                 deterministic: bool):
        super().__init__()
        _check_backend_options(backend, deterministic)
        self._f = mlp(in_dim, hidden_dim, 1, layers, activation)
        self.activation = activation
        self.backend, self.deterministic = backend, deterministic

    def _params(self):
        for name, m in self._f.named_modules(prefix="_f"):
            if m._forward_pre_hooks or m._forward_hooks:
                # the fused ops read the layers' parameters and never call them: a hook would not
                # run (torch.nn.utils.spectral_norm's would leave the raw weight in use, silently)
                raise RuntimeError(
                    f"{type(self).__name__}: {name} has forward hooks, which the fused critic "
                    "would not run (it reads the layers' parameters and never calls them); "
                    "remove them. For spectral_norm / weight_norm use torch.nn.utils."
                    "parametrizations (a parametrized weight is computed when it is read), or "
                    "prune through torch.nn.utils.parametrize")
        linears = [m for m in self._f if isinstance(m, nn.Linear)]
        first, hidden, last = linears[0], linears[1:-1], linears[-1]
        return (
            first,
            [m.weight for m in hidden],
            [m.bias for m in hidden],
            last.weight.reshape(-1),
            last.bias.reshape(()),
        )

    def _split(self, first: nn.Linear, rows_first: bool, row_dim: int):
        # Columns [0, row_dim) of the first weight multiply the row input when rows come first in
        # the concatenation, else the last row_dim columns do.
        w = first.weight
        if rows_first:
            return w[:, :row_dim], w[:, row_dim:]
        return w[:, w.shape[1] - row_dim :], w[:, : w.shape[1] - row_dim]

    def _loss(self, rows, cols, rows_first, *, c_lse=0.0, c_pos=0.0, c_rowsum=0.0,
              pos_offset: Optional[int] = 0, out_activation="none"):
        first, hw, hb, w_out, b_out = self._params()
        w_u, w_v = self._split(first, rows_first, rows.shape[-1])
        return ops.concat_critic_loss(
            rows, cols, w_u, w_v, first.bias, hw, hb, w_out, b_out, c_lse=c_lse, c_pos=c_pos,
            c_rowsum=c_rowsum, activation=self.activation, out_activation=out_activation,
            pos_offset=pos_offset, backend=self.backend,
            deterministic=self.deterministic,
        )

    def _stats(self, rows, cols, rows_first, pos_offset, out_activation="none") -> CriticStats:
        first, hw, hb, w_out, b_out = self._params()
        w_u, w_v = self._split(first, rows_first, rows.shape[-1])
        return ops.concat_critic_stats(
            rows, cols, w_u, w_v, first.bias, hw, hb, w_out, b_out, activation=self.activation,
            out_activation=out_activation, pos_offset=pos_offset, backend=self.backend,
            deterministic=self.deterministic,
        )

    def extra_repr(self) -> str:
        return _backend_repr(self)


def _check_paired(x: Tensor, y: Tensor, x_dim: int, y_dim: int) -> int:
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"x_samples and y_samples must be 2-D, got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[1] != x_dim or y.shape[1] != y_dim:
        raise ValueError(
            f"expected x_samples [N, {x_dim}] and y_samples [N, {y_dim}], got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x_samples and y_samples must hold the same number of samples, got {x.shape[0]} and "
            f"{y.shape[0]}"
        )
    n = ops._check_rows_cols("x_samples", x, "y_samples", y)[0]
    if torch.jit.is_tracing():
        # torch.jit.trace records sizes as tensors; the trace keeps this batch size's 1/N and
        # log N (torch warns), as it keeps the authors' modules' np.log(N)
        n = int(n)
    return n


class InfoNCECritic(_ConcatMLP):
    """The authors' InfoNCE critic: ``forward(x, y)`` returns the negative InfoNCE lower bound of
    the concat critic ``s_ij = f([x_j; y_i])`` (rows y, columns x, positives on the diagonal)."""

    def __init__(self, A_dim: int, B_dim: int, hidden_dim: int, layers: int, activation: str,
                 backend: str = "auto", deterministic: bool = False, **extra_kwargs):
        super().__init__(A_dim + B_dim, hidden_dim, layers, activation, backend, deterministic)
        self.A_dim, self.B_dim = A_dim, B_dim

    def forward(self, x_samples: Tensor, y_samples: Tensor) -> Tensor:
        n = _check_paired(x_samples, y_samples, self.A_dim, self.B_dim)
        # -I_NCE = mean(lse) - mean(pos) - log N; the x part of the input comes first.
        loss = self._loss(y_samples, x_samples, rows_first=False, c_lse=1.0 / n, c_pos=-1.0 / n)
        return loss - ops._log_count(n, loss)


class CLUBInfoNCECritic(_ConcatMLP):
    """The authors' NCE-CLUB critic ``s_ij = f([y_i; x_j])``: ``forward`` returns the NCE-CLUB
    estimate ``mean_i s_ii - mean_ij s_ij``, ``learning_loss`` the negative InfoNCE lower bound
    that trains it."""

    def __init__(self, A_dim: int, B_dim: int, hidden_dim: int, layers: int, activation: str,
                 backend: str = "auto", deterministic: bool = False, **extra_kwargs):
        super().__init__(A_dim + B_dim, hidden_dim, layers, activation, backend, deterministic)
        self.A_dim, self.B_dim = A_dim, B_dim

    def forward(self, x_samples: Tensor, y_samples: Tensor) -> Tensor:
        n = _check_paired(x_samples, y_samples, self.A_dim, self.B_dim)
        return self._loss(y_samples, x_samples, rows_first=True, c_pos=1.0 / n,
                          c_rowsum=-1.0 / (n * n))

    def learning_loss(self, x_samples: Tensor, y_samples: Tensor) -> Tensor:
        n = _check_paired(x_samples, y_samples, self.A_dim, self.B_dim)
        loss = self._loss(y_samples, x_samples, rows_first=True, c_lse=1.0 / n, c_pos=-1.0 / n)
        return loss - ops._log_count(n, loss)


class FusedConcatCritic(_ConcatMLP):
    """Concat critic ``s_ij = out_act(f([rows_i; cols_j]))`` on any N rows x M columns.

    Parameters live in ``_f`` (the authors' mlp layout, the row input first).
    ``forward(rows, cols, pos_offset=0)`` returns ``CriticStats(lse, pos, rowsum)``.
    """

    def __init__(self, row_dim: int, col_dim: int, hidden_dim: int, layers: int = 1,
                 activation: str = "relu", out_activation: str = "none", backend: str = "auto",
                 deterministic: bool = False):
        super().__init__(row_dim + col_dim, hidden_dim, layers, activation, backend,
                         deterministic)
        if out_activation not in ("none", "softplus"):
            raise ValueError(f"out_activation must be 'none' or 'softplus', got {out_activation!r}")
        self.row_dim, self.col_dim, self.out_activation = row_dim, col_dim, out_activation

    def forward(self, rows: Tensor, cols: Tensor, pos_offset: Optional[int] = 0) -> CriticStats:
        self._check(rows, cols)
        return self._stats(rows, cols, True, pos_offset, self.out_activation)

    def infonce_lower_bound(self, rows: Tensor, cols: Tensor, pos_offset: int = 0) -> Tensor:
        """I_NCE over all pairs, through the fused loss op (fast path)."""
        self._check(rows, cols)
        n, m = rows.shape[0], cols.shape[0]
        loss = self._loss(rows, cols, True, c_lse=1.0 / n, c_pos=-1.0 / n, pos_offset=pos_offset,
                          out_activation=self.out_activation)
        return ops._log_count(m, loss) - loss

    def nce_club_upper_bound(self, rows: Tensor, cols: Tensor, pos_offset: int = 0) -> Tensor:
        """I_CLUB = mean_i s_(i,i+pos_offset) - mean_ij s_ij, through the fused loss op."""
        self._check(rows, cols)
        n, m = rows.shape[0], cols.shape[0]
        return self._loss(rows, cols, True, c_pos=1.0 / n, c_rowsum=-1.0 / (n * m),
                          pos_offset=pos_offset, out_activation=self.out_activation)

    def _check(self, rows: Tensor, cols: Tensor) -> None:
        if rows.dim() != 2 or rows.shape[1] != self.row_dim:
            raise ValueError(f"rows must have shape [N, {self.row_dim}], got {tuple(rows.shape)}")
        if cols.dim() != 2 or cols.shape[1] != self.col_dim:
            raise ValueError(f"cols must have shape [M, {self.col_dim}], got {tuple(cols.shape)}")
        ops._check_rows_cols("rows", rows, "cols", cols)

    def extra_repr(self) -> str:
        return (f"row_dim={self.row_dim}, col_dim={self.col_dim}, "
                f"out_activation={self.out_activation!r}, {_backend_repr(self)}")


class FusedSeparableCritic(nn.Module):
    """Separable critic ``s_ij = (g_i . h_j) / temperature`` (optionally on L2-normalised
    embeddings), with an optionally learnable temperature (stored as its logarithm).

    A learnable temperature is a parameter of the default dtype, like any weight; a fixed one is
    a float64 buffer, so that float64 scores divide by the temperature given, not by its float32
    rounding (``module.to(dtype)`` casts the buffer as it does every floating buffer)."""

    def __init__(self, temperature: float = 1.0, learnable_temperature: bool = False,
                 normalize: bool = False, backend: str = "auto", deterministic: bool = False):
        super().__init__()
        _check_backend_options(backend, deterministic)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self.register_buffer("log_temperature",
                                 torch.tensor(math.log(temperature), dtype=torch.float64))
        self.normalize, self.backend, self.deterministic = normalize, backend, deterministic

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp()

    def forward(self, g: Tensor, h: Tensor, pos_offset: Optional[int] = 0,
                exclude_offset: Optional[int] = None) -> CriticStats:
        return ops.separable_critic_stats(
            g, h, temperature=self.temperature.to(g.dtype), normalize=self.normalize,
            pos_offset=pos_offset, exclude_offset=exclude_offset, backend=self.backend,
            deterministic=self.deterministic,
        )

    def infonce_lower_bound(self, g: Tensor, h: Tensor, pos_offset: int = 0,
                            exclude_offset: Optional[int] = None) -> Tensor:
        """I_NCE through the fused loss op; ``log M`` counts the columns of each row's
        logsumexp (M - 1 with ``exclude_offset``: SimCLR's anchor leaves its own view out)."""
        n, m = self._check(g, h)
        loss = ops.separable_critic_loss(
            g, h, c_lse=1.0 / n, c_pos=-1.0 / n, temperature=self.temperature.to(g.dtype),
            normalize=self.normalize, pos_offset=pos_offset, exclude_offset=exclude_offset,
            backend=self.backend,
            deterministic=self.deterministic,
        )
        # an int, not a bool: torch 2.11 cannot subtract a bool from a symbolic size
        return ops._log_count(m - (1 if exclude_offset is not None else 0), loss) - loss

    def nce_club_upper_bound(self, g: Tensor, h: Tensor, pos_offset: int = 0) -> Tensor:
        n, m = self._check(g, h)
        return ops.separable_critic_loss(
            g, h, c_pos=1.0 / n, c_rowsum=-1.0 / (n * m), temperature=self.temperature.to(g.dtype),
            normalize=self.normalize, pos_offset=pos_offset, backend=self.backend,
            deterministic=self.deterministic,
        )

    @staticmethod
    def _check(g: Tensor, h: Tensor) -> tuple[int, int]:
        """(N, M), or the ops' error, before the bounds divide by them."""
        ops._check_tensor("g", g, 2)
        ops._check_tensor("h", h, 2)
        return ops._check_rows_cols("g", g, "h", h)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, {_backend_repr(self)}"


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al.), SimCLR when neither labels nor mask is given.

    Same constructor and ``forward(features [bsz, n_views, ...], labels=None, mask=None)`` as the
    widely used implementation; the denominator's logsumexp (over all other views, the anchor's
    own excluded) runs in the fused separable kernel and the mean over positives is a class sum
    (DESIGN.md section 3), so no [bsz*n_views]^2 matrix is formed unless ``mask`` is given.
    """

    def __init__(self, temperature: float = 0.07, contrast_mode: str = "all",
                 base_temperature: float = 0.07, backend: str = "auto",
                 deterministic: bool = False):
        super().__init__()
        _check_backend_options(backend, deterministic)
        if contrast_mode not in ("all", "one"):
            raise ValueError(f"Unknown mode: {contrast_mode}")
        self.temperature = temperature
        self.contrast_mode = contrast_mode
        self.base_temperature = base_temperature
        self.backend, self.deterministic = backend, deterministic

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, contrast_mode={self.contrast_mode!r}, "
                f"base_temperature={self.base_temperature}, {_backend_repr(self)}")

    def forward(self, features: Tensor, labels: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        if self.contrast_mode not in ("all", "one"):  # an attribute: it may be set after __init__
            raise ValueError(f"Unknown mode: {self.contrast_mode}")
        if features.dim() < 3:
            raise ValueError("`features` needs to be [bsz, n_views, ...], at least 3 dimensions "
                             "are required")
        if features.dim() > 3:
            features = features.view(features.shape[0], features.shape[1], -1)
        bsz, n_views = features.shape[0], features.shape[1]
        if bsz * n_views < 2:
            # each anchor's own view leaves its logsumexp: one vector has nothing to contrast
            raise ValueError("SupConLoss needs at least two feature vectors (bsz * n_views >= 2), "
                             f"got features of shape {tuple(features.shape)}")
        if labels is not None and mask is not None:
            raise ValueError("Cannot define both `labels` and `mask`")
        # contrast_feature: views stacked view-major, as torch.cat(torch.unbind(features, 1)).
        contrast = features.transpose(0, 1).reshape(bsz * n_views, -1)
        anchor = features[:, 0] if self.contrast_mode == "one" else contrast
        n_anchor = anchor.shape[0]
        # lse_i over all contrast columns but the anchor's own view (column i in both modes).
        stats = ops.separable_critic_stats(
            anchor, contrast, temperature=self.temperature, pos_offset=None, exclude_offset=0,
            backend=self.backend,
            deterministic=self.deterministic,
        )
        pos_sum, pos_count = self._positives(features, contrast, anchor, labels, mask, bsz,
                                             n_views, n_anchor)
        # (sum_p w_ip log_prob_ip) / count = (sum_p w_ip s_ip - count * lse_i) / count, count =
        # sum_p w_ip (weights w: a mask's, else 1); as in the reference implementation a count
        # below 1e-6 divides by 1 (a row with no positive contributes 0), a soft mask's smaller
        # counts divide as they are.
        pos_logits = (anchor * pos_sum).sum(1) / self.temperature
        divisor = torch.where(pos_count < 1e-6, torch.ones_like(pos_count), pos_count)
        mean_log_prob_pos = (pos_logits - pos_count * stats.lse) / divisor
        loss = -(self.temperature / self.base_temperature) * mean_log_prob_pos
        return loss.mean()

    def _positives(self, features, contrast, anchor, labels, mask, bsz, n_views, n_anchor):
        """Sum of each anchor's positive contrast vectors and their count (anchor itself out)."""
        if mask is not None:
            mask = mask.to(contrast.dtype)
            if mask.shape != (bsz, bsz):
                raise ValueError(f"mask must have shape ({bsz}, {bsz}), got {tuple(mask.shape)}")
            big = mask.repeat(n_views, n_views)[:n_anchor].clone()
            own = torch.arange(n_anchor, device=big.device)
            big[own, own] = 0.0  # the anchor's own view is never a positive
            return big @ contrast, big.sum(1)
        sample_sum = features.sum(1)  # [bsz, D]: all views of each sample
        if labels is None:  # SimCLR: every sample is a class of its own
            class_sum = sample_sum
            class_count = sample_sum.new_full((bsz,), n_views)
        else:
            labels = labels.contiguous().view(-1)
            if labels.shape[0] != bsz:
                raise ValueError("Num of labels does not match num of features")
            class_sum, class_count = _same_label_sums(
                labels, sample_sum, materialise=self.backend == "reference")
            class_count = class_count.to(contrast.dtype) * n_views
        # contrast row a is view a // bsz of sample a % bsz (view-major)
        class_sum = class_sum.repeat(n_views, 1)[:n_anchor]
        class_count = class_count.repeat(n_views)[:n_anchor]
        pos_sum, pos_count = class_sum - anchor, class_count - 1
        if labels is not None and labels.is_floating_point():
            # a NaN label equals no label, its own included (as torch.eq in the reference
            # implementation's mask): its anchors have no positive, not even their other views
            nan = labels.isnan().repeat(n_views)[:n_anchor]
            pos_sum = torch.where(nan[:, None], torch.zeros_like(pos_sum), pos_sum)
            pos_count = torch.where(nan, torch.zeros_like(pos_count), pos_count)
        return pos_sum, pos_count


def _same_label_sums(labels: Tensor, values: Tensor,
                     materialise: bool = False) -> tuple[Tensor, Tensor]:
    """For every sample b: the sum of ``values`` over the samples whose label equals b's (b
    included), and their number (a NaN label: itself alone). By a stable sort of the labels and
    a segment sum over the sorted samples: every shape is static (no class count read back to
    the host: no GPU sync, no graph break under torch.compile), no float is accumulated by
    atomics or by a parallel scan (deterministic), and no [bsz, bsz] or [bsz, classes] matrix is
    formed. ``materialise`` (the reference backend) uses the [bsz, bsz] same-label matrix
    instead, whose product has every derivative (segment_reduce has no second derivative and no
    forward mode); a NaN label's row of it is empty."""
    if materialise:
        same = labels[:, None] == labels[None, :]
        return same.to(values.dtype) @ values, same.sum(1)
    n = labels.shape[0]
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    where = torch.arange(n, device=labels.device)
    starts = torch.ones(n, dtype=torch.bool, device=labels.device)  # a class begins here
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    ends = torch.ones_like(starts)  # a class ends here
    ends[:-1] = starts[1:]
    # sorted position -> first and last sorted position of its class (integer scans: exact)
    first = torch.cummax(torch.where(starts, where, 0), 0).values
    last = torch.cummin(torch.where(ends, where, n - 1).flip(0), 0).values.flip(0)
    counts = last - first + 1
    # one segment per class, each listed at its first position (empty segments elsewhere)
    lengths = torch.where(starts, counts, 0)
    sums = torch.segment_reduce(values[order], "sum", lengths=lengths, unsafe=True, initial=0)
    back = torch.argsort(order)  # sorted position of each sample
    return sums[first[back]], counts[back]
