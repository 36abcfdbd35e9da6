"""Evaluation of learned representations: linear probes and MI probes.

- :func:`linear_probe`: logistic regression on standardised frozen embeddings, fitted on the
  training split, scored on the test split (which training never sees).
- :func:`gaussian_mi`: the MI two representations share under a Gaussian model, from the
  canonical correlations of their leading principal components.
- :func:`infonce_mi_probe`: a fresh concat critic trained to estimate I(a; b) by InfoNCE.
- :func:`latent_r2` (synthetic data): how much of each generating factor a representation holds
  linearly (R^2 of a ridge regression, on the test split).

Both MI estimates are None (``null`` in metrics.json) when the test split is too small for them.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import data as D

__all__ = ["embed", "linear_probe", "gaussian_mi", "infonce_mi_probe", "latent_r2", "evaluate"]


@torch.no_grad()
def embed(model, x1: Tensor, x2: Tensor, device, dtype=torch.float32,
          chunk: int = 1024) -> dict[str, Tensor]:
    """``model.representations`` of every row, in chunks, as float64 CPU tensors."""
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {}
    for i in range(0, x1.shape[0], chunk):
        reps = model.representations(x1[i:i + chunk].to(device, dtype),
                                     x2[i:i + chunk].to(device, dtype))
        for k, v in reps.items():
            parts.setdefault(k, []).append(v.detach().double().cpu())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items()}


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                 C: float = 1.0, max_iter: int = 200) -> float:
    """Test accuracy of a logistic regression fitted on standardised training embeddings (the
    scaler is fitted on the training split only).

    ``max_iter`` is capped: on correlated embeddings L-BFGS creeps on for thousands of
    iterations after the test accuracy has settled (to within 0.3 points at 100 iterations).
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x.numpy())
    clf = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(train_x.numpy()), train_y.numpy())
    return float(clf.score(scaler.transform(test_x.numpy()), test_y.numpy()))


def _pca(x: Tensor, k: int) -> Tensor:
    x = x - x.mean(0)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    k = min(k, int((s > s[0] * 1e-6).sum()))
    return u[:, :k] * s[:k]


def gaussian_mi(a: Tensor, b: Tensor, k: int = 8) -> Optional[float]:
    """``-1/2 sum_i log(1 - rho_i^2)`` over the canonical correlations rho_i of the top-``k``
    principal components of ``a`` and ``b`` (nats; exact for jointly Gaussian data).

    None for fewer than ``2 (p + q)`` examples (and at least 4), p and q the components kept
    (at most ``k`` each): the sample canonical correlations of ``n <= p + q`` examples are all 1,
    and just above that the estimate for independent data is still several nats (its bias is
    about ``p q / 2n``)."""
    a, b = _pca(a.double(), k), _pca(b.double(), k)
    n = a.shape[0]
    if n < max(4, 2 * (a.shape[1] + b.shape[1])):
        return None

    def whiten(x):
        cov = x.t() @ x / (n - 1)
        evals, evecs = torch.linalg.eigh(cov)
        return x @ evecs / evals.clamp_min(1e-12).sqrt()

    rho = torch.linalg.svdvals(whiten(a).t() @ whiten(b) / (n - 1)).clamp(0.0, 1.0 - 1e-9)
    return float(-0.5 * torch.log1p(-rho * rho).sum())


