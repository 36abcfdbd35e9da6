"""FactorCL-SUP, FactorCL-SSL and the SimCLR / SupCon baselines, on MLP, GRU or Transformer
backbones, with every critic running on ``factorcl_ext`` (``critic_backend`` picks the backend).

All four models share one interface, used by :mod:`factorcl.train`:

- ``training_loss(batch, comm)``: the loss of the local rows of a batch and a dict of its terms;
- ``club_parameters()`` / ``club_learning_loss(batch, comm)``: the NCE-CLUB critics' own weights
  and the loss they minimise (the negative InfoNCE bound of each, on inputs detached from the
  graph); empty / unused for the baselines;
- ``representations(x1, x2)``: the frozen embeddings a linear probe is trained on.

Critics score local rows against the columns gathered from every rank (``comm``), with
``pos_offset = rank * local_batch``; in one process the gather is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import factorcl_ext as fx
from factorcl_ext.nn import CLUBInfoNCECritic, InfoNCECritic, mlp

from .distributed import Comm

__all__ = [
    "MODELS",
    "Batch",
    "ModelConfig",
    "MLPBackbone",
    "GRUBackbone",
    "TransformerBackbone",
    "make_backbone",
    "FactorCLSUP",
    "FactorCLSSL",
    "SimCLR",
    "SupCon",
    "build_model",
    "infonce_loss",
    "club_estimate",
    "club_learning_loss",
    "separable_contrastive_loss",
]

MODELS = ("factorcl-sup", "factorcl-ssl", "simclr", "supcon")
_FACTORCL = ("factorcl-sup", "factorcl-ssl")  # concat critics, two of them NCE-CLUB
# The settings (fields of TrainConfig or ModelConfig, and the trainer's flags of the same names)
# that only some models use: the others ignore them. The CLI refuses such a flag for a model that
# does not use it, and a run is continued or reused whatever the settings its model ignores.
SETTING_USERS: dict[str, tuple[str, ...]] = {
    "critic_hidden": _FACTORCL, "critic_layers": _FACTORCL,
    "club_lr": _FACTORCL, "num_club_iter": _FACTORCL,
    "temperature": ("simclr", "supcon"), "normalize_projections": ("simclr", "supcon"),
    "aug_noise": ("factorcl-ssl",), "aug_drop": ("factorcl-ssl",),
    "augmentations": ("factorcl-ssl",),  # trained on augmented views
}
BACKBONES = ("auto", "mlp", "gru", "transformer")


@dataclass
class Batch:
    """The local rows of one training batch (augmented views only for models that use them)."""

    x1: Tensor
    x2: Tensor
    y: Tensor
    x1_aug: Optional[Tensor] = None
    x2_aug: Optional[Tensor] = None


@dataclass
class ModelConfig:
    embed_dim: int = 128
    backbone: str = "auto"  # sequences: auto (gru), gru, transformer, mlp; vectors: mlp
    backbone_hidden: int = 512
    backbone_layers: int = 1
    critic_hidden: int = 512
    critic_layers: int = 1
    activation: str = "relu"
    temperature: float = 0.07
    # SimCLR / SupCon: L2-normalised projections, as SimCLR and SupCon define the loss (the
    # FactorCL authors' baseline code feeds them unnormalised: False)
    normalize_projections: bool = True
    critic_backend: str = "auto"
    critic_deterministic: bool = False  # bit-identical critic kernels run to run (GPU backends)


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------


class MLPBackbone(nn.Module):
    """The authors' ``mlp(in, hidden, embed, layers)`` on [N, D] inputs ([N, T, D] flattened)."""

    def __init__(self, in_dim: int, hidden: int, embed: int, layers: int, activation: str = "relu"):
        super().__init__()
        self.net = mlp(in_dim, hidden, embed, layers, activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class GRUBackbone(nn.Module):
    """A GRU over [N, T, D] sequences; the last hidden state, projected to the embedding."""

    def __init__(self, in_dim: int, hidden: int, embed: int, layers: int = 1):
        super().__init__()
        self.gru = nn.GRU(in_dim, hidden, num_layers=max(1, layers), batch_first=True)
        self.out = nn.Linear(hidden, embed)

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.gru(x)
        return self.out(h[-1])


class TransformerBackbone(nn.Module):
    """A Transformer encoder over [N, T, D] sequences (learned positions, no dropout so runs are
    reproducible), mean-pooled over time and projected to the embedding."""

    def __init__(self, in_dim: int, hidden: int, embed: int, layers: int = 1, max_len: int = 512,
                 heads: int = 4):
        super().__init__()
        d_model = max(heads, hidden - hidden % heads)
        self.inp = nn.Linear(in_dim, d_model)
        self.pos = nn.Parameter(torch.zeros(max_len, d_model))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model,
                                           dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=max(1, layers),
                                         enable_nested_tensor=False)
        self.out = nn.Linear(d_model, embed)
        self.max_len = max_len

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds the backbone's max_len {self.max_len}")
        h = self.enc(self.inp(x) + self.pos[:t])
        return self.out(h.mean(1))


