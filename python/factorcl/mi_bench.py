"""The Gaussian MI benchmark (after the CLUB and FactorCL papers).

Correlated Gaussian pairs in ``dim`` dimensions whose true MI steps through ``levels`` (nats),
``steps_per_level`` Adam steps each, batch 64; three estimators trained side by side on the same
samples:

- ``infonce``: the InfoNCE lower bound of a concat critic (``factorcl_ext.nn.InfoNCECritic``),
  at most log(batch);
- ``club``: CLUB with a Gaussian variational ``q(y|x)`` (mean and log-variance networks, fitted
  by maximum likelihood);
- ``nce-club``: the NCE-CLUB upper bound of a concat critic trained by its InfoNCE bound
  (``factorcl_ext.nn.CLUBInfoNCECritic``).

Writes ``mi_bench.json`` (bias, variance and MSE per estimator and level over the last
``tail_steps`` steps of each level, plus down-sampled traces) and ``mi_bench.png``. The
large-batch mode trains the InfoNCE critic at a high true MI for several batch sizes and writes
``mi_large_batch.json`` / ``.png``: the estimate rises with log N, the ceiling that only larger
batches (which the fused kernels make affordable) lift. Both files are strict JSON: an estimator
that diverges (non-finite estimates) is a result, written as null with a warning naming it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from factorcl_ext.nn import CLUBInfoNCECritic, InfoNCECritic

from . import data as D
from .train import MAX_LR, _progress_bar, make_out_dir, resolve_device, write_text_atomically

__all__ = ["MIBenchConfig", "CLUBGaussian", "run_mi_bench", "run_large_batch", "ESTIMATORS",
           "STAIRCASE_FILE", "LARGE_BATCH_FILE", "check_previous_results"]

ESTIMATORS = ("infonce", "club", "nce-club")
STAIRCASE_FILE = "mi_bench.json"
LARGE_BATCH_FILE = "mi_large_batch.json"
_SHARED_KEYS = ("layers", "cubic", "backend", "device", "seed")  # used by both modes


@dataclass
class MIBenchConfig:
    dims: tuple = (20, 50, 100, 200)
    levels: tuple = (2.0, 4.0, 6.0, 8.0, 10.0)
    steps_per_level: int = 2000
    tail_steps: Optional[int] = None  # statistics over the last steps of a level; default half
    batch: int = 64
    hidden: int = 512
    layers: int = 0  # hidden-to-hidden layers of the concat critics
    lr: float = 1e-3
    estimators: tuple = ESTIMATORS
    cubic: bool = False
    backend: str = "auto"
    device: str = "auto"  # auto: cuda when available
    seed: int = 0
    # large-batch mode
    large_batch: bool = True
    large_batch_sizes: tuple = (64, 256, 1024, 4096)
    large_batch_dim: int = 20
    large_batch_mi: float = 12.0
    large_batch_steps: int = 200
    large_batch_hidden: int = 128
    large_batch_lr: float = 5e-3

    @classmethod
    def quick(cls, **overrides) -> "MIBenchConfig":
        base = dict(dims=(20,), steps_per_level=150, large_batch_sizes=(16, 64, 256),
                    large_batch_dim=10, large_batch_steps=200, large_batch_hidden=64)
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        if not self.dims or any(d < 1 for d in self.dims):
            raise ValueError(f"--dims must be positive integers, got {self.dims}")
        if not self.levels or any(not (lv > 0 and math.isfinite(lv)) for lv in self.levels):
            raise ValueError(f"--levels must be positive, finite MI values in nats, got "
                             f"{self.levels}")
        if len(set(self.levels)) < len(self.levels):  # the results are keyed by level
            raise ValueError(f"--levels must be distinct MI values, got {self.levels}")
        for dim in self.dims:
            for level in self.levels:
                _check_level(level, dim, "--levels", f"--dims {dim}")
        if not self.estimators:
            raise ValueError(f"--estimators must name at least one of {', '.join(ESTIMATORS)}, "
                             "got an empty list")
        for e in self.estimators:
            if e not in ESTIMATORS:
                raise ValueError(f"unknown estimator {e!r}; choose from {', '.join(ESTIMATORS)}")
        for name in ("lr", "large_batch_lr"):  # the trainer's bound on Adam's step size
            v = getattr(self, name)
            if not 0 < v <= MAX_LR:
                flag = "--lr" if name == "lr" else name
                raise ValueError(f"{flag} must be in (0, {MAX_LR:g}] (Adam's step size), got {v}")
        if self.steps_per_level < 2 or self.batch < 2:
            raise ValueError("--steps-per-level and --batch must be at least 2")
        if self.tail_steps is not None and not 1 <= self.tail_steps <= self.steps_per_level:
            raise ValueError(f"--tail-steps must be in [1, {self.steps_per_level}]")
        if not self.large_batch_sizes:
            raise ValueError("--large-batch-sizes must list at least one batch size, got an "
                             "empty list")
        if any(n < 2 for n in self.large_batch_sizes):
            raise ValueError("--large-batch-sizes must be at least 2")
        if any(b <= a for a, b in zip(self.large_batch_sizes, self.large_batch_sizes[1:])):
            # rises_with_batch and the plot read the rows in this order
            raise ValueError(f"--large-batch-sizes must be increasing, got "
                             f"{list(self.large_batch_sizes)}")
        if not (self.large_batch_mi > 0 and math.isfinite(self.large_batch_mi)):
            raise ValueError(f"large_batch_mi must be a positive, finite MI in nats, got "
                             f"{self.large_batch_mi}")
        _check_level(self.large_batch_mi, self.large_batch_dim, "large_batch_mi",
                     f"large_batch_dim {self.large_batch_dim}")


# The pairs are sampled in float32: y = rho x + exp(-level/dim) eps, and the noise that keeps the
# MI finite must stay well above float32's resolution of y. At 12 nats per dimension its std is
# 6e-6, 50 ulps of |y| = 1, and rounding moves the MI by about 1e-4 nats per dimension; at 15,
# 9 % of the samples had y == x exactly, at 18 (where double precision gives correlation 1) 78 %.
MAX_NATS_PER_DIM = 12.0


def _check_level(level: float, dim: int, what: str, where: str) -> None:
    """A ValueError when ``level`` nats is too large to be the MI of the float32 samples of a
    ``dim``-dimensional Gaussian pair: above :data:`MAX_NATS_PER_DIM` their noise term nears
    float32's resolution and the data's MI is no longer ``level``."""
    if level > MAX_NATS_PER_DIM * dim:
        raise ValueError(
            f"{what} {level:g} is too large for {where}: the pairs are sampled in float32, whose "
            f"resolution would leave y = x in places (the data's MI would not be {level:g}); keep "
            f"it at most {MAX_NATS_PER_DIM * dim:g} nats ({MAX_NATS_PER_DIM:g} per dimension)")


def check_previous_results(cfg: MIBenchConfig, out_dir: str, files=(STAIRCASE_FILE,
                                                                     LARGE_BATCH_FILE)) -> None:
    """Refuse (ValueError naming the first differing setting) when ``out_dir`` holds results of
    ``files`` made with other settings that file depends on: a run would replace them. Results
    of the same settings pass (a run reuses what they finished)."""
    for name in files:
        _results_of_same_settings(cfg, out_dir, name)


def _results_of_same_settings(cfg: MIBenchConfig, out_dir: str, name: str) -> Optional[dict]:
    """The results file ``name`` in ``out_dir`` (finished, or cut short by Ctrl-C) when it was
    made with ``cfg``'s settings, None when there is none; a ValueError when it holds results of
    other settings or is not a result of this benchmark."""
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            prev = json.load(f, parse_constant=lambda _: None)  # NaN of older versions: null
        theirs = prev["config"]
        if not isinstance(theirs, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path} exists and is not a result of this benchmark; pass "
                         "--overwrite to replace it, or choose another --out") from None
    mine = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as the file holds them
    keys = ([k for k in mine if not k.startswith("large_batch")] if name == STAIRCASE_FILE
            else [k for k in mine if k.startswith("large_batch_") or k in _SHARED_KEYS])
    for key in keys:
        if theirs.get(key) != mine[key]:
            raise ValueError(
                f"{out_dir} holds {name} made with {key}={theirs.get(key)!r} but this run "
                f"has {key}={mine[key]!r}; pass --overwrite to replace it, or choose "
                "another --out")
    return prev


def _write_json(path: str, out: dict) -> None:
    """Strict JSON: a non-finite number is an error here; the estimates are :func:`_finite`
    (null where an estimator diverged) before they get here."""
    write_text_atomically(path, json.dumps(out, indent=1, allow_nan=False))


def _finite(v) -> Optional[float]:
    """``v`` as a float, or None (null in the JSON files) when it is not finite."""
    v = float(v)
    return v if math.isfinite(v) else None


def _fmt(v: Optional[float]) -> str:
    return "diverged" if v is None else f"{v:.2f}"


def _mean_or_none(values) -> Optional[float]:
    """The mean of ``values``, None when one of them is None (a diverged estimate)."""
    values = list(values)
    return None if any(v is None for v in values) else _finite(np.mean(values))


class CLUBGaussian(nn.Module):
    """CLUB (Cheng et al. 2020) with a Gaussian ``q(y|x) = N(mu(x), exp(logvar(x)))``.

    ``forward`` is the CLUB estimate ``mean_i [log q(y_i|x_i) - mean_j log q(y_j|x_i)]``
    (constants cancel); the mean over j is taken in closed form from the batch moments of y,
    so no N x N x d tensor is formed. ``learning_loss`` is the negative log-likelihood.
    """

    def __init__(self, x_dim: int, y_dim: int, hidden: int):
        super().__init__()
        h = max(1, hidden // 2)
        self.p_mu = nn.Sequential(nn.Linear(x_dim, h), nn.ReLU(), nn.Linear(h, y_dim))
        self.p_logvar = nn.Sequential(nn.Linear(x_dim, h), nn.ReLU(), nn.Linear(h, y_dim),
                                      nn.Tanh())

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        mu, logvar = self.p_mu(x), self.p_logvar(x)
        inv = 0.5 * torch.exp(-logvar)
        positive = -((mu - y) ** 2) * inv
        # mean_j (y_j - mu_i)^2 = mean(y^2) - 2 mu_i mean(y) + mu_i^2, per coordinate
        m1, m2 = y.mean(0), (y * y).mean(0)
        negative = -(m2 - 2.0 * mu * m1 + mu * mu) * inv
        return (positive - negative).sum(1).mean()

    def learning_loss(self, x: Tensor, y: Tensor) -> Tensor:
        mu, logvar = self.p_mu(x), self.p_logvar(x)
        return (((mu - y) ** 2) * torch.exp(-logvar) + logvar).sum(1).mean()


def _make_estimators(cfg: MIBenchConfig, dim: int, device: torch.device) -> dict:
    est = {}
    for name in cfg.estimators:
        torch.manual_seed(D.derive_seed(cfg.seed, "mi-init", dim, name))
        if name == "infonce":
            est[name] = InfoNCECritic(dim, dim, cfg.hidden, cfg.layers, "relu", backend=cfg.backend)
        elif name == "club":
            est[name] = CLUBGaussian(dim, dim, cfg.hidden)
        else:
            est[name] = CLUBInfoNCECritic(dim, dim, cfg.hidden, cfg.layers, "relu",
                                          backend=cfg.backend)
        est[name].to(device)
    return est


def _step(name: str, module: nn.Module, opt, x: Tensor, y: Tensor) -> float:
    """One training step of an estimator; returns its MI estimate on this batch (nats)."""
    opt.zero_grad(set_to_none=True)
    if name == "infonce":
        loss = module(x, y)
        estimate = -float(loss.detach())
    else:
        with torch.no_grad():
            estimate = float(module(x, y))
        loss = module.learning_loss(x, y)
    loss.backward()
    opt.step()
    return estimate


def _downsample(values: list, points: int = 400) -> list:
    if len(values) <= points:
        return [_finite(round(v, 5)) for v in values]
    k = math.ceil(len(values) / points)
    arr = np.asarray(values[: len(values) // k * k]).reshape(-1, k).mean(1)
    return [_finite(round(float(v), 5)) for v in arr]


def _prepare(cfg: MIBenchConfig, out_dir: str, name: str, overwrite: bool
             ) -> tuple[torch.device, Optional[dict]]:
    """The device, and the results of the same settings already in ``out_dir`` to reuse (None
    with ``overwrite``); results of other settings are refused unless ``overwrite``."""
    cfg.validate()
    prev = None if overwrite else _results_of_same_settings(cfg, out_dir, name)
    device = resolve_device(cfg.device)
    make_out_dir(out_dir)
    return device, prev


def _log_above(bar, log, msg: str) -> None:
    """``log(msg)`` on its own line above the progress bar, if one is shown."""
    if bar is None:
        log(msg)
        return
    bar.clear()
    log(msg)
    bar.refresh()


def run_mi_bench(cfg: MIBenchConfig, out_dir: str, log=print, *, overwrite: bool = False,
                 progress: bool = False) -> dict:
    """The staircase benchmark for every dimension; writes ``mi_bench.json`` and ``.png``.
    Results of other settings already in ``out_dir`` are refused, and the dimensions finished
    with the same settings (by an earlier run, or one cut short by Ctrl-C) are reused, unless
    ``overwrite`` (everything is then computed again); ``progress``: a progress bar on a
    terminal."""
    device, prev = _prepare(cfg, out_dir, STAIRCASE_FILE, overwrite)
    threads = torch.get_num_threads()
    # Batch-64 ops are too small to split across threads: extra threads only wait at barriers
    # (7x slower on a busy 2-core machine).
    torch.set_num_threads(1)
    bar = _progress_bar(len(cfg.dims) * len(cfg.levels) * cfg.steps_per_level, 0, progress)
    try:
        return _run_staircase(cfg, out_dir, log, device, bar, prev)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()


def _run_staircase(cfg: MIBenchConfig, out_dir: str, log, device: torch.device, bar,
                   prev: Optional[dict]) -> dict:
    """Each dimension's estimators and data depend only on the seed and the dimension, so the
    dimensions of ``prev`` (the same settings) are reused as they are; the file is rewritten
    after each new dimension (``complete`` false until the last)."""
    tail = cfg.tail_steps or max(1, cfg.steps_per_level // 2)
    results: dict = {}
    traces: dict = {}
    dim_seconds: dict = {}
    path = os.path.join(out_dir, STAIRCASE_FILE)
    per_dim = len(cfg.levels) * cfg.steps_per_level

    def output(complete: bool) -> dict:
        return {
            "config": asdict(cfg), "complete": complete, "tail_steps": tail,
            "log_batch": math.log(cfg.batch), "results": results, "traces": traces,
            "dim_seconds": dim_seconds, "seconds": sum(dim_seconds.values()),
        }

    for dim in cfg.dims:
        key = str(dim)
        if prev is not None and key in prev.get("results", {}) and key in prev.get("traces", {}):
            results[key], traces[key] = prev["results"][key], prev["traces"][key]
            dim_seconds[key] = prev.get("dim_seconds", {}).get(key, 0.0)
            if bar is not None:
                bar.update(per_dim)
            _log_above(bar, log, f"[mi-bench] dim {dim}: finished earlier, reusing {path}")
            continue
        est = _make_estimators(cfg, dim, device)
        opts = {k: torch.optim.Adam(m.parameters(), lr=cfg.lr) for k, m in est.items()}
        values = {k: [] for k in est}
        t0 = time.perf_counter()
        for li, level in enumerate(cfg.levels):
            if bar is not None:
                bar.set_description(f"dim {dim}, {level:g} nats")
            for s in range(cfg.steps_per_level):
                g = D.make_generator(cfg.seed, "mi", dim, li, s)
                x, y = D.sample_correlated_gaussian(cfg.batch, dim, level, g, cubic=cfg.cubic)
                x, y = x.to(device), y.to(device)
                for k in est:
                    values[k].append(_step(k, est[k], opts[k], x, y))
                if bar is not None:
                    bar.update(1)
        secs = time.perf_counter() - t0
        res = {}
        for k, vals in values.items():
            per_level, diverged = {}, []
            for li, level in enumerate(cfg.levels):
                end = (li + 1) * cfg.steps_per_level
                v = np.asarray(vals[end - tail:end])
                with np.errstate(all="ignore"):  # a diverged estimator: null, and a warning
                    stats = {"mean": v.mean(), "bias": v.mean() - level, "variance": v.var(),
                             "mse": ((v - level) ** 2).mean()}
                per_level[f"{level:g}"] = {"true": level,
                                           **{s: _finite(x) for s, x in stats.items()}}
                if (not np.isfinite(vals[end - cfg.steps_per_level:end]).all()
                        or None in per_level[f"{level:g}"].values()):
                    diverged.append(f"{level:g}")
            res[k] = per_level
            if diverged:
                _log_above(bar, log, f"[mi-bench] warning: dim {dim}: {k} diverged (non-finite "
                           f"estimates) at level {', '.join(diverged)} nats (--lr {cfg.lr:g}); "
                           f"written as null in {path}")
        results[key] = res
        traces[key] = {k: _downsample(v) for k, v in values.items()}
        dim_seconds[key] = secs
        summary = "; ".join(
            f"{k} " + " ".join(_fmt(r["mean"]) for r in res[k].values()) for k in res)
        _log_above(bar, log, f"[mi-bench] dim {dim} ({secs:.1f} s): mean estimate per level "
                   f"{'/'.join(f'{lv:g}' for lv in cfg.levels)}: {summary}")
        # every dimension's results are kept before the findings are derived from them
        _write_json(path, output(complete=False))
    out = output(complete=True)
    out["trace_points_per_level"] = (len(next(iter(next(iter(traces.values())).values())))
                                     // len(cfg.levels))
    out["findings"] = _findings(out)
    _write_json(path, out)
    _plot_staircase(out, os.path.join(out_dir, "mi_bench.png"))
    return out


def _findings(out: dict) -> dict:
    """The qualitative claims, checked on the numbers: InfoNCE saturates near log(batch) at the
    top level (the largest, wherever the staircase puts it); NCE-CLUB stays above the truth;
    CLUB's error grows with the dimension."""
    cfg, log_b = out["config"], out["log_batch"]
    top = f"{max(cfg['levels']):g}"
    f: dict = {}
    res = out["results"]
    # a diverged estimate (null) is not evidence for a claim; its averages are null
    if "infonce" in cfg["estimators"]:
        f["infonce_top_level_mean"] = {d: r["infonce"][top]["mean"] for d, r in res.items()}
        f["infonce_saturates_near_log_batch"] = all(
            r["infonce"][top]["mean"] is not None and r["infonce"][top]["mean"] <= log_b + 0.25
            for r in res.values())
    if "nce-club" in cfg["estimators"]:
        f["nce_club_upper_bounds_truth_fraction"] = float(np.mean([
            lv["mean"] is not None and lv["mean"] >= lv["true"] - 0.1
            for r in res.values() for lv in r["nce-club"].values()
        ]))
    if "club" in cfg["estimators"]:
        f["club_mse_by_dim"] = {d: _mean_or_none(lv["mse"] for lv in r["club"].values())
                                for d, r in res.items()}
        # With the exact q(y|x) the CLUB bound of this Gaussian pair is d * (exp(2I/d) - 1)
        # (finite for every level validate() lets through): the ratio says how well the
        # variational q is fitted, which is what degrades with d.
        f["club_over_exact_q_bound_by_dim"] = {
            d: _mean_or_none(
                None if lv["mean"] is None
                else lv["mean"] / (int(d) * math.expm1(2.0 * lv["true"] / int(d)))
                for lv in r["club"].values())
            for d, r in res.items()}
    return f


