"""Time one full FactorCL training step (main step + NCE-CLUB step) per critic backend.

    python -m factorcl.bench [--model factorcl-sup] [--batch 256] [--backends reference,cpu]
                             [--critic-hidden 512] [--embed-dim 128] [--repeats 3]
                             [--device cpu|cuda[:k]]

Prints one line per backend (median seconds per step and samples per second) and the speed-up of
each over the first backend that ran (named in the line); a backend that cannot run here is
reported and skipped. An unknown backend or other bad flag, or no backend that can run, ends the
command with one line on stderr and exit status 2. ``step_seconds`` is the function a
pytest-benchmark suite can call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Optional, Sequence

import torch

from factorcl_ext import _backends

from . import data as D
from .cli import EXIT_USAGE, _Parser, _positive_int
from .models import MODELS, SETTING_USERS, Batch, ModelConfig, build_model
from .train import TrainError, club_step, main_step, resolve_device

__all__ = ["make_step", "step_seconds", "main"]


DEFAULT_CRITIC_HIDDEN = 512


def make_step(model_name: str = "factorcl-sup", batch: int = 256, backend: str = "cpu",
              embed_dim: int = 128, backbone_hidden: int = 512,
              critic_hidden: int = DEFAULT_CRITIC_HIDDEN,
              critic_layers: int = 1, x_dim: int = 100, seed: int = 0, device="cpu"):
    """A zero-argument callable running one training step on a fixed synthetic batch, on
    ``device`` (float32, no autocast)."""
    torch.manual_seed(seed)
    data = D.make_synthetic(D.SyntheticConfig(num_examples=batch, x_dim=x_dim, test_fraction=0.5,
                                              seed=seed))
    cfg = ModelConfig(embed_dim=embed_dim, backbone_hidden=backbone_hidden,
                      critic_hidden=critic_hidden, critic_layers=critic_layers,
                      critic_backend=backend)
    model = build_model(model_name, (x_dim,), (x_dim,), 2, cfg).to(device)
    g = D.make_generator(seed, "bench")
    b = Batch(*(t.to(device) for t in (data.x1, data.x2, data.y, D.augment(data.x1, g),
                                       D.augment(data.x2, g))))
    opt = torch.optim.Adam(model.main_parameters(), lr=1e-4)
    club = model.club_parameters()
    club_opt = torch.optim.Adam(club, lr=1e-4) if club else None

    def step():
        main_step(model, opt, b)
        if club_opt is not None:
            club_step(model, club_opt, b)

    return step


def step_seconds(repeats: int = 3, device="cpu", **kwargs) -> float:
    """Median wall time of one training step (after one warm-up step, which also takes a GPU
    backend's compilation and autotuning); on a GPU each step is timed to its completion."""
    step = make_step(device=device, **kwargs)
    device = torch.device(device)

    def finish():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    finish()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        finish()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _backend_list(s: str) -> list:
    names = [b.strip() for b in s.split(",") if b.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(_backends.BACKENDS)}, got {s!r}")
    for b in names:
        if b not in _backends.BACKENDS:
            raise argparse.ArgumentTypeError(
                f"unknown backend {b!r} in {s!r}; choose from {', '.join(_backends.BACKENDS)}")
    return names


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = _Parser(prog="python -m factorcl.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="factorcl-sup")
    p.add_argument("--batch", type=_positive_int, default=256)
    p.add_argument("--backends", type=_backend_list, default="reference,cpu",
                   help="comma-separated critic backends (default %(default)s)")
    p.add_argument("--critic-hidden", type=_positive_int, default=None,
                   help="concat critics' width H (FactorCL models; default "
                        f"{DEFAULT_CRITIC_HIDDEN})")
    p.add_argument("--embed-dim", type=_positive_int, default=128)
    p.add_argument("--repeats", type=_positive_int, default=3)
    p.add_argument("--device", default="cpu", help="cpu | cuda[:k] (default %(default)s)")
    args = p.parse_args(argv)
    concat = args.model in SETTING_USERS["critic_hidden"]
    if args.critic_hidden is not None and not concat:
        p.error(f"--critic-hidden applies to --model "
                f"{' / '.join(SETTING_USERS['critic_hidden'])} only, not to {args.model}")
    critic_hidden = args.critic_hidden or DEFAULT_CRITIC_HIDDEN
    try:
        # the step's batch is a synthetic dataset of --batch examples
        D.SyntheticConfig(num_examples=args.batch).validate()
    except D.DataError as exc:
        p.error(f"--batch {args.batch}: {exc}")
    try:
        device = resolve_device(args.device)
    except TrainError as exc:
        p.error(str(exc))
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    first = None  # (backend, seconds) of the first backend that ran: the speed-ups' baseline
    failed = []
    for backend in args.backends:
        try:
            t = step_seconds(repeats=args.repeats, model_name=args.model, batch=args.batch,
                             backend=backend, critic_hidden=critic_hidden,
                             embed_dim=args.embed_dim, device=device)
        except (RuntimeError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            failed.append(f"{backend}: {reason}")
            print(f"{backend:>9}: cannot run ({reason})")
            continue
        first = first or (backend, t)
        print(f"{backend:>9}: {t:.3f} s/step, {args.batch / t:.0f} samples/s, "
              f"{first[1] / t:.2f}x vs {first[0]} "
              f"({args.model}, batch {args.batch}"
              f"{f', critic H={critic_hidden}' if concat else ''}, {where})")
    if first is None:
        print(f"{p.prog}: error: no backend could run --model {args.model} at --batch "
              f"{args.batch} on {device} ({'; '.join(failed)})", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