def make_backbone(kind: str, input_shape: tuple, hidden: int, embed: int, layers: int,
                  activation: str = "relu") -> nn.Module:
    """A backbone for inputs of per-example shape ``input_shape`` ((D,) or (T, D)).

    ``kind`` picks the sequence model (``auto``: gru; ``mlp`` flattens the sequence); vector
    inputs always get an MLP, so one ``kind`` serves data with one vector and one sequence
    modality (MIMIC).
    """
    if kind not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {kind!r}")
    if len(input_shape) not in (1, 2):
        raise ValueError(f"inputs must be vectors [N, D] or sequences [N, T, D], got per-example "
                         f"shape {tuple(input_shape)}")
    if len(input_shape) == 1 or kind == "mlp":
        return MLPBackbone(math.prod(input_shape), hidden, embed, layers, activation)
    if kind in ("auto", "gru"):
        return GRUBackbone(input_shape[1], hidden, embed, layers)
    return TransformerBackbone(input_shape[1], hidden, embed, layers,
                               max_len=max(512, input_shape[0]))


# --------------------------------------------------------------------------------------------
# Critic losses over (local rows) x (gathered columns)
# --------------------------------------------------------------------------------------------


def _critic_params(critic: nn.Module):
    linears = [m for m in critic._f if isinstance(m, nn.Linear)]
    first, hidden, last = linears[0], linears[1:-1], linears[-1]
    return (first.weight, first.bias, [m.weight for m in hidden], [m.bias for m in hidden],
            last.weight.reshape(-1), last.bias.reshape(()))


def _compute_dtype(t: Tensor, like: Tensor) -> torch.dtype:
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return like.dtype


def _concat_loss(critic: nn.Module, rows: Tensor, cols: Tensor, rows_first: bool, *,
                 c_lse: float = 0.0, c_pos: float = 0.0, c_rowsum: float = 0.0,
                 pos_offset: int = 0) -> Tensor:
    """``sum_i c_lse*lse_i + c_pos*pos_i + c_rowsum*rowsum_i`` of the critic's scores
    ``f([rows_i; cols_j])`` (``rows_first``) or ``f([cols_j; rows_i])``, fused."""
    w0, b0, hw, hb, w_out, b_out = _critic_params(critic)
    dtype = _compute_dtype(rows, w0)
    du = rows.shape[1]
    if rows_first:
        w_u, w_v = w0[:, :du], w0[:, du:]
    else:
        w_u, w_v = w0[:, w0.shape[1] - du:], w0[:, :w0.shape[1] - du]
    cast = [t.to(dtype) for t in (rows, cols, w_u, w_v, b0, w_out, b_out)]
    return fx.concat_critic_loss(
        *cast[:5], [w.to(dtype) for w in hw], [b.to(dtype) for b in hb], cast[5], cast[6],
        c_lse=c_lse, c_pos=c_pos, c_rowsum=c_rowsum, activation=critic.activation,
        pos_offset=pos_offset, backend=critic.backend, deterministic=critic.deterministic,
    )