def infonce_mi_probe(a: Tensor, b: Tensor, steps: int = 200, batch: int = 256,
                     hidden: int = 256, lr: float = 1e-3, backend: str = "auto",
                     seed: int = 0, device="cpu",
                     deterministic: bool = False) -> Optional[float]:
    """InfoNCE estimate of I(a; b) (nats, at most log ``batch``) by a concat critic trained for
    ``steps`` Adam steps on random batches, averaged over the last quarter of the steps. The
    critic runs on ``device`` with ``backend`` (a GPU backend needs a CUDA ``device``). None for
    fewer than 2 examples (no standardisation, no negatives)."""
    from factorcl_ext.nn import FusedConcatCritic

    if a.shape[0] < 2:
        return None

    g = D.make_generator(seed, "mi-probe")
    a = (a - a.mean(0)) / a.std(0).clamp_min(1e-6)
    b = (b - b.mean(0)) / b.std(0).clamp_min(1e-6)
    a, b = a.to(device, torch.float32), b.to(device, torch.float32)
    torch.manual_seed(D.derive_seed(seed, "mi-probe-init"))
    critic = FusedConcatCritic(a.shape[1], b.shape[1], hidden, layers=0, backend=backend,
                               deterministic=deterministic).to(device)
    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    batch = min(batch, a.shape[0])
    values = []
    for _ in range(steps):
        idx = torch.randperm(a.shape[0], generator=g)[:batch].to(device)
        est = critic.infonce_lower_bound(a[idx], b[idx])
        opt.zero_grad(set_to_none=True)
        (-est).backward()
        opt.step()
        values.append(float(est.detach()))
    tail = values[-max(1, steps // 4):]
    return float(np.mean(tail))


def latent_r2(rep_train: Tensor, lat_train: Tensor, rep_test: Tensor, lat_test: Tensor,
              ridge: float = 1e-3) -> float:
    """Test R^2 of a ridge regression from a representation to a latent factor."""
    mu, sd = rep_train.mean(0), rep_train.std(0).clamp_min(1e-8)
    def design(rep):
        ones = torch.ones(rep.shape[0], 1, dtype=torch.float64)
        return torch.cat([(rep - mu) / sd, ones], 1)

    xtr, xte = design(rep_train), design(rep_test)
    ytr, yte = lat_train.double(), lat_test.double()
    gram = xtr.t() @ xtr + ridge * xtr.shape[0] * torch.eye(xtr.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, xtr.t() @ ytr)
    resid = ((xte @ w - yte) ** 2).sum()
    total = ((yte - ytr.mean(0)) ** 2).sum()
    return float(1.0 - resid / total)


def evaluate(model, data: D.PairedData, device=torch.device("cpu"), dtype=torch.float32,
             seed: int = 0, mi_probe_steps: int = 0, backend: str = "auto",
             deterministic: bool = False) -> dict:
    """Linear-probe accuracy of every representation, MI probes (``mi``; None where the test
    split is too small for an estimate), and for synthetic data the latent R^2 of each
    representation.

    ``probe_accuracy`` is the accuracy on the backbone embeddings of both modalities, the
    representation every model has and the one the authors' synthetic notebook probes (their
    MultiBench notebook probes the heads: ``S+U1+U2``); the FactorCL heads (S, U1, U2 and their
    concatenation) are in ``accuracies``.
    """
    tr, te = data.train_idx, data.test_idx
    reps_tr = embed(model, data.x1[tr], data.x2[tr], device, dtype)
    reps_te = embed(model, data.x1[te], data.x2[te], device, dtype)
    y_tr, y_te = data.y[tr], data.y[te]
    acc = {}
    for name in reps_tr:
        if name in ("S1", "S2"):
            continue
        acc[name] = linear_probe(reps_tr[name], y_tr, reps_te[name], y_te)
    out: dict = {"probe_accuracy": acc["backbone"], "accuracies": acc,
                 "chance_accuracy": float(torch.bincount(y_te).max()) / len(y_te)}
    mi = {}
    pairs = [("S1", "S2"), ("U1", "U2")] if "U1" in reps_te else [("x1", "x2")]
    for a, b in pairs:
        mi[f"gaussian I({a};{b})"] = gaussian_mi(reps_te[a], reps_te[b])
        if mi_probe_steps:
            mi[f"infonce I({a};{b})"] = infonce_mi_probe(
                reps_te[a], reps_te[b], steps=mi_probe_steps, backend=backend, seed=seed,
                device=device, deterministic=deterministic)
    out["mi"] = mi
    if data.latents:
        r2 = {}
        for name in reps_te:
            r2[name] = {part: latent_r2(reps_tr[name], lat[tr], reps_te[name], lat[te])
                        for part, lat in data.latents.items()}
        out["latent_r2"] = r2
    return out
