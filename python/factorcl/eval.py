"""Evaluation of learned representations: linear probes and MI probes.

- :func:`linear_probe`: logistic regression on standardised frozen embeddings, fitted on the
  training split, scored on the test split (which training never sees).
- :func:`chance_accuracy`: the test accuracy of always predicting the training split's majority
  class, what a representation that holds no information scores.
- :func:`gaussian_mi`: the MI two representations share under a Gaussian model, from the
  canonical correlations of their leading principal components (invariant to their scale).
- :func:`infonce_mi_probe`: a fresh concat critic trained on the training split's
  representations, its InfoNCE bound on I(a; b) measured on the held-out test split.
- :func:`latent_r2` (synthetic data): how much of each generating factor a representation holds
  linearly (R^2 of a ridge regression, on the test split).

The MI estimates are None (``null`` in metrics.json) when a split is too small for them.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import data as D

__all__ = ["embed", "linear_probe", "chance_accuracy", "gaussian_mi", "infonce_mi_probe",
           "latent_r2", "evaluate"]


def _model_dtype(model) -> torch.dtype:
    """The dtype of the model's floating-point parameters (float32 for a model without any)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def embed(model, x1: Tensor, x2: Tensor, device, dtype: Optional[torch.dtype] = None,
          chunk: int = 1024) -> dict[str, Tensor]:
    """``model.representations`` of every row, in chunks, as float64 CPU tensors; the inputs are
    cast to ``dtype`` (default: the model's parameters' dtype)."""
    dtype = dtype or _model_dtype(model)
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {}
    try:
        for i in range(0, x1.shape[0], chunk):
            reps = model.representations(x1[i:i + chunk].to(device, dtype),
                                         x2[i:i + chunk].to(device, dtype))
            for k, v in reps.items():
                parts.setdefault(k, []).append(v.detach().double().cpu())
    finally:  # the caller's model back in its mode, also when a batch is refused
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


def chance_accuracy(train_y: Tensor, test_y: Tensor) -> float:
    """Test accuracy of the constant classifier fitted on the training split: always the training
    split's majority class (the smallest label among tied ones). A representation that holds no
    information about the label gives a linear probe this accuracy; it may be below the test
    split's own majority rate when the two splits' class balances differ."""
    majority = int(torch.bincount(train_y).argmax())
    return float((test_y == majority).double().mean())


def _pca_basis(x: Tensor, k: int) -> Tensor:
    """An orthonormal basis [n, k'] of the span of the top-``k`` principal components of the
    centred ``x`` (the left singular vectors; k' <= k drops those with a singular value below
    1e-6 of the largest, rounding noise of a rank-deficient ``x``). Unit columns: the components
    whitened by their own singular values, so nothing depends on the scale of ``x``."""
    x = x - x.mean(0)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    k = min(k, int((s > s[0] * 1e-6).sum()))
    return u[:, :k]


def gaussian_mi(a: Tensor, b: Tensor, k: int = 8) -> Optional[float]:
    """``-1/2 sum_i log(1 - rho_i^2)`` over the canonical correlations rho_i of the top-``k``
    principal components of ``a`` and ``b`` (nats; exact for jointly Gaussian data).

    None for fewer than ``2 (p + q)`` examples (and at least 4), p and q the components kept
    (at most ``k`` each): the sample canonical correlations of ``n <= p + q`` examples are all 1,
    and just above that the estimate for independent data is still several nats (its bias is
    about ``p q / 2n``).

    Invariant to the scale of either side: the
    components are whitened by their own singular values, and the components kept are those
    above a floor relative to the largest."""
    a, b = _pca_basis(a.double(), k), _pca_basis(b.double(), k)
    n = a.shape[0]
    if n < max(4, 2 * (a.shape[1] + b.shape[1])):
        return None
    # a and b have orthonormal, centred columns: a^T b is the cross-correlation matrix of the
    # whitened components, and its singular values are the canonical correlations
    rho = torch.linalg.svdvals(a.t() @ b).clamp(0.0, 1.0 - 1e-9)
    return float(-0.5 * torch.log1p(-rho * rho).sum())


