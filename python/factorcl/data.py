"""Data for the FactorCL trainer: the synthetic generator, augmentations, the MI-benchmark samplers
and loaders for users' own paired data.

Every random draw goes through a ``torch.Generator`` seeded from ``(seed, *keys)`` by
:func:`derive_seed`, never through the global RNG: the data, the data order and the augmentations of
step ``k`` are functions of the seed and ``k`` alone, which is what makes a resumed run (or a run
split over several processes) reproduce an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DataError",
    "PairedData",
    "SyntheticConfig",
    "derive_seed",
    "make_generator",
    "make_synthetic",
    "epoch_permutation",
    "augment",
    "augment_vectors",
    "augment_sequences",
    "mi_to_rho",
    "sample_correlated_gaussian",
    "load_paired_file",
    "load_multibench",
    "load_dataset",
]


class DataError(ValueError):
    """A user's data (file, keys, shapes, labels) cannot be used; the message says why."""


# --------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed that depends on ``seed`` and ``keys`` only (stable across processes and
    Python versions, unlike ``hash``)."""
    digest = hashlib.blake2b(repr((int(seed),) + keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_generator(seed: int, *keys) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *keys))
    return g


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order of the ``n`` training examples in ``epoch`` (int64 [n])."""
    return torch.randperm(n, generator=make_generator(seed, "order", epoch))


# --------------------------------------------------------------------------------------------
# Paired data
# --------------------------------------------------------------------------------------------


