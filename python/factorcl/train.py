"""The training loop: alternating optimisation, seeded data order, atomic checkpoints, resume,
Ctrl-C, progress bar, JSON-lines metrics, AMP on GPU, data parallel over ``torch.distributed``.

One step (FactorCL models):

1. one Adam step on every parameter except the two NCE-CLUB critics' own weights, on the total
   loss of the batch;
2. ``num_club_iter`` Adam steps on the NCE-CLUB critics alone, each maximising their InfoNCE
   lower bound on a fresh batch drawn from the training split, with the backbones and heads run
   without a graph.

Reproducibility: the batch of step k (an epoch's permutation of the training split), the
augmentations of step k and the NCE-CLUB batches of step k come from generators seeded by
``(seed, k)``, so a run resumed from a checkpoint, or split over ranks, draws exactly the same
data as an uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from factorcl_ext import _backends

from . import data as D
from .distributed import Comm
from .models import MODELS, SETTING_USERS, Batch, ModelConfig, build_model

__all__ = ["TrainConfig", "TrainError", "train", "previous_run", "write_atomically",
           "make_out_dir", "save_checkpoint", "load_checkpoint", "load_model", "resolve_device",
           "resolve_backend", "main_step", "club_step"]

CHECKPOINT_FORMAT = "factorcl-checkpoint-1"
# The files of a run directory (--out).
CHECKPOINT_FILE, METRICS_FILE, METRICS_LOG_FILE = "checkpoint.pt", "metrics.json", "metrics.jsonl"
# Settings a resumed run must share with its checkpoint for the result to be the same.
_RESUME_KEYS = ("model", "batch_size", "lr", "club_lr", "num_club_iter", "seed", "aug_noise",
                "aug_drop", "augmentations", "dtype")
DEFAULT_VECTOR_AUGS = D.VECTOR_AUGS
# Adam's step size moves every weight by about lr per step: above 1 a run only diverges (and past
# ~1e37 the float32 step overflows inside Adam).
MAX_LR = 1.0


class TrainError(ValueError):
    """A configuration, checkpoint or device problem the user can fix; the message says how."""


@dataclass
class TrainConfig:
    model: str = "factorcl-ssl"
    epochs: int = 10
    batch_size: int = 128  # the global batch (split over ranks)
    lr: float = 1e-4
    club_lr: Optional[float] = None  # default: lr
    num_club_iter: int = 1
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    amp: str = "auto"  # auto: bfloat16 autocast on CUDA, off on CPU; on; off
    dtype: str = "float32"
    aug_noise: float = 0.1
    aug_drop: float = 0.2
    augmentations: Optional[tuple] = None  # default: all of data.VECTOR_AUGS / SEQUENCE_AUGS
    checkpoint_every: int = 0  # steps; 0: only at the end and on Ctrl-C
    log_every: int = 10
    progress: bool = True
    probe: bool = True
    mi_probe_steps: int = 0  # > 0: also InfoNCE MI probes of the representations
    model_cfg: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> None:
        if self.model not in MODELS:
            raise TrainError(f"--model must be one of {', '.join(MODELS)}; got {self.model!r}")
        for name in ("epochs", "batch_size", "num_club_iter", "log_every"):
            v = getattr(self, name)
            least = 0 if name == "num_club_iter" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise TrainError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
        if self.checkpoint_every < 0:
            raise TrainError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.batch_size < 2:
            raise TrainError(
                f"--batch-size must be at least 2 (contrastive pairs), got {self.batch_size}")
        for name in ("lr", "club_lr"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= MAX_LR:
                raise TrainError(f"--{name.replace('_', '-')} must be in (0, {MAX_LR:g}] (Adam's "
                                 f"step size), got {v}")
        if not 0.0 <= self.aug_drop < 1.0:
            raise TrainError(f"--aug-drop is the probability that an augmentation zeroes a feature "
                             f"(or a time step) and must be in [0, 1), got {self.aug_drop}")
        if not (math.isfinite(self.aug_noise) and self.aug_noise >= 0):
            raise TrainError(f"--aug-noise is the augmentation noise's std (in units of each "
                             f"feature's std) and must be a finite number >= 0, got "
                             f"{self.aug_noise}")
        if self.amp not in ("auto", "on", "off"):
            raise TrainError(f"--amp must be auto, on or off, got {self.amp!r}")
        if self.augmentations is not None:
            known = set(D.VECTOR_AUGS) | set(D.SEQUENCE_AUGS)
            bad = [a for a in self.augmentations if a not in known]
            if bad or not self.augmentations:
                raise TrainError(f"--augmentations: unknown {bad or 'empty list'}; choose from "
                                 f"{', '.join(sorted(known))}")
        if self.mi_probe_steps and not self.probe:
            raise TrainError("--mi-probe-steps runs in the evaluation, which --no-probe skips; "
                             "drop one of them")
        if self.dtype not in ("float32", "float64"):
            raise TrainError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        m = self.model_cfg
        for name in ("embed_dim", "backbone_hidden", "critic_hidden"):
            if getattr(m, name) < 1:
                flag = name.replace("_", "-")
                raise TrainError(f"--{flag} must be positive, got {getattr(m, name)}")
        if m.critic_layers < 0 or m.backbone_layers < 0:
            raise TrainError("--critic-layers and --backbone-layers must be >= 0")
        if m.critic_backend not in _backends.BACKENDS:
            raise TrainError(f"--backend must be one of {', '.join(_backends.BACKENDS)}, got "
                             f"{m.critic_backend!r}")
        if not m.temperature > 0:
            raise TrainError(f"--temperature must be positive, got {m.temperature}")

    def torch_dtype(self) -> torch.dtype:
        """The models' and inputs' dtype (``dtype``)."""
        return torch.float64 if self.dtype == "float64" else torch.float32

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        m = d.pop("model_cfg", {})
        known_m = {f.name for f in dataclasses.fields(ModelConfig)}
        mc = ModelConfig(**{k: v for k, v in m.items() if k in known_m})
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(model_cfg=mc, **{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------------------------
# Devices and backends
# --------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device: unknown device {name!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise TrainError(f"--device: {dev.type} is not supported; use cpu or cuda")
    return dev


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete critic backend for ``device`` (``auto`` resolved), or a TrainError."""
    try:
        return _backends.resolve(backend, device)
    except (ValueError, RuntimeError) as exc:
        raise TrainError(f"--backend {backend}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def write_atomically(path: str, write) -> None:
    """``write(f)`` into a temporary file (binary) in ``path``'s directory, flushed to disk, then
    renamed over ``path``: a crash or Ctrl-C leaves the old file or the new one, never a torn
    file. Used for checkpoints, metrics.json, compare's summary files, the MI benchmark's results
    and ``factorcl embed``'s output. The file gets the permissions ``open(path, "w")`` would
    give it (0666 less the umask), not the temporary file's 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # POSIX; a file system without modes keeps its own
                with contextlib.suppress(OSError):
                    os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomically(path: str, text: str) -> None:
    """``text`` (UTF-8) to ``path`` through :func:`write_atomically`."""
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def _umask() -> int:
    """The process's umask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_out_dir(path: str, what: str = "--out") -> None:
    """Create the directory ``path`` (and its parents) and check that a file can be written in
    it; a TrainError naming ``path`` if not (a file in the way, no permission, a read-only or
    virtual file system, an empty name)."""
    if not path:
        raise TrainError(f"{what}: empty path; name a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        if os.path.exists(path) and not os.path.isdir(path):
            reason = "a file of that name is in the way"
        else:
            reason = exc.strerror or str(exc)
        raise TrainError(f"{what} {path}: cannot create or write to this directory ({reason})"
                         ) from None


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (:func:`write_atomically`)."""
    write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str, what: str = "--resume") -> dict:
    """The checkpoint at ``path``; a TrainError starting with ``what`` if it cannot be read.
    Read with ``weights_only=True``: tensors, containers and plain values only (what
    :func:`train` saves), so a checkpoint from elsewhere cannot run code when it is loaded."""
    if not os.path.isfile(path):
        raise TrainError(f"{what}: checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a checkpoint, a truncated one, or one holding other objects
        # (torch's own message spans lines and suggests weights_only=False: not repeated here)
        reason = exc.strerror if isinstance(exc, PermissionError) else type(exc).__name__
        raise TrainError(f"{what}: cannot read {path}: not a factorcl checkpoint, or a damaged "
                         f"one ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{what}: {path} is not a factorcl checkpoint")
    return state


def load_model(path: str, device="cpu", backend: Optional[str] = None,
               what: str = "load_model") -> tuple[torch.nn.Module, dict]:
    """The model a run trained, to use its representations: ``path`` is the run's checkpoint or
    its ``--out`` directory. The model is rebuilt from the settings and per-example input shapes
    the checkpoint records, its weights loaded, on ``device`` in the run's dtype, in eval mode;
    ``backend`` replaces the critics' backend (default: the run's). Returns ``(model, info)``,
    ``info`` holding ``config`` (the run's TrainConfig), ``data`` (the training data's name,
    ``x1`` and ``x2`` per-example shapes, ``num_classes``, ...) and ``step``. Errors are
    TrainErrors starting with ``what``."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_FILE)
    state = load_checkpoint(path, what=what)
    cfg = TrainConfig.from_dict(state["config"])
    if backend is not None:
        cfg.model_cfg.critic_backend = backend
    data = state["data"]
    dtype = cfg.torch_dtype()
    model = build_model(cfg.model, tuple(data["x1"]), tuple(data["x2"]), data["num_classes"],
                        cfg.model_cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise TrainError(f"{what}: {path} does not fit the model its settings describe "
                         f"({str(exc).splitlines()[0]})") from None
    model = model.to(device=resolve_device(str(device)), dtype=dtype).eval()
    return model, {"config": cfg, "data": data, "step": int(state["step"]), "checkpoint": path}


def _describe_checkpoint(path: str) -> str:
    try:
        state = load_checkpoint(path)
        return f"{state['config']['model']}, checkpoint at step {state['step']}"
    except (TrainError, KeyError, TypeError):
        return f"{os.path.basename(path)} is there"


def _data_fingerprint(data: D.PairedData) -> dict:
    """What a checkpoint records of its training data: the name, the sizes and per-example
    shapes (to rebuild the model), the generator's settings (synthetic data) and a hash of every
    value of x1, x2, y and of the train / test split (the same in every process and run), and
    what made it (``made_by``: torch and the CPU's kind, which the generator's rounding follows;
    not compared)."""
    h = hashlib.blake2b(digest_size=20)
    for key in ("x1", "x2", "y", "train_idx", "test_idx"):
        t = getattr(data, key).detach().cpu().contiguous()
        h.update(repr((key, str(t.dtype), tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return {"name": data.name, "n": int(data.y.shape[0]), "num_train": data.num_train,
            "x1": list(data.x1.shape[1:]), "x2": list(data.x2.shape[1:]),
            "num_classes": data.num_classes, "settings": dict(data.settings),
            "content_hash": h.hexdigest(), "made_by": _made_by()}


def _made_by() -> str:
    return (f"torch {torch.__version__} on {platform.machine() or 'an unknown machine'} "
            f"({torch.backends.cpu.get_cpu_capability()})")


# what a data fingerprint holds that two runs may differ in and still have the same data
_DATA_LABELS = ("name", "made_by")


def _regenerated_elsewhere(old: dict, new: dict) -> bool:
    """Synthetic data made with the same settings and shapes but other values: its random draws
    and products round differently on another kind of CPU or torch build (torch's vectorised
    normal sampler, for one, gives other bits than its scalar one)."""
    same = [k for k in old if k not in (*_DATA_LABELS, "content_hash")]
    return (bool(old.get("settings")) and "content_hash" in old
            and old.get("content_hash") != new.get("content_hash")
            and all(old[k] == new.get(k) for k in same))


def _data_diff(old: dict, new: dict) -> Optional[str]:
    """How the data a checkpoint recorded (``old``, a :func:`_data_fingerprint`) differs from
    ``new``, or None when it is the same data (the name alone may differ: a renamed file)."""
    if "content_hash" not in old:
        return ("the checkpoint was written by an older factorcl that did not record a hash of its "
                "training data, so it cannot be checked that this run has the same data")
    if ({k: v for k, v in old.items() if k not in _DATA_LABELS}
            == {k: v for k, v in new.items() if k not in _DATA_LABELS}):
        return None
    if _regenerated_elsewhere(old, new):
        where = (f"; the checkpoint's by {old['made_by']}, this run's by {new.get('made_by')}"
                 if "made_by" in old else "")
        return ("the checkpoint was trained on different data (the synthetic generator gave "
                "other values with the same settings: it rounds differently on another kind of "
                f"CPU or torch build{where})")
    old_s, new_s = old.get("settings") or {}, new.get("settings") or {}
    for key in [*new_s, *(k for k in old_s if k not in new_s)]:
        if old_s.get(key) != new_s.get(key):
            detail = (f"made with {key}={old_s.get(key)!r}; this run's data has "
                      f"{key}={new_s.get(key)!r}")
            break
    else:
        for key in ("n", "num_train", "x1", "x2", "num_classes"):
            if old.get(key) != new.get(key):
                detail = f"{key} {old.get(key)!r}; this run's data has {new.get(key)!r}"
                break
        else:
            detail = "the same shapes, other values of x1, x2, y or of the train/test split"
    return f"the checkpoint was trained on different data ({detail})"


# Settings that change nothing a run computes: a run is continued or reused across them.
_PRESENTATION_KEYS = ("progress", "checkpoint_every", "log_every")
# Model settings that pick how the critics are computed, not what: a resume may change them.
_KERNEL_KEYS = ("critic_backend", "critic_deterministic")


def _settings_diff(state: dict, cfg: TrainConfig, data: Optional[D.PairedData], *,
                   strict: bool) -> Optional[str]:
    """How the run saved in ``state`` differs from ``cfg`` on ``data``, or None. ``strict=False``:
    only the settings a resumed run must share for its result to be an uninterrupted run's (the
    epochs, backend and evaluation may change); ``strict=True``: every setting but the
    presentation ones. Settings the model does not use (``models.SETTING_USERS``) are not
    compared. The data is compared in both (its generator's settings and every value), after the
    settings; ``data=None`` compares the settings alone."""
    old = TrainConfig.from_dict(state["config"]).to_dict()  # settings added since: defaults
    new = cfg.to_dict()
    old_m, new_m = old.pop("model_cfg"), new.pop("model_cfg")
    # "model" is the first key compared (never an unused one), so the settings left out are
    # those of a model both runs share
    unused = {k for k, users in SETTING_USERS.items() if new["model"] not in users}
    keys = [k for k in new if k not in _PRESENTATION_KEYS] if strict else _RESUME_KEYS
    keys = [k for k in keys if k not in unused]
    model_keys = [k for k in new_m if (strict or k not in _KERNEL_KEYS) and k not in unused]
    for where_old, where_new, names in ((old, new, keys), (old_m, new_m, model_keys)):
        for key in names:
            if where_old[key] != where_new[key]:
                return (f"the checkpoint was made with {key}={where_old[key]!r} but this run "
                        f"has {key}={where_new[key]!r}")
    if data is None:
        return None
    return _data_diff(state.get("data") or {}, _data_fingerprint(data))


def _check_resume(state: dict, cfg: TrainConfig, data: D.PairedData, path: str,
                  fingerprint: Optional[dict] = None) -> None:
    old = state.get("data") or {}
    fingerprint = fingerprint or _data_fingerprint(data)
    diff = _settings_diff(state, cfg, None, strict=False)
    elsewhere = diff is None and _regenerated_elsewhere(old, fingerprint)
    diff = diff or _data_diff(old, fingerprint)
    if diff is not None:
        if "content_hash" not in old:
            raise TrainError(f"--resume {path}: {diff}; start the run again (--overwrite instead "
                             "of --resume) or use another --out")
        if elsewhere:
            raise TrainError(f"--resume {path}: {diff}; resume it where it was started, or start "
                             "the run again here (--overwrite instead of --resume, or another "
                             "--out)")
        raise TrainError(f"--resume {path}: {diff}; use the same settings")


def previous_run(out_dir: str, cfg: TrainConfig, data: D.PairedData) -> Optional[dict]:
    """The run already in ``out_dir`` if it was made with ``cfg``'s settings on ``data``: None
    when there is no checkpoint; else ``{"checkpoint": path, "metrics": m}`` where
    ``m`` is its metrics.json when it finished, else None. A run with other settings raises a
    TrainError (``factorcl compare`` continues or reuses runs; it never replaces one silently)."""
    ckpt = os.path.join(out_dir, CHECKPOINT_FILE)
    if not os.path.exists(ckpt):
        return None
    state = load_checkpoint(ckpt, what=out_dir)
    diff = _settings_diff(state, cfg, data, strict=True)
    if diff is not None:
        raise TrainError(f"{out_dir} holds an earlier run ({diff}); pass --overwrite to replace "
                         "it, or choose another --out")
    metrics = None
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(out_dir, METRICS_FILE)) as f:
            metrics = json.load(f)
    finished = (isinstance(metrics, dict) and not metrics.get("interrupted")
                and metrics.get("steps") == metrics.get("total_steps") == state["step"])
    return {"checkpoint": ckpt, "metrics": metrics if finished else None}


# --------------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------------


class _StopFlag:
    """SIGINT or SIGTERM sets a flag the loop checks after each step (a checkpoint is saved, the
    run ends cleanly); a second SIGINT interrupts at once. SIGTERM only ever sets the flag:
    torchrun answers a Ctrl-C by sending its workers SIGTERM milliseconds after the terminal's
    SIGINT (and SIGKILL 30 s later), and batch schedulers stop jobs with it. Once a signal asked
    for a stop, later SIGTERMs are ignored, also after the run returns (the process is winding
    down, and a SIGTERM just after the checkpoint would kill it before its message and status).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.set = False
        self._sigint = False
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self._sigint:
                raise KeyboardInterrupt
            self._sigint = True
        self.set = True

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, signal.SIG_IGN if self.set and s == signal.SIGTERM else old)
        return False


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is optional
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)


class _Sampler:
    """Global batch indices of each step: epoch permutations of the training split (drop last)."""

    def __init__(self, data: D.PairedData, batch_size: int, seed: int):
        self.train_idx = data.train_idx
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = data.num_train // batch_size
        self._epoch, self._perm = None, None

    def batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = D.epoch_permutation(len(self.train_idx), self.seed, epoch)
        b = self.batch_size
        return self.train_idx[self._perm[i * b:(i + 1) * b]]

    def club_batch(self, step: int, k: int) -> torch.Tensor:
        g = D.make_generator(self.seed, "club", step, k)
        return self.train_idx[torch.randperm(len(self.train_idx), generator=g)[:self.batch_size]]


def train(cfg: TrainConfig, data: D.PairedData, out_dir: str, *, resume: Optional[str] = None,
          overwrite: bool = False, comm: Optional[Comm] = None,
          stop_at_step: Optional[int] = None, log=None) -> dict:
    """Train ``cfg.model`` on ``data``; write ``out_dir/metrics.jsonl`` (every ``log_every``
    steps), ``out_dir/checkpoint.pt`` and, when training completes, evaluate and write
    ``out_dir/metrics.json``. Returns the summary (``interrupted`` True after a Ctrl-C,
    ``stopped`` True after ``stop_at_step``; ``interrupted_in`` ``"evaluation"`` when the
    Ctrl-C came in the final evaluation, the checkpoint of the trained model being saved).
    ``log`` receives one line at the start. An ``out_dir`` that already holds another run's
    checkpoint is refused unless ``resume`` names that checkpoint or ``overwrite`` is set (then
    the old run's checkpoint, metrics.json and metrics.jsonl are all removed before the new run
    starts: a failed run does not leave them to be mixed with its own)."""
    cfg.validate()
    if resume and overwrite:
        raise TrainError("--resume and --overwrite exclude each other: --resume continues a run, "
                         "--overwrite starts again and replaces the run in --out; pass one")
    comm = comm or Comm()
    device = resolve_device(cfg.device)
    backend = resolve_backend(cfg.model_cfg.critic_backend, device)
    dtype = cfg.torch_dtype()
    use_amp, amp_note = _use_amp(cfg, device, data.num_classes)
    if cfg.batch_size % comm.world:
        raise TrainError(f"--batch-size {cfg.batch_size} must be divisible by the number of "
                         f"processes ({comm.world})")
    sampler = _Sampler(data, cfg.batch_size, cfg.seed)
    if sampler.steps_per_epoch < 1:
        raise TrainError(f"--batch-size {cfg.batch_size} is larger than the training split "
                         f"({data.num_train} examples)")
    total_steps = cfg.epochs * sampler.steps_per_epoch

    torch.manual_seed(D.derive_seed(cfg.seed, "init"))
    model = build_model(cfg.model, data.x1.shape[1:], data.x2.shape[1:], data.num_classes,
                        cfg.model_cfg).to(device=device, dtype=dtype)
    main_params = model.main_parameters()
    club_params = model.club_parameters()
    if not main_params:
        raise TrainError(f"{cfg.model} has no trainable parameters")
    opt = torch.optim.Adam(main_params, lr=cfg.lr)
    club_opt = torch.optim.Adam(club_params, lr=cfg.club_lr or cfg.lr) if club_params else None

    x_scale = [_feature_std(data.x1[data.train_idx]), _feature_std(data.x2[data.train_idx])]

    def aug_ops(x: torch.Tensor) -> tuple:
        allowed = D.VECTOR_AUGS if x.dim() == 2 else D.SEQUENCE_AUGS
        wanted = cfg.augmentations or (DEFAULT_VECTOR_AUGS if x.dim() == 2 else D.SEQUENCE_AUGS)
        ops = tuple(a for a in wanted if a in allowed)
        if not ops:
            raise TrainError(f"--augmentations {','.join(wanted)}: none applies to "
                             f"{'vector' if x.dim() == 2 else 'sequence'} inputs; choose from "
                             f"{', '.join(allowed)}")
        return ops

    ops1, ops2 = aug_ops(data.x1), aug_ops(data.x2)

    ckpt_path = os.path.join(out_dir, CHECKPOINT_FILE)
    jsonl_path = os.path.join(out_dir, METRICS_LOG_FILE)
    metrics_path = os.path.join(out_dir, METRICS_FILE)
    state = load_checkpoint(resume) if resume else None
    if (os.path.exists(ckpt_path) and not overwrite
            and not (resume and os.path.samefile(resume, ckpt_path))):
        raise TrainError(f"{out_dir} already holds a run ({_describe_checkpoint(ckpt_path)}); "
                         f"continue it with --resume {ckpt_path}, or pass --overwrite to start "
                         "again and replace it")
    fingerprint = _data_fingerprint(data)  # hashes every value: once per run
    start, elapsed_before, loss_before = 0, 0.0, float("nan")
    if state is not None:
        _check_resume(state, cfg, data, resume, fingerprint)
        if int(state["step"]) > total_steps:
            spe = sampler.steps_per_epoch
            raise TrainError(f"--resume {resume}: the checkpoint is at step {state['step']}, "
                             f"past the {total_steps} steps of --epochs {cfg.epochs} ({spe} per "
                             f"epoch); pass --epochs {-(-int(state['step']) // spe)} or more to "
                             "continue it")
    make_out_dir(out_dir)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if club_opt is not None:
            club_opt.load_state_dict(state["club_opt"])
        start, elapsed_before = int(state["step"]), float(state["elapsed"])
        loss_before = float(state.get("loss", float("nan")))  # older checkpoints: NaN
        torch.set_rng_state(state["torch_rng"])
    if comm.is_main:
        if overwrite:  # the old run's files go together, its checkpoint included
            for path in (ckpt_path, metrics_path, jsonl_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        _trim_jsonl(jsonl_path, start)
        if start < total_steps and os.path.exists(metrics_path):
            os.unlink(metrics_path)  # it described the checkpoint this run moves past
        if log is not None:
            log(f"[train] {cfg.model} on {data.describe()}: steps {start}..{total_steps} "
                f"(batch {cfg.batch_size}, {comm.world} process{'es' if comm.world > 1 else ''}, "
                f"critic backend {backend}{amp_note})")

    def make_batch(idx: torch.Tensor, aug_keys: tuple) -> Batch:
        x1, x2, y = data.x1[idx], data.x2[idx], data.y[idx]
        x1_aug = x2_aug = None
        if model.uses_views:
            # Augment the global batch, then slice: every rank draws the same numbers.
            x1_aug = D.augment(x1, D.make_generator(cfg.seed, "aug", *aug_keys, 1),
                               noise_std=cfg.aug_noise, drop_prob=cfg.aug_drop, ops=ops1,
                               scale=x_scale[0])
            x2_aug = D.augment(x2, D.make_generator(cfg.seed, "aug", *aug_keys, 2),
                               noise_std=cfg.aug_noise, drop_prob=cfg.aug_drop, ops=ops2,
                               scale=x_scale[1])
        sl = comm.local_slice(len(idx))

        def mv(t):
            return None if t is None else t[sl].to(device=device, dtype=dtype)

        return Batch(mv(x1), mv(x2), y[sl].to(device), mv(x1_aug), mv(x2_aug))

    def autocast():
        if use_amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def checkpoint(step: int, elapsed: float) -> None:
        if comm.is_main:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "step": step, "elapsed": elapsed, "loss": last_loss,
                "config": cfg.to_dict(), "data": fingerprint,
                "model": model.state_dict(), "opt": opt.state_dict(),
                "club_opt": club_opt.state_dict() if club_opt is not None else None,
                "torch_rng": torch.get_rng_state(),
            })
        comm.barrier()

    bar = _progress_bar(total_steps, start, cfg.progress and comm.is_main)
    jsonl = open(jsonl_path, "a") if comm.is_main else None
    t0 = time.perf_counter()
    step = start
    interrupted = stopped = False
    last_loss = loss_before  # a resumed run that has no step left reports the checkpoint's
    model.train()
    try:
        with _StopFlag() as stop:
            while step < total_steps:
                batch = make_batch(sampler.batch(step), (step,))
                loss, terms = main_step(model, opt, batch, comm, autocast)
                club_value = None
                for k in range(cfg.num_club_iter if club_opt is not None else 0):
                    cb = make_batch(sampler.club_batch(step, k), ("club", step, k))
                    club_value = club_step(model, club_opt, cb, comm, autocast)
                step += 1
                # the loss of the global batch (each process has its share) and whether any
                # process was asked to stop, in one all-reduce; every process sees the same
                last_loss, stop_now = comm.mean_and_any(float(loss.detach()), stop.set)
                if not math.isfinite(last_loss):
                    causes = _nonfinite_loss_causes(cfg, model, club_opt is not None, use_amp)
                    raise TrainError(f"the loss became {last_loss} at step {step}; {causes}")
                elapsed = elapsed_before + time.perf_counter() - t0
                done = step - start
                rate = done * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
                if step % cfg.log_every == 0 or step == total_steps:
                    rec = {"step": step, "epoch": (step - 1) // sampler.steps_per_epoch,
                           "loss": last_loss, "samples_per_s": rate,
                           "seconds": elapsed}
                    rec.update({k: comm.mean(float(v.detach())) for k, v in terms.items()})
                    if club_value is not None:
                        rec["club_learning_loss"] = comm.mean(club_value)
                    if jsonl is not None:
                        jsonl.write(json.dumps(rec) + "\n")
                        jsonl.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.3f}", samples_s=f"{rate:.0f}")
                if stop_now:
                    interrupted = True
                    break
                if stop_at_step is not None and step >= stop_at_step:
                    stopped = True
                    break
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                    checkpoint(step, elapsed)
            # still under the stop flag's handlers: torchrun's SIGTERM may arrive just now
            seconds = elapsed_before + time.perf_counter() - t0
            checkpoint(step, seconds)
    finally:
        if bar is not None:
            bar.close()
        if jsonl is not None:
            jsonl.close()
    summary = {
        "model": cfg.model, "dataset": data.name, "backend": backend, "device": str(device),
        "steps": step, "total_steps": total_steps, "seconds": seconds,
        "samples_per_second": step * cfg.batch_size / max(seconds, 1e-9),  # the whole run's
        "final_loss": last_loss, "world_size": comm.world, "checkpoint": ckpt_path,
        "interrupted": interrupted, "stopped": stopped, "config": cfg.to_dict(),
    }
    if interrupted or stopped or not comm.is_main:
        return summary
    summary["model_ref"] = model
    if cfg.probe:
        from .eval import evaluate

        t_eval = time.perf_counter()
        try:
            summary.update(evaluate(model, data, device=device, dtype=dtype, seed=cfg.seed,
                                    mi_probe_steps=cfg.mi_probe_steps, backend=backend,
                                    deterministic=cfg.model_cfg.critic_deterministic))
        except KeyboardInterrupt:  # the trained model's checkpoint is saved: --resume evaluates
            summary.pop("model_ref")
            summary.update(interrupted=True, interrupted_in="evaluation")
            return summary
        summary["eval_seconds"] = time.perf_counter() - t_eval
    out = {k: v for k, v in summary.items() if k != "model_ref"}
    write_text_atomically(metrics_path, json.dumps(out, indent=2))
    return summary


# bfloat16 holds the integers up to 2^8 exactly: FactorCL-SUP's x-y critics read the class index
# as a number, which autocast rounds in their first layer (classes 257 and 258 would be one)
_BF16_EXACT_CLASSES = 257


def _use_amp(cfg: TrainConfig, device: torch.device, num_classes: int) -> tuple[bool, str]:
    """Whether the steps run under bfloat16 autocast, and a note for the start line when
    ``--amp auto`` leaves it off on a GPU."""
    if cfg.amp == "off" or device.type != "cuda":
        if cfg.amp == "on":
            raise TrainError("--amp on needs a CUDA device (AMP runs in bfloat16 on the GPU only)")
        return False, ""
    if cfg.model == "factorcl-sup" and num_classes > _BF16_EXACT_CLASSES:
        why = (f"factorcl-sup feeds the class index to its x-y critics as a number, and bfloat16 "
               f"rounds indices above {_BF16_EXACT_CLASSES - 1} ({num_classes} classes)")
        if cfg.amp == "on":
            raise TrainError(f"--amp on: {why}; pass --amp off")
        return False, f"; AMP off: {why}"
    return True, ", bfloat16 autocast"


def _nonfinite_loss_causes(cfg: TrainConfig, model, has_club: bool, use_amp: bool) -> str:
    """The usual causes of a NaN or infinite loss that apply to this run's model."""
    lr = f"--lr {cfg.lr:g}" + (f" / --club-lr {cfg.club_lr or cfg.lr:g}" if has_club else "")
    causes = [f"a learning rate too high ({lr})"]
    if cfg.model in ("simclr", "supcon"):
        causes.append(f"a --temperature too small ({cfg.model_cfg.temperature:g})")
    if model.uses_views:
        causes.append(f"strong augmentations (--aug-noise {cfg.aug_noise:g})")
    if use_amp:
        causes.append("bfloat16 overflow under --amp (try --amp off)")
    causes.append("input features of very large magnitude (standardise them)")
    return "the usual causes: " + "; ".join(causes)


def main_step(model, opt, batch: Batch, comm: Comm = Comm(),
              autocast=contextlib.nullcontext) -> tuple[torch.Tensor, dict]:
    """One Adam step on every parameter but the NCE-CLUB critics' own weights, on the total loss
    (their gradients are not even formed: the critics' weights are frozen for the pass)."""
    club_params = model.club_parameters()
    for p in club_params:
        p.requires_grad_(False)
    try:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss, terms = model.training_loss(batch, comm)
        loss.backward()
        comm.average_gradients(model.main_parameters())
        opt.step()
    finally:
        for p in club_params:
            p.requires_grad_(True)
    return loss.detach(), {k: v.detach() for k, v in terms.items()}


def club_step(model, club_opt, batch: Batch, comm: Comm = Comm(),
              autocast=contextlib.nullcontext) -> float:
    """One Adam step on the NCE-CLUB critics alone, minimising their negative InfoNCE bound."""
    club_opt.zero_grad(set_to_none=True)
    with autocast():
        loss = model.club_learning_loss(batch, comm)
    loss.backward()
    comm.average_gradients(model.club_parameters())
    club_opt.step()
    return float(loss.detach())


def _feature_std(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return flat.std(0).clamp_min(1e-6)


def _trim_jsonl(path: str, upto_step: int) -> None:
    """Keep the metric lines of steps <= ``upto_step`` (a resumed run rewrites the rest). A line
    that does not parse (the torn end of an append cut short by a crash or a full disk) is
    dropped: it was being written after the last checkpoint."""

    def kept(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            return False
        return isinstance(record, dict) and record.get("step", 0) <= upto_step

    if not os.path.exists(path):
        return
    if upto_step == 0:
        os.unlink(path)
        return
    with open(path) as f:
        keep = [line if line.endswith("\n") else line + "\n" for line in f
                if line.strip() and kept(line)]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