# the probe trains its critic: with gradients also when the caller evaluates under no_grad or
# inference_mode (whose tensors it reads as ordinary ones)
@torch.inference_mode(False)
@torch.enable_grad()
def infonce_mi_probe(a_train: Tensor, b_train: Tensor, a_test: Tensor, b_test: Tensor, *,
                     steps: int = 200, batch: int = 256, hidden: int = 256, lr: float = 1e-3,
                     backend: str = "auto", seed: int = 0, device="cpu",
                     deterministic: bool = False) -> Optional[float]:
    """Held-out InfoNCE estimate of I(a; b) in nats: a critic trained on the training pairs,
    its InfoNCE bound measured on the test pairs.

    A fresh concat critic (one hidden layer of ``hidden`` units) takes ``steps`` Adam steps, each
    maximising its InfoNCE bound on ``batch`` random pairs (all, if fewer) of 4/5 of the training
    split ``(a_train, b_train)``. The other fifth (a seeded choice; none below 10 training pairs)
    selects the critic: its bound there is measured at step 0, every ``max(1, steps // 20)``
    steps and at the end, and the critic of the best one is kept (early stopping: on a few
    thousand pairs of wide representations the critic soon learns its training pairs, and its
    bound on new pairs then falls, below 0 on independent data). The result is the kept
    critic's bound on the held-out pairs ``(a_test, b_test)``, without gradients, in a fixed
    (seeded) order cut into consecutive batches of ``min(batch, n_test)`` pairs (the last one
    ends at the last pair, so that all have the same size), averaged over the batches. The
    test pairs play no part in fitting or choosing the critic, so this is an unbiased estimate
    of a lower bound on the MI of the test distribution, at most log of the batch size. (The
    critic's bound on its own training batches is not: on independent 64-dimensional data it
    reached 2.7 nats in 200 steps.)

    Not clipped at 0: on independent representations every critic's bound is at most 0 in
    expectation, and the estimate is about 0, mostly slightly below (-0.01 on 64-dimensional
    Gaussians); clipping would hide that and bias averages over seeds or runs upward.

    Both sides are standardised with the training pairs' mean and std. The critic runs on
    ``device`` with ``backend`` (a GPU backend needs a CUDA ``device``); its initialisation
    (in a fork of the global generator), batches and orders are seeded by ``seed``, so the
    caller's global random state is left as it was. None when either split has fewer than 2
    pairs (no standardisation, no negatives)."""
    from factorcl_ext.nn import FusedConcatCritic

    n_train, n_test = a_train.shape[0], a_test.shape[0]
    for split, a, b in (("train", a_train, b_train), ("test", a_test, b_test)):
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"infonce_mi_probe: a_{split} and b_{split} must hold the same "
                             f"pairs, got {a.shape[0]} and {b.shape[0]} rows")
    if n_train < 2 or n_test < 2:
        return None

    mu_a, sd_a = a_train.mean(0), a_train.std(0).clamp_min(1e-6)
    mu_b, sd_b = b_train.mean(0), b_train.std(0).clamp_min(1e-6)

    def standardise(x, mu, sd):
        return ((x - mu) / sd).to(device, torch.float32)

    a_tr, b_tr = standardise(a_train, mu_a, sd_a), standardise(b_train, mu_b, sd_b)
    a_te, b_te = standardise(a_test, mu_a, sd_a), standardise(b_test, mu_b, sd_b)
    # initialised as the trainer initialises its models (torch.manual_seed of a derived seed),
    # in a fork of the global generator: the caller's random state is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(D.derive_seed(seed, "mi-probe-init"))
        critic = FusedConcatCritic(a_tr.shape[1], b_tr.shape[1], hidden, layers=0,
                                   backend=backend, deterministic=deterministic)
    critic = critic.to(device, torch.float32)

    def held_out_bound(a: Tensor, b: Tensor, order: Tensor) -> float:
        m = min(batch, len(order))
        starts = list(range(0, len(order) - m + 1, m))
        if starts[-1] + m < len(order):
            starts.append(len(order) - m)
        with torch.no_grad():
            values = [float(critic.infonce_lower_bound(a[order[s:s + m]], b[order[s:s + m]]))
                      for s in starts]
        return float(np.mean(values))

    split = torch.randperm(n_train, generator=D.make_generator(seed, "mi-probe-split"))
    n_val = n_train // 5 if n_train >= 10 else 0
    val_idx, fit_idx = split[:n_val].to(device), split[n_val:].to(device)
    every = max(1, steps // 20)
    best = None  # (validation bound, the critic's weights)

    def select() -> None:
        nonlocal best
        if n_val:
            value = held_out_bound(a_tr, b_tr, val_idx)
            if best is None or value > best[0]:
                best = (value, {k: v.detach().clone() for k, v in critic.state_dict().items()})

    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    g = D.make_generator(seed, "mi-probe")
    train_batch = min(batch, len(fit_idx))
    select()
    for step in range(1, steps + 1):
        idx = fit_idx[torch.randperm(len(fit_idx), generator=g)[:train_batch].to(device)]
        est = critic.infonce_lower_bound(a_tr[idx], b_tr[idx])
        opt.zero_grad(set_to_none=True)
        (-est).backward()
        opt.step()
        if step % every == 0 or step == steps:
            select()
    if best is not None:
        critic.load_state_dict(best[1])
    order = torch.randperm(n_test, generator=D.make_generator(seed, "mi-probe-test"))
    return held_out_bound(a_te, b_te, order.to(device))


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


def evaluate(model, data: D.PairedData, device=torch.device("cpu"),
             dtype: Optional[torch.dtype] = None,
             seed: int = 0, mi_probe_steps: int = 0, backend: str = "auto",
             deterministic: bool = False) -> dict:
    """Linear-probe accuracy of every representation, ``chance_accuracy`` (:func:`chance_accuracy`:
    what a representation without information scores), MI probes (``mi``: Gaussian on the test
    split; InfoNCE trained on the training split and measured on the test split; None where a
    split is too small for an estimate), and for synthetic data the latent R^2 of each
    representation.

    ``probe_accuracy`` is the accuracy on the backbone embeddings of both modalities, the
    representation every model has and the one the authors' synthetic notebook probes (their
    MultiBench notebook probes the heads: ``S+U1+U2``); the FactorCL heads (S, U1, U2 and their
    concatenation) are in ``accuracies``. The model runs in ``dtype`` (default: its parameters'
    dtype).
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
                 "chance_accuracy": chance_accuracy(y_tr, y_te)}
    mi = {}
    pairs = [("S1", "S2"), ("U1", "U2")] if "U1" in reps_te else [("x1", "x2")]
    for a, b in pairs:
        mi[f"gaussian I({a};{b})"] = gaussian_mi(reps_te[a], reps_te[b])
        if mi_probe_steps:
            mi[f"infonce I({a};{b})"] = infonce_mi_probe(
                reps_tr[a], reps_tr[b], reps_te[a], reps_te[b], steps=mi_probe_steps,
                backend=backend, seed=seed, device=device, deterministic=deterministic)
    out["mi"] = mi
    if data.latents:
        r2 = {}
        for name in reps_te:
            r2[name] = {part: latent_r2(reps_tr[name], lat[tr], reps_te[name], lat[te])
                        for part, lat in data.latents.items()}
        out["latent_r2"] = r2
    return out