def infonce_loss(critic: InfoNCECritic, x: Tensor, y: Tensor, comm: Comm = Comm()) -> Tensor:
    """``critic(x, y)`` (the negative InfoNCE bound, rows y, columns x) with the columns gathered
    from every rank: ``mean_i lse_i - mean_i pos_i - log M`` over the local rows."""
    cols = comm.gather(x)
    n, m = y.shape[0], cols.shape[0]
    loss = _concat_loss(critic, y, cols, rows_first=False, c_lse=1.0 / n, c_pos=-1.0 / n,
                        pos_offset=comm.pos_offset(n))
    return loss - math.log(m)


def club_estimate(critic: CLUBInfoNCECritic, x: Tensor, y: Tensor, comm: Comm = Comm()) -> Tensor:
    """``critic(x, y)``: the NCE-CLUB estimate ``mean_i s_ii - mean_ij s_ij`` (scores
    ``f([y_i; x_j])``), columns gathered from every rank."""
    cols = comm.gather(x)
    n, m = y.shape[0], cols.shape[0]
    return _concat_loss(critic, y, cols, rows_first=True, c_pos=1.0 / n, c_rowsum=-1.0 / (n * m),
                        pos_offset=comm.pos_offset(n))


def club_learning_loss(critic: CLUBInfoNCECritic, x: Tensor, y: Tensor,
                       comm: Comm = Comm()) -> Tensor:
    """``critic.learning_loss(x, y)``: the negative InfoNCE bound of the NCE-CLUB critic."""
    cols = comm.gather(x)
    n, m = y.shape[0], cols.shape[0]
    loss = _concat_loss(critic, y, cols, rows_first=True, c_lse=1.0 / n, c_pos=-1.0 / n,
                        pos_offset=comm.pos_offset(n))
    return loss - math.log(m)


def separable_contrastive_loss(z1: Tensor, z2: Tensor, labels: Optional[Tensor], num_classes: int,
                               temperature: float, base_temperature: float, backend: str,
                               comm: Comm = Comm(), deterministic: bool = False,
                               normalize: bool = True) -> Tensor:
    """SimCLR (``labels`` None) or SupCon on two views (L2-normalised first unless ``normalize``
    is False), as ``SupConLoss`` with ``contrast_mode='all'`` on ``features = stack([z1, z2], 1)``
    of the global batch, computed on the local anchors against all gathered views with the fused
    separable critic."""
    dtype = _compute_dtype(z1, z1)
    z1, z2 = z1.to(dtype), z2.to(dtype)
    if normalize:
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = z1.shape[0]
    g1, g2 = comm.gather(z1), comm.gather(z2)
    b = g1.shape[0]
    off = comm.pos_offset(n)
    c = 1.0 / (2 * n)
    acc = torch.promote_types(dtype, torch.float32)  # bfloat16 under AMP: sum in float32
    loss = z1.new_zeros((), dtype=acc)
    # Rows of view v against [view v; other view]: the anchor itself is column off + i, its other
    # view column b + off + i.
    blocks = ((z1, torch.cat([g1, g2])), (z2, torch.cat([g2, g1])))
    for rows, cols in blocks:
        if labels is None:
            loss = loss + fx.separable_critic_loss(
                rows, cols, c_lse=c, c_pos=-c, temperature=temperature, pos_offset=b + off,
                exclude_offset=off, backend=backend, deterministic=deterministic)
        else:
            loss = loss + fx.separable_critic_loss(
                rows, cols, c_lse=c, temperature=temperature, pos_offset=None,
                exclude_offset=off, backend=backend, deterministic=deterministic)
    if labels is not None:
        # Mean score over each anchor's positives (every other view of its class) from class sums.
        y_all = comm.gather(labels)
        onehot = F.one_hot(y_all, num_classes).to(g1.dtype)
        class_sum = onehot.t() @ (g1 + g2)
        class_count = 2.0 * onehot.sum(0)
        for rows in (z1, z2):
            pos_sum = class_sum[labels] - rows
            count = (class_count[labels] - 1.0).clamp_min(1.0)
            term = (rows * pos_sum).sum(1) / (count * temperature)
            loss = loss - c * term.to(acc).sum()
    return loss * (temperature / base_temperature)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _head(e: int, activation: str) -> nn.Module:
    # The authors' projection head mlp(e, e, e, 1): Linear-act-Linear-act-Linear at width e.
    return mlp(e, e, e, 1, activation)