def _plot_staircase(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = out["config"]
    dims, ests = list(out["traces"]), list(cfg["estimators"])
    fig, axes = plt.subplots(len(ests), len(dims), figsize=(3.2 * len(dims), 2.4 * len(ests)),
                             dpi=110, squeeze=False, sharey=True)
    names = {"infonce": "InfoNCE", "club": "CLUB (Gaussian q)", "nce-club": "NCE-CLUB"}
    for j, dim in enumerate(dims):
        for i, e in enumerate(ests):
            ax = axes[i][j]
            tr = np.asarray(out["traces"][dim][e], dtype=float)  # null (diverged): a gap
            # trace points are means of equal runs of steps; x in units of levels
            xs = np.arange(len(tr)) * len(cfg["levels"]) / len(tr)
            truth = np.asarray(cfg["levels"])[np.minimum(xs.astype(int), len(cfg["levels"]) - 1)]
            ax.plot(xs, tr, lw=0.8, color="#3b6ea8", label="estimate")
            ax.plot(xs, truth, color="black", lw=1.2, label="true MI")
            if e == "infonce":
                ax.axhline(out["log_batch"], color="#c27c3a", ls="--", lw=1,
                           label=f"log N = {out['log_batch']:.2f}")
            ax.set_title(f"{names[e]}, dim {dim}", fontsize=9)
            ax.set_xticks(range(len(cfg["levels"])))
            if i == len(ests) - 1:
                ax.set_xlabel("level (steps / steps_per_level)", fontsize=8)
            if j == 0:
                ax.set_ylabel("MI (nats)", fontsize=8)
            ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_large_batch(cfg: MIBenchConfig, out_dir: str, log=print, *, overwrite: bool = False,
                    progress: bool = False) -> dict:
    """InfoNCE at true MI ``large_batch_mi`` for each batch size in ``large_batch_sizes``;
    writes ``mi_large_batch.json`` / ``.png`` (``overwrite``, ``progress``: as
    :func:`run_mi_bench`)."""
    device, prev = _prepare(cfg, out_dir, LARGE_BATCH_FILE, overwrite)
    earlier = {r.get("batch"): r for r in (prev or {}).get("rows", []) if isinstance(r, dict)}
    path = os.path.join(out_dir, LARGE_BATCH_FILE)
    dim, mi = cfg.large_batch_dim, cfg.large_batch_mi
    rows = []

    def output(complete: bool) -> dict:
        return {"config": asdict(cfg), "complete": complete, "rows": rows,
                "rises_with_batch": all(r["estimate"] is not None for r in rows) and all(
                    b["estimate"] > a["estimate"] for a, b in zip(rows, rows[1:]))}

    bar = _progress_bar(len(cfg.large_batch_sizes) * cfg.large_batch_steps, 0, progress)
    try:
        for n in cfg.large_batch_sizes:
            if n in earlier:  # each batch size depends only on the seed and n
                rows.append(earlier[n])
                if bar is not None:
                    bar.update(cfg.large_batch_steps)
                _log_above(bar, log, f"[mi-bench] large batch N={n}: finished earlier, reusing "
                           f"{path}")
                continue
            torch.manual_seed(D.derive_seed(cfg.seed, "lb-init", n))
            critic = InfoNCECritic(dim, dim, cfg.large_batch_hidden, cfg.layers, "relu",
                                   backend=cfg.backend).to(device)
            opt = torch.optim.Adam(critic.parameters(), lr=cfg.large_batch_lr)
            vals = []
            if bar is not None:
                bar.set_description(f"large batch N={n}")
            t0 = time.perf_counter()
            for s in range(cfg.large_batch_steps):
                g = D.make_generator(cfg.seed, "lb", n, s)
                x, y = D.sample_correlated_gaussian(n, dim, mi, g, cubic=cfg.cubic)
                vals.append(_step("infonce", critic, opt, x.to(device), y.to(device)))
                if bar is not None:
                    bar.update(1)
            secs = time.perf_counter() - t0
            tail = vals[-max(1, cfg.large_batch_steps // 4):]
            with np.errstate(all="ignore"):
                estimate = _finite(np.mean(tail))
            row = {"batch": n, "log_batch": math.log(n), "estimate": estimate,
                   "true_mi": mi, "seconds_per_step": secs / cfg.large_batch_steps,
                   "materialised_pair_tensor_bytes": 4 * n * n * cfg.large_batch_hidden}
            rows.append(row)
            if estimate is None or not np.isfinite(vals).all():
                _log_above(bar, log, f"[mi-bench] warning: large batch N={n}: infonce diverged "
                           f"(non-finite estimates) at {mi:g} nats (lr {cfg.large_batch_lr:g}); "
                           f"written as null in {path}")
            _log_above(bar, log, f"[mi-bench] large batch N={n}: InfoNCE "
                       f"{_fmt(row['estimate'])} nats (log N = {row['log_batch']:.2f}, "
                       f"true {mi:g}), {row['seconds_per_step'] * 1e3:.0f} ms/step")
            if n != cfg.large_batch_sizes[-1]:
                _write_json(path, output(complete=False))
    finally:
        if bar is not None:
            bar.close()
    out = output(complete=True)
    _write_json(path, out)
    _plot_large_batch(out, os.path.join(out_dir, "mi_large_batch.png"))
    return out


def _plot_large_batch(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    ns = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    ax.plot(ns, np.asarray([r["estimate"] for r in rows], dtype=float), "o-", color="#3b6ea8",
            label="InfoNCE estimate")
    ax.plot(ns, [r["log_batch"] for r in rows], "--", color="#c27c3a", label="log N ceiling")
    ax.axhline(rows[0]["true_mi"], color="black", lw=1, label="true MI")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size N")
    ax.set_ylabel("nats")
    ax.set_title("InfoNCE is capped by log N", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