@dataclass
class PairedData:
    """Two modalities and a label per example, with a fixed train / test split.

    ``x1`` [N, D1] or [N, T1, D1], ``x2`` [N, D2] or [N, T2, D2] (float32, or float64 when loaded
    for float64 training), ``y`` [N] int64 class
    indices in ``[0, num_classes)``. ``latents`` (synthetic data only) holds the generating
    factors ``shared``, ``unique1``, ``unique2`` for diagnostics; ``settings`` (synthetic data
    only) the generator's settings, which a resumed or reused run must share.
    """

    x1: Tensor
    x2: Tensor
    y: Tensor
    train_idx: Tensor
    test_idx: Tensor
    num_classes: int
    name: str = "data"
    latents: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        n = self.y.shape[0]
        for key, t in (("x1", self.x1), ("x2", self.x2)):
            if t.shape[0] != n:
                raise DataError(
                    f"{self.name}: {key} has {t.shape[0]} examples but y has {n}; every modality "
                    "needs one row per label"
                )
            if t.dim() not in (2, 3):
                raise DataError(
                    f"{self.name}: {key} must have shape [N, D] (vectors) or [N, T, D] "
                    f"(sequences), got {tuple(t.shape)}"
                )
            if 0 in t.shape[1:]:
                raise DataError(
                    f"{self.name}: {key} has shape {tuple(t.shape)} with an empty dimension; every "
                    "example needs at least one feature (and one time step)"
                )
            if not torch.isfinite(t).all():
                raise DataError(f"{self.name}: {key} contains NaN or Inf values")
        if len(self.train_idx) == 0 or len(self.test_idx) == 0:
            raise DataError(
                f"{self.name}: the split leaves {len(self.train_idx)} training and "
                f"{len(self.test_idx)} test examples; both must be non-empty"
            )
        # The linear probe fits a classifier on the training split: refuse now, not after training.
        train_y = self.y[self.train_idx]
        if torch.unique(train_y).numel() < 2:
            raise DataError(
                f"{self.name}: the training split ({len(train_y)} examples) holds a single class "
                f"({_class_counts(train_y)}; test split: {_class_counts(self.y[self.test_idx])});"
                " the linear probe needs at least two classes to train on"
            )

    @property
    def num_train(self) -> int:
        return int(self.train_idx.numel())

    def subset(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.x1[idx], self.x2[idx], self.y[idx]

    def describe(self) -> str:
        return (
            f"{self.name}: {self.y.shape[0]} examples ({self.num_train} train, "
            f"{len(self.test_idx)} test), x1 {tuple(self.x1.shape[1:])}, "
            f"x2 {tuple(self.x2.shape[1:])}, {self.num_classes} classes"
        )


def _class_counts(y: Tensor, most: int = 8) -> str:
    """``class 0: 12, class 3: 4`` (the classes present, the first ``most`` of them)."""
    classes, counts = torch.unique(y, return_counts=True)
    parts = [f"class {int(c)}: {int(k)}" for c, k in zip(classes[:most], counts[:most])]
    more = len(classes) - most
    return ", ".join(parts) + (f", ... ({more} more classes)" if more > 0 else "")


def _random_split(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    perm = torch.randperm(n, generator=make_generator(seed, "split"))
    n_test = max(1, int(round(n * test_fraction)))
    if n_test >= n:
        raise DataError(f"{n} examples are too few to split off a test set")
    return perm[n_test:].sort().values, perm[:n_test].sort().values


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------

_PARTS = ("shared", "unique1", "unique2")


# held out by the random split of synthetic data and of files without a split key
DEFAULT_TEST_FRACTION = 0.2


@dataclass
class SyntheticConfig:
    """The synthetic generator (after the FactorCL paper's synthetic experiment).

    Gaussian latents: ``shared`` [shared_dim] seen by both modalities, ``unique1`` / ``unique2``
    [unique_dim] seen by one each. Modality k is a fixed random projection of its latents
    ([shared; unique_k]) to ``x_dim`` features plus ``noise`` times Gaussian noise:
    ``projection="uniform"`` (the default: the authors' U[0, 1] entries, which make the sum of
    the latents, and so the linear label, the dominant principal component of each modality) or
    ``"gaussian"`` (N(0, 1/k) entries: no preferred direction). The label is a function of
    the first ``label_dims[p]`` coordinates of each part p in ``label_parts``: ``linear``
    thresholds their sum at 0, ``nonlinear`` thresholds a random one-hidden-layer tanh
    network at its median (both give balanced classes).
    """

    num_examples: int = 6000
    shared_dim: int = 10
    unique_dim: int = 6
    x_dim: int = 100
    label_parts: tuple = _PARTS
    label_dims: Optional[dict] = None  # part -> how many of its coordinates; default all
    label_fn: str = "linear"
    noise: float = 0.1
    projection: str = "uniform"
    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = 0

    def validate(self) -> None:
        for name in ("num_examples", "shared_dim", "unique_dim", "x_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DataError(f"synthetic {name} must be a positive int, got {v!r}")
        if self.num_examples < 10:
            raise DataError(f"synthetic num_examples must be at least 10, got {self.num_examples}")
        if self.label_fn not in ("linear", "nonlinear"):
            raise DataError(
                f"synthetic label function must be 'linear' or 'nonlinear', got {self.label_fn!r}"
            )
        if not self.label_parts:
            raise DataError("synthetic labels need at least one latent part")
        for p in self.label_parts:
            if p not in _PARTS:
                raise DataError(f"synthetic label part must be one of {_PARTS}, got {p!r}")
        if self.projection not in ("gaussian", "uniform"):
            raise DataError(
                f"synthetic projection must be 'gaussian' or 'uniform', got {self.projection!r}")
        if not self.noise >= 0.0:
            raise DataError(f"synthetic noise must be >= 0, got {self.noise}")


def make_synthetic(cfg: SyntheticConfig = SyntheticConfig()) -> PairedData:
    """Generate a :class:`PairedData` from ``cfg`` (deterministic in ``cfg.seed``)."""
    cfg.validate()
    n = cfg.num_examples
    g = make_generator(cfg.seed, "synthetic")
    lat = {
        "shared": torch.randn(n, cfg.shared_dim, generator=g),
        "unique1": torch.randn(n, cfg.unique_dim, generator=g),
        "unique2": torch.randn(n, cfg.unique_dim, generator=g),
    }
    k = cfg.shared_dim + cfg.unique_dim
    if cfg.projection == "gaussian":
        # scaled by 1/sqrt(k): every feature has unit variance
        p1 = torch.randn(k, cfg.x_dim, generator=g) / math.sqrt(k)
        p2 = torch.randn(k, cfg.x_dim, generator=g) / math.sqrt(k)
    else:
        p1 = torch.rand(k, cfg.x_dim, generator=g)
        p2 = torch.rand(k, cfg.x_dim, generator=g)
    x1 = torch.cat([lat["shared"], lat["unique1"]], 1) @ p1
    x2 = torch.cat([lat["shared"], lat["unique2"]], 1) @ p2
    x1 = x1 + cfg.noise * torch.randn(n, cfg.x_dim, generator=g)
    x2 = x2 + cfg.noise * torch.randn(n, cfg.x_dim, generator=g)

    dims = dict(cfg.label_dims or {})
    comps = []
    for p in cfg.label_parts:
        width = lat[p].shape[1]
        d = dims.get(p, width)
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= width:
            raise DataError(f"synthetic label_dims[{p!r}] must be in [1, {width}], got {d!r}")
        comps.append(lat[p][:, :d])
    z = torch.cat(comps, 1)
    if cfg.label_fn == "linear":
        y = (z.sum(1) > 0).long()
    else:
        w1 = torch.randn(z.shape[1], 32, generator=g) * (2.0 / math.sqrt(z.shape[1]))
        w2 = torch.randn(32, generator=g)
        score = torch.tanh(z @ w1) @ w2
        y = (score > score.median()).long()
    train_idx, test_idx = _random_split(n, cfg.test_fraction, cfg.seed)
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    return PairedData(x1.float(), x2.float(), y, train_idx, test_idx, 2, name="synthetic",
                      latents=lat, settings=settings)


# --------------------------------------------------------------------------------------------
# Augmentations: vectorised over the batch, a fresh tensor out, the input never modified.
# --------------------------------------------------------------------------------------------

VECTOR_AUGS = ("noise", "drop", "half_swap", "identity")
SEQUENCE_AUGS = ("time_permute", "time_drop", "noise")


def augment_vectors(x: Tensor, generator: torch.Generator, noise_std: float = 0.1,
                    drop_prob: float = 0.2, ops: Sequence[str] = VECTOR_AUGS,
                    scale: Optional[Tensor] = None) -> Tensor:
    """One augmentation per row of ``x`` [N, D], chosen uniformly from ``ops``: Gaussian noise
    (std ``noise_std`` times ``scale``, the per-feature std, by default the batch's), feature
    drop (each feature zeroed with probability ``drop_prob``), half swap (the two halves of the
    feature vector exchanged), identity. Returns a new tensor."""
    if x.dim() != 2:
        raise ValueError(f"augment_vectors needs [N, D] inputs, got {tuple(x.shape)}")
    for op in ops:
        if op not in VECTOR_AUGS:
            raise ValueError(f"unknown vector augmentation {op!r}; choose from {VECTOR_AUGS}")
    n, d = x.shape
    # Draw on the CPU generator, then move: the draws do not depend on the device.
    choice = torch.randint(len(ops), (n,), generator=generator).to(x.device)
    noise = torch.randn(n, d, generator=generator).to(x.device, x.dtype)
    keep = (torch.rand(n, d, generator=generator) >= drop_prob).to(x.device, x.dtype)
    if scale is None:
        scale = x.detach().std(0, keepdim=True) if n > 1 else torch.ones_like(x[:1])
    half = d // 2
    candidates = {
        "noise": x + noise_std * scale * noise,
        "drop": x * keep,
        "half_swap": torch.cat([x[:, half:], x[:, :half]], 1),
        "identity": x.clone(),
    }
    out = torch.empty_like(x)
    for k, op in enumerate(ops):
        sel = (choice == k)[:, None]
        out = torch.where(sel, candidates[op], out)
    return out


def augment_sequences(x: Tensor, generator: torch.Generator, noise_std: float = 0.1,
                      drop_prob: float = 0.2, ops: Sequence[str] = SEQUENCE_AUGS,
                      scale: Optional[Tensor] = None) -> Tensor:
    """One augmentation per sequence of ``x`` [N, T, D], chosen uniformly from ``ops``: time
    permute (the time steps of the sequence shuffled), time drop (each time step zeroed with
    probability ``drop_prob``), Gaussian noise (as in :func:`augment_vectors`). Returns a new
    tensor."""
    if x.dim() != 3:
        raise ValueError(f"augment_sequences needs [N, T, D] inputs, got {tuple(x.shape)}")
    for op in ops:
        if op not in SEQUENCE_AUGS:
            raise ValueError(f"unknown sequence augmentation {op!r}; choose from {SEQUENCE_AUGS}")
    n, t, d = x.shape
    choice = torch.randint(len(ops), (n,), generator=generator).to(x.device)
    order = torch.rand(n, t, generator=generator).argsort(1).to(x.device)
    keep = (torch.rand(n, t, 1, generator=generator) >= drop_prob).to(x.device, x.dtype)
    noise = torch.randn(n, t, d, generator=generator).to(x.device, x.dtype)
    if scale is None:
        scale = (x.detach().reshape(-1, d).std(0) if n * t > 1
                 else torch.ones(d, dtype=x.dtype, device=x.device))
    candidates = {
        "time_permute": torch.gather(x, 1, order[:, :, None].expand(n, t, d)),
        "time_drop": x * keep,
        "noise": x + noise_std * scale * noise,
    }
    out = torch.empty_like(x)
    for k, op in enumerate(ops):
        sel = (choice == k)[:, None, None]
        out = torch.where(sel, candidates[op], out)
    return out


def augment(x: Tensor, generator: torch.Generator, **kwargs) -> Tensor:
    """:func:`augment_vectors` for [N, D] inputs, :func:`augment_sequences` for [N, T, D]."""
    if x.dim() == 2:
        return augment_vectors(x, generator, **kwargs)
    if x.dim() == 3:
        return augment_sequences(x, generator, **kwargs)
    raise ValueError(f"augment needs [N, D] or [N, T, D] inputs, got {tuple(x.shape)}")


# --------------------------------------------------------------------------------------------
# MI-benchmark samplers
# --------------------------------------------------------------------------------------------


def mi_to_rho(mi: float, dim: int) -> float:
    """The per-coordinate correlation of a ``dim``-dimensional Gaussian pair with MI ``mi`` nats:
    ``I = -dim/2 * log(1 - rho^2)``."""
    if mi < 0 or dim < 1:
        raise ValueError(f"need mi >= 0 and dim >= 1, got mi={mi}, dim={dim}")
    return math.sqrt(1.0 - math.exp(-2.0 * mi / dim))


def sample_correlated_gaussian(batch: int, dim: int, mi: float, generator: torch.Generator,
                               cubic: bool = False, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """``batch`` pairs (x, y) of standard Gaussians with ``corr(x_k, y_k) = rho`` per coordinate and
    true MI ``mi`` nats; ``cubic`` returns ``y**3`` instead (same MI: an invertible map)."""
    rho = mi_to_rho(mi, dim)
    x = torch.randn(batch, dim, generator=generator, dtype=dtype)
    eps = torch.randn(batch, dim, generator=generator, dtype=dtype)
    y = rho * x + math.sqrt(1.0 - rho * rho) * eps
    return x, (y**3 if cubic else y)


# --------------------------------------------------------------------------------------------
# Users' data
# --------------------------------------------------------------------------------------------


_REAL_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def _as_real_tensor(name: str, key: str, a, what: str) -> Tensor:
    """``a`` (array or tensor) as a tensor of a real number type, else a DataError saying what
    the key must hold (strings, objects and complex numbers are refused in one line)."""
    arr = None
    try:
        arr = a if isinstance(a, Tensor) else np.asarray(a)
        t = torch.as_tensor(arr)
    except (TypeError, ValueError) as exc:
        got = (f"an array of dtype {arr.dtype}" if arr is not None
               else f"a {type(a).__name__} that is not a rectangular array")
        names = "class" in what and arr is not None  # e.g. strings as labels
        hint = "; map class names to indices first, e.g. np.unique(y, return_inverse=True)[1]"
        hint = hint if names else ""
        raise DataError(f"{name}: key {key!r} must hold {what}, got {got} "
                        f"({exc.__class__.__name__}){hint}") from None
    if t.dtype in _WIDE_UNSIGNED:
        # torch has few ops for these (no max, no unique): as float64, exact up to 2^53 (labels
        # beyond that are out of range anyway, and are refused as such)
        t = t.to(torch.float64)
    if not (t.is_floating_point() or t.dtype in _REAL_DTYPES):
        raise DataError(f"{name}: key {key!r} has dtype {t.dtype}; it must hold {what}")
    return t


def _as_float(name: str, key: str, a, dtype: torch.dtype = torch.float32,
              refuse_beyond_range: bool = True) -> Tensor:
    """Features in ``dtype`` (the training dtype: float64 data keeps its precision under
    ``--dtype float64``); finite values beyond ``dtype``'s range are refused, naming the largest,
    rather than becoming Inf (and then "contains NaN or Inf"), unless ``refuse_beyond_range`` is
    off (MultiBench's features, whose non-finite values are zeroed as its loaders do)."""
    t = _as_real_tensor(name, key, a, "real numeric features")
    if (refuse_beyond_range and t.is_floating_point()
            and torch.finfo(t.dtype).max > torch.finfo(dtype).max):
        finite = t[torch.isfinite(t)]
        top = float(finite.abs().max()) if finite.numel() else 0.0
        if top > torch.finfo(dtype).max:
            raise DataError(
                f"{name}: key {key!r} holds finite values beyond {dtype}'s range (largest "
                f"magnitude {top:g}); scale the features, or train in float64 (--dtype float64)")
    return t.to(dtype)


def _as_labels(name: str, key: str, a, n: int) -> tuple[Tensor, int]:
    t = _as_real_tensor(name, key, a, "integer class indices")
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1:
        raise DataError(
            f"{name}: {key!r} must have shape [N] (class indices), got {tuple(t.shape)}"
        )
    if t.shape[0] != n:
        raise DataError(f"{name}: {key!r} has {t.shape[0]} labels for {n} examples")
    if t.dtype == torch.bool:
        t = t.long()
    if t.is_floating_point():  # checked before .long(), which truncates and overflows
        nan = int(t.isnan().sum())
        if nan:
            raise DataError(f"{name}: {key!r} holds {nan} NaN values; labels must be integer "
                            "class indices")
        bad = t[~torch.isfinite(t) | (t != t.round())]
        if bad.numel():
            raise DataError(f"{name}: {key!r} must hold integer class indices, got {bad[0]:g}")
    if t.numel() and t.min() < 0:
        raise DataError(f"{name}: {key!r} has negative class indices")
    # Class indices 0..K-1: more classes than examples means the labels are ids or values
    # (years, codes), not indices (and would build a classifier of that many outputs).
    top = t.max().item() if t.numel() else -1
    if top + 1 > n:
        shown = f"{top:g}" if top >= 2**53 else str(int(top))
        raise DataError(
            f"{name}: {key!r} has class index {shown} out of range for {n} examples; labels "
            "must be class indices 0..K-1 with K at most the number of examples (map other "
            "values to indices first, e.g. np.unique(y, return_inverse=True)[1])"
        )
    t = t.long()
    num_classes = int(top) + 1
    if num_classes < 2:
        raise DataError(f"{name}: {key!r} holds a single class; a probe needs at least two")
    return t, num_classes


def _split_from(name: str, raw, n: int, test_fraction: Optional[float], seed: int):
    if raw is None:
        fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
        return _random_split(n, fraction, seed)
    if test_fraction is not None:
        raise DataError(f"{name}: a test fraction ({test_fraction:g}) was given, but the file's "
                        "'split' key decides the split; leave the fraction out, or drop the key")
    split = _as_real_tensor(name, "split", raw, "0 (train) and 1 (test)")
    if split.dim() != 1 or split.shape[0] != n:
        raise DataError(
            f"{name}: 'split' must have shape [{n}] (0 = train, 1 = test), got {tuple(split.shape)}"
        )
    if split.dtype == torch.bool:  # True = test
        split = split.long()
    if not torch.isin(split, torch.tensor([0, 1], dtype=split.dtype)).all():
        raise DataError(f"{name}: 'split' must hold only 0 (train) and 1 (test)")
    is_test = split.bool()
    return torch.nonzero(~is_test)[:, 0], torch.nonzero(is_test)[:, 0]


def _numpy_safe_globals() -> list:
    """What ``torch.load(weights_only=True)`` must allow to read numpy arrays and scalars: the
    array type, its reconstructors and the dtypes (the data only; objects stay refused)."""
    dtypes = set()
    for code in np.typecodes["All"]:
        try:
            dtypes.add(type(np.dtype(code)))
        except TypeError:
            pass
    return [np.ndarray, np.dtype, np.zeros(1).__reduce__()[0], np.float32(0).__reduce__()[0],
            *dtypes]


def _read_error(exc: Exception) -> str:
    """``exc`` in one line. torch.load's weights-only refusal spans lines (with ANSI escapes)
    and suggests weights_only=False: reduced to the type of object it refused."""
    msg = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    if "Weights only load failed" in msg:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", msg)
        what = f"a {found.group(1)} object" if found else "objects"
        return (f"{type(exc).__name__}: it holds {what}; only tensors, numpy arrays and plain "
                "containers are read")
    return f"{type(exc).__name__}: {msg.splitlines()[0]}" if msg else type(exc).__name__


def load_paired_file(path: str, test_fraction: Optional[float] = None, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> PairedData:
    """Paired features from a ``.npz`` (numpy) or ``.pt`` (a dict of tensors / arrays) file, as
    ``dtype``.

    Keys: ``x1`` [N, D1] or [N, T1, D1], ``x2`` [N, D2] or [N, T2, D2], ``y`` [N] integer class
    indices; optional ``split`` [N] (0 train, 1 test), otherwise a seeded random split holds out
    ``test_fraction`` (default :data:`DEFAULT_TEST_FRACTION`) of the examples; a fraction given
    beside a ``split`` key is refused.
    """
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npz":
            with np.load(path, allow_pickle=False) as f:
                content = {k: f[k] for k in f.files}
        elif ext in (".pt", ".pth"):
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                content = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise DataError(f"{name}: unsupported file type {ext!r}; use .npz or .pt")
    except DataError:
        raise
    except Exception as exc:  # corrupt file, pickled objects in an npz, ...
        raise DataError(f"{name}: cannot read the file ({_read_error(exc)})") from None
    if not isinstance(content, dict):
        raise DataError(
            f"{name}: expected a dict with keys x1, x2, y, got {type(content).__name__}")
    for key in ("x1", "x2", "y"):
        if key not in content:
            raise DataError(
                f"{name}: missing key {key!r} (found {sorted(content)}); expected x1, x2, y and "
                "optionally split"
            )
    x1 = _as_float(name, "x1", content["x1"], dtype)
    x2 = _as_float(name, "x2", content["x2"], dtype)
    n = x1.shape[0] if x1.dim() else 0
    y, num_classes = _as_labels(name, "y", content["y"], n)
    train_idx, test_idx = _split_from(name, content.get("split"), n, test_fraction, seed)
    return PairedData(x1, x2, y, train_idx, test_idx, num_classes, name=name)


_AFFECT_MODALITIES = ("text", "vision", "audio")


def _load_pickle(path: str):
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as exc:
        raise DataError(f"{name}: cannot unpickle the file ({type(exc).__name__}: {exc})") from None


def _need(name: str, d, key: str, where: str):
    if not isinstance(d, dict) or key not in d:
        found = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{name}: missing key {key!r} in {where} (found {found})")
    return d[key]


def _clean(t: Tensor) -> Tensor:
    # MultiBench features carry NaN / Inf for missing values; its own loaders zero them.
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def load_multibench(path: str, modalities: Sequence[str] = ("text", "vision"),
                    task: int = -1, seed: int = 0, dtype: torch.dtype = torch.float32
                    ) -> PairedData:
    """A MultiBench pickle the user already has (nothing is downloaded).

    - **affect** layout (CMU-MOSI / MOSEI, ``mosi_raw.pkl``, ...): ``{'train'|'valid'|'test':
      {'text'|'vision'|'audio': [N, T, D], 'labels': [N, ...]}}``; two of the modalities
      (``modalities``), sentiment binarised as ``label >= 0`` (the FactorCL authors' rule);
      train + valid train, test tests.
    - **MIMIC** layout (``im.pk``): ``{'adm_features_all': [N, 5], 'ep_tdata': [N, 24, 12],
      'adm_labels_all': [N, 6], 'y_icd9': [N, 20]}``; x1 static, x2 the time series; ``task=-1``
      the 6-class mortality label, ``task`` in 0..19 an ICD-9 code; a seeded 80/20 split,
      features standardised with training statistics.

    Features in ``dtype``.

    ``modalities`` other than the default with a MIMIC pickle, and ``task`` other than -1 with an
    affect pickle, are refused (the pickle's layout decides which of them applies).
    """
    name = os.path.basename(path)
    data = _load_pickle(path)
    if not isinstance(data, dict):
        raise DataError(f"{name}: expected a dict, got {type(data).__name__}")
    if "ep_tdata" in data or "adm_features_all" in data:
        if tuple(modalities) != ("text", "vision"):
            raise DataError(f"{name}: --modalities applies to MultiBench affect pickles only, not "
                            f"to a MIMIC pickle (got {','.join(map(str, modalities))})")
        return _load_mimic(name, data, task, seed, dtype)
    if "train" in data or "test" in data:
        if task != -1:
            raise DataError(f"{name}: --task applies to MultiBench MIMIC pickles only, not to an "
                            f"affect pickle (got {task})")
        return _load_affect(name, data, modalities, dtype)
    raise DataError(
        f"{name}: not a MultiBench affect pickle (keys train/valid/test) nor a MIMIC pickle "
        f"(keys ep_tdata, adm_features_all, ...); found keys {sorted(map(str, data))}"
    )


def _load_affect(name: str, data: dict, modalities: Sequence[str],
                 dtype: torch.dtype) -> PairedData:
    modalities = tuple(modalities)
    if len(modalities) != 2 or len(set(modalities)) != 2:
        raise DataError(f"{name}: choose two different modalities, got {modalities}")
    for m in modalities:
        if m not in _AFFECT_MODALITIES:
            raise DataError(f"{name}: unknown modality {m!r}; choose from {_AFFECT_MODALITIES}")
    parts = {"train": [], "test": []}
    for split in ("train", "valid", "test"):
        if split == "valid" and "valid" not in data:
            continue
        block = _need(name, data, split, "the top level")
        xs = [_clean(_as_float(name, f"{split}/{m}", _need(name, block, m, split), dtype,
                               refuse_beyond_range=False))
              for m in modalities]
        key = f"{split}/labels"
        labels = _as_real_tensor(name, key, _need(name, block, "labels", split),
                                 "real sentiment scores").float()
        if labels.dim() == 0 or labels.shape[1:].numel() != 1:  # [N], [N, 1], [N, 1, 1]
            raise DataError(f"{name}: {key} must have shape [N] (one score per example), got "
                            f"{tuple(labels.shape)}")
        n = labels.shape[0]
        labels = labels.reshape(n)
        nan = int(labels.isnan().sum())
        if nan:  # NaN > 0 is False: it would silently become the negative class
            raise DataError(f"{name}: {key} holds {nan} NaN values; every example needs a "
                            "sentiment score")
        for m, x in zip(modalities, xs):
            if x.dim() != 3 or x.shape[0] != n:
                raise DataError(
                    f"{name}: {split}/{m} must have shape [N, T, D] with N = {n} labels, got "
                    f"{tuple(x.shape)}"
                )
        # the FactorCL authors' mosi_label: a neutral (0) clip is positive
        y = (labels >= 0).long()
        parts["test" if split == "test" else "train"].append((xs[0], xs[1], y))
    if not parts["train"] or not parts["test"]:
        raise DataError(f"{name}: needs a 'train' and a 'test' split")
    for key in (0, 1):
        widths = {tuple(p[key].shape[1:]) for ps in parts.values() for p in ps}
        if len(widths) != 1:
            raise DataError(f"{name}: {modalities[key]} shapes differ between splits: {widths}")
    x1 = torch.cat([p[0] for ps in parts.values() for p in ps])
    x2 = torch.cat([p[1] for ps in parts.values() for p in ps])
    y = torch.cat([p[2] for ps in parts.values() for p in ps])
    n_train = sum(p[2].shape[0] for p in parts["train"])
    idx = torch.arange(y.shape[0])
    if torch.unique(y).numel() < 2:
        raise DataError(f"{name}: the binarised labels hold a single class")
    return PairedData(x1, x2, y, idx[:n_train], idx[n_train:], 2,
                      name=f"{name} ({'+'.join(modalities)})")


def _load_mimic(name: str, data: dict, task: int, seed: int, dtype: torch.dtype) -> PairedData:
    top = "the top level"
    xs = _clean(_as_float(name, "adm_features_all", _need(name, data, "adm_features_all", top),
                          dtype, refuse_beyond_range=False))
    xt = _clean(_as_float(name, "ep_tdata", _need(name, data, "ep_tdata", top), dtype,
                          refuse_beyond_range=False))
    if xs.dim() != 2:
        raise DataError(f"{name}: adm_features_all must have shape [N, D], got {tuple(xs.shape)}")
    if xt.dim() != 3 or xt.shape[0] != xs.shape[0]:
        raise DataError(
            f"{name}: ep_tdata must have shape [N, T, D] with N = {xs.shape[0]}, got "
            f"{tuple(xt.shape)}"
        )
    n = xs.shape[0]
    if task < -1:
        raise DataError(f"{name}: task must be -1 (mortality) or an ICD-9 code index 0..19, got "
                        f"{task}")
    if task == -1:
        key = "adm_labels_all"
        adm = _as_real_tensor(name, key, _need(name, data, key, top), "numeric labels")
        if adm.dim() != 2 or adm.shape[0] != n or adm.shape[1] < 6:
            raise DataError(
                f"{name}: adm_labels_all must have shape [N, >=6], got {tuple(adm.shape)}")
        # Mortality class: the first of columns 1..5 that is positive, else 0 (MultiBench's rule).
        # A NaN would count as not positive, and its example silently as class 0 or a later
        # class: refused, as NaN class indices are (y_icd9)
        nan = adm[:, 1:6].isnan()
        if nan.any():
            raise DataError(
                f"{name}: adm_labels_all holds {int(nan.sum())} NaN values in columns 1..5 (the "
                f"mortality classes; {int(nan.any(1).sum())} examples); they must be numbers "
                "(positive: the class)")
        pos = adm[:, 1:6] > 0
        first = torch.where(pos.any(1), pos.float().argmax(1) + 1, torch.zeros(n, dtype=torch.long))
        y = first.long()
    else:
        key = f"y_icd9[:, {task}]"
        icd = _as_real_tensor(name, "y_icd9", _need(name, data, "y_icd9", top), "numeric labels")
        if icd.dim() != 2 or icd.shape[0] != n or not 0 <= task < icd.shape[1]:
            raise DataError(
                f"{name}: y_icd9 must have shape [N, K] with task < K, got {tuple(icd.shape)} and "
                f"task {task}"
            )
        y = icd[:, task]  # checked as class indices before any conversion
    y, num_classes = _as_labels(name, key, y, n)
    train_idx, test_idx = _random_split(n, 0.2, seed)
    # Standardise with training statistics only, so the test split stays unseen.
    ms, ss = xs[train_idx].mean(0), xs[train_idx].std(0).clamp_min(1e-6)
    mt = xt[train_idx].mean((0, 1))
    st = xt[train_idx].std((0, 1)).clamp_min(1e-6)
    return PairedData((xs - ms) / ss, (xt - mt) / st, y, train_idx, test_idx, num_classes,
                      name=f"{name} (MIMIC, task {task})")


def load_dataset(spec: str, *, synthetic: Optional[SyntheticConfig] = None,
                 modalities: Sequence[str] = ("text", "vision"), task: int = -1,
                 test_fraction: Optional[float] = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> PairedData:
    """``synthetic``, ``npz:PATH`` (a .npz or .pt file), ``pt:PATH`` or ``multibench:PATH``; a
    file's features as ``dtype`` (the synthetic generator's are float32)."""
    if spec == "synthetic":
        return make_synthetic(synthetic or SyntheticConfig(seed=seed))
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise DataError(
            f"unknown dataset {spec!r}; use synthetic, npz:PATH (.npz or .pt) or multibench:PATH"
        )
    if kind in ("npz", "pt"):
        return load_paired_file(path, test_fraction=test_fraction, seed=seed, dtype=dtype)
    if kind == "multibench":
        return load_multibench(path, modalities=modalities, task=task, seed=seed, dtype=dtype)
    raise DataError(f"unknown dataset kind {kind!r} in {spec!r}; use npz:, pt: or multibench:")