class _TwoBackbones(nn.Module):
    uses_views = False

    def __init__(self, x1_shape: tuple, x2_shape: tuple, num_classes: int, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.backbones = nn.ModuleList([
            make_backbone(cfg.backbone, tuple(x1_shape), cfg.backbone_hidden, cfg.embed_dim,
                          cfg.backbone_layers, cfg.activation),
            make_backbone(cfg.backbone, tuple(x2_shape), cfg.backbone_hidden, cfg.embed_dim,
                          cfg.backbone_layers, cfg.activation),
        ])

    def club_parameters(self) -> list:
        return []

    def club_learning_loss(self, batch: Batch, comm: Comm = Comm()) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no NCE-CLUB critics")


class _FactorCL(_TwoBackbones):
    """Shared structure of FactorCL-SUP and -SSL: six concat critics, each with its own heads.

    Terms of the loss (plain sum): ``infonce_x1x2`` (-I_NCE), ``club_x1x2`` (+I_NCE-CLUB),
    ``infonce_x1y`` and ``infonce_x2y`` (-I_NCE), ``infonce_x1x2_cond`` (-I_NCE, conditional),
    ``club_x1x2_cond`` (+I_NCE-CLUB, conditional).
    """

    TERMS = ("infonce_x1x2", "club_x1x2", "infonce_x1y", "infonce_x2y", "infonce_x1x2_cond",
             "club_x1x2_cond")

    def __init__(self, x1_shape, x2_shape, num_classes, cfg: ModelConfig, y_dim: int,
                 cond_x_dim: int, cond_y_dim: int, xy_x_dim: Optional[int] = None):
        super().__init__(x1_shape, x2_shape, num_classes, cfg)
        e, act = cfg.embed_dim, cfg.activation
        self.heads = nn.ModuleDict({
            "infonce_x1x2": nn.ModuleList([_head(e, act), _head(e, act)]),
            "club_x1x2": nn.ModuleList([_head(e, act), _head(e, act)]),
            "infonce_x1y": _head(e, act),
            "infonce_x2y": _head(e, act),
            "infonce_x1x2_cond": nn.ModuleList([_head(e, act), _head(e, act)]),
            "club_x1x2_cond": nn.ModuleList([_head(e, act), _head(e, act)]),
        })
        kw = dict(hidden_dim=cfg.critic_hidden, layers=cfg.critic_layers, activation=act,
                  backend=cfg.critic_backend, deterministic=cfg.critic_deterministic)
        self.critics = nn.ModuleDict({
            "infonce_x1x2": InfoNCECritic(e, e, **kw),
            "club_x1x2": CLUBInfoNCECritic(e, e, **kw),
            "infonce_x1y": InfoNCECritic(e, y_dim, **kw),
            "infonce_x2y": InfoNCECritic(e, y_dim, **kw),
            "infonce_x1x2_cond": InfoNCECritic(cond_x_dim, cond_y_dim, **kw),
            "club_x1x2_cond": CLUBInfoNCECritic(cond_x_dim, cond_y_dim, **kw),
        })

    def club_parameters(self) -> list:
        return [*self.critics["club_x1x2"].parameters(),
                *self.critics["club_x1x2_cond"].parameters()]

    def main_parameters(self) -> list:
        club = {id(p) for p in self.club_parameters()}
        return [p for p in self.parameters() if id(p) not in club]

    def _embed(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        return self.backbones[0](x1), self.backbones[1](x2)

    # -- subclasses: the inputs of the x-y and conditional critics ----------------------------
    def _views(self, batch):
        """Backbone embeddings of the augmented views (SSL), computed once per loss."""
        return None

    def _xy_pairs(self, e1, e2, batch, views):  # pragma: no cover - abstract
        raise NotImplementedError

    def _cond_pairs(self, name, e1, e2, batch, views):  # pragma: no cover - abstract
        raise NotImplementedError

    def training_loss(self, batch: Batch, comm: Comm = Comm()) -> tuple[Tensor, dict]:
        e1, e2 = self._embed(batch.x1, batch.x2)
        h, c = self.heads, self.critics
        terms = {
            "infonce_x1x2": infonce_loss(c["infonce_x1x2"], h["infonce_x1x2"][0](e1),
                                         h["infonce_x1x2"][1](e2), comm),
            "club_x1x2": club_estimate(c["club_x1x2"], h["club_x1x2"][0](e1),
                                       h["club_x1x2"][1](e2), comm),
        }
        views = self._views(batch)
        (a1, b1), (a2, b2) = self._xy_pairs(e1, e2, batch, views)
        terms["infonce_x1y"] = infonce_loss(c["infonce_x1y"], a1, b1, comm)
        terms["infonce_x2y"] = infonce_loss(c["infonce_x2y"], a2, b2, comm)
        x, y = self._cond_pairs("infonce_x1x2_cond", e1, e2, batch, views)
        terms["infonce_x1x2_cond"] = infonce_loss(c["infonce_x1x2_cond"], x, y, comm)
        x, y = self._cond_pairs("club_x1x2_cond", e1, e2, batch, views)
        terms["club_x1x2_cond"] = club_estimate(c["club_x1x2_cond"], x, y, comm)
        total = sum(terms.values())
        return total, terms

    def club_learning_loss(self, batch: Batch, comm: Comm = Comm()) -> Tensor:
        """Negative InfoNCE bounds of the two NCE-CLUB critics on their inputs computed without
        a graph: only the critics' own weights receive gradients."""
        h, c = self.heads, self.critics
        with torch.no_grad():
            e1, e2 = self._embed(batch.x1, batch.x2)
            x, y = h["club_x1x2"][0](e1), h["club_x1x2"][1](e2)
            xc, yc = self._cond_pairs("club_x1x2_cond", e1, e2, batch, self._views(batch))
        return (club_learning_loss(c["club_x1x2"], x, y, comm)
                + club_learning_loss(c["club_x1x2_cond"], xc, yc, comm))

    @torch.no_grad()
    def representations(self, x1: Tensor, x2: Tensor) -> dict:
        """``backbone`` (the two backbone embeddings: what the authors probe), ``S`` (shared
        heads of both modalities), ``U1``, ``U2`` (unique heads), ``S+U1+U2``."""
        e1, e2 = self._embed(x1, x2)
        h = self.heads
        s1 = [h["infonce_x1x2"][0](e1), h["club_x1x2_cond"][0](e1)]
        s2 = [h["infonce_x1x2"][1](e2), h["club_x1x2_cond"][1](e2)]
        u1 = [h["club_x1x2"][0](e1), h["infonce_x1y"](e1), h["infonce_x1x2_cond"][0](e1)]
        u2 = [h["club_x1x2"][1](e2), h["infonce_x2y"](e2), h["infonce_x1x2_cond"][1](e2)]
        reps = {"backbone": torch.cat([e1, e2], 1), "S": torch.cat(s1 + s2, 1),
                "U1": torch.cat(u1, 1), "U2": torch.cat(u2, 1)}
        reps["S+U1+U2"] = torch.cat([reps["S"], reps["U1"], reps["U2"]], 1)
        reps["S1"], reps["S2"] = torch.cat(s1, 1), torch.cat(s2, 1)  # for the MI probes
        return reps


class FactorCLSUP(_FactorCL):
    """FactorCL-SUP: y enters the x-y critics as the class index (one scalar column) and the
    conditional critics as a one-hot appended to the x1 side."""

    def __init__(self, x1_shape, x2_shape, num_classes: int, cfg: ModelConfig = ModelConfig()):
        e = cfg.embed_dim
        super().__init__(x1_shape, x2_shape, num_classes, cfg, y_dim=1,
                         cond_x_dim=e + num_classes, cond_y_dim=e)

    def _xy_pairs(self, e1, e2, batch, views):
        y = batch.y.to(e1.dtype)[:, None]
        h = self.heads
        return (h["infonce_x1y"](e1), y), (h["infonce_x2y"](e2), y)

    def _cond_pairs(self, name, e1, e2, batch, views):
        a, b = self.heads[name]
        x = a(e1)
        onehot = F.one_hot(batch.y, self.num_classes).to(x.dtype)
        return torch.cat([x, onehot], 1), b(e2)


class FactorCLSSL(_FactorCL):
    """FactorCL-SSL: y is replaced by augmented views; the x-y critics score h(x) against h(x')
    through the same head, the conditional critics [h(x1); h(x1')] against [h(x2); h(x2')]
    (the augmented views for the conditional NCE-CLUB critic too)."""

    uses_views = True

    def __init__(self, x1_shape, x2_shape, num_classes: int, cfg: ModelConfig = ModelConfig()):
        e = cfg.embed_dim
        super().__init__(x1_shape, x2_shape, num_classes, cfg, y_dim=e, cond_x_dim=2 * e,
                         cond_y_dim=2 * e)

    def _views(self, batch):
        if batch.x1_aug is None or batch.x2_aug is None:
            raise ValueError("FactorCL-SSL needs augmented views (batch.x1_aug, batch.x2_aug)")
        return self.backbones[0](batch.x1_aug), self.backbones[1](batch.x2_aug)

    def _xy_pairs(self, e1, e2, batch, views):
        a1, a2 = views
        h = self.heads
        return (h["infonce_x1y"](e1), h["infonce_x1y"](a1)), (h["infonce_x2y"](e2),
                                                               h["infonce_x2y"](a2))

    def _cond_pairs(self, name, e1, e2, batch, views):
        a1, a2 = views
        ha, hb = self.heads[name]
        return torch.cat([ha(e1), ha(a1)], 1), torch.cat([hb(e2), hb(a2)], 1)


class _SeparableBaseline(_TwoBackbones):
    """Backbones, one projection head per modality, and a SimCLR / SupCon loss across the two
    modalities (each modality a view), computed with the fused separable critic."""

    use_labels = False

    def __init__(self, x1_shape, x2_shape, num_classes: int, cfg: ModelConfig = ModelConfig()):
        super().__init__(x1_shape, x2_shape, num_classes, cfg)
        e = cfg.embed_dim
        self.projections = nn.ModuleList([_head(e, cfg.activation), _head(e, cfg.activation)])

    def main_parameters(self) -> list:
        return list(self.parameters())

    def training_loss(self, batch: Batch, comm: Comm = Comm()) -> tuple[Tensor, dict]:
        z1 = self.projections[0](self.backbones[0](batch.x1))
        z2 = self.projections[1](self.backbones[1](batch.x2))
        loss = separable_contrastive_loss(
            z1, z2, batch.y if self.use_labels else None, self.num_classes,
            self.cfg.temperature, self.cfg.temperature, self.cfg.critic_backend, comm,
            deterministic=self.cfg.critic_deterministic,
            normalize=self.cfg.normalize_projections)
        return loss, {"supcon" if self.use_labels else "simclr": loss}

    @torch.no_grad()
    def representations(self, x1: Tensor, x2: Tensor) -> dict:
        """``backbone`` (both backbone embeddings), ``x1``, ``x2`` (each alone)."""
        e1, e2 = self.backbones[0](x1), self.backbones[1](x2)
        return {"backbone": torch.cat([e1, e2], 1), "x1": e1, "x2": e2}


class SimCLR(_SeparableBaseline):
    use_labels = False


class SupCon(_SeparableBaseline):
    use_labels = True


_CLASSES = {"factorcl-sup": FactorCLSUP, "factorcl-ssl": FactorCLSSL, "simclr": SimCLR,
            "supcon": SupCon}


def build_model(name: str, x1_shape: tuple, x2_shape: tuple, num_classes: int,
                cfg: ModelConfig = ModelConfig()) -> nn.Module:
    if name not in _CLASSES:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    return _CLASSES[name](tuple(x1_shape), tuple(x2_shape), num_classes, cfg)
