"""The ``factorcl`` command: ``train``, ``compare``, ``embed`` and ``mi-bench``.

Bad flags or unusable data end the command with one line on stderr and exit status 2; Ctrl-C
during training saves a checkpoint and exits with status 130. Run data parallel with
``torchrun --nproc_per_node K -m factorcl.cli train ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from typing import Optional, Sequence

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Defaults sized so that `factorcl compare` on the synthetic data finishes in about 6 minutes per
# seed on two CPU cores with the fused kernels (40 epochs: SimCLR needs that long to lose the
# unique information the probe uses; see README); every one is a flag.
DEFAULTS = dict(
    epochs=40, batch_size=128, lr=1e-4, embed_dim=64, backbone_hidden=256, backbone_layers=1,
    critic_hidden=128, critic_layers=1, n_examples=6000,
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage block) and exits with status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_in(low: int, high: Optional[int], what: str):
    """An argparse type: an int in [low, high] (``high`` None: no upper bound)."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = None
        if v is None or v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    return parse


_positive_int = _int_in(1, None, "a positive integer")
_nonneg_int = _int_in(0, None, "a non-negative integer")
_mimic_task = _int_in(-1, 19, "-1 (mortality) or an ICD-9 code index 0..19")


def _positive_float(s: str) -> float:
    """A finite number > 0 (--temperature inf trained to a NaN loss blamed on a small one)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number, got {s!r}")
    return v


def _out_path(s: str) -> str:
    if not s.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return s


def _csv(kind):
    def parse(s: str):
        try:
            return tuple(kind(p) for p in s.split(",") if p.strip())
        except (ValueError, argparse.ArgumentTypeError) as exc:
            msg = f"expected a comma-separated list, got {s!r} ({exc})"
            raise argparse.ArgumentTypeError(msg) from None
    return parse


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic",
                   help="synthetic | npz:PATH (.npz or .pt with x1, x2, y[, split]) | "
                        "multibench:PATH (a MultiBench affect or MIMIC pickle you have)")
    only: dict[str, tuple[str, object, tuple[str, ...]]] = {}

    def data_flag(flag: str, kinds: tuple[str, ...], **kw) -> None:
        """A flag that only the datasets ``kinds`` use; given with another dataset it is refused
        (``_check_dataset_flags``) rather than silently ignored."""
        action = g.add_argument(flag, **kw)
        only[action.dest] = (flag, action.default, kinds)

    syn = ("synthetic",)
    data_flag("--n-examples", syn, type=_positive_int, default=d["n_examples"],
              help="synthetic: number of examples (default %(default)s)")
    data_flag("--shared-dim", syn, type=_positive_int, default=10,
              help="synthetic: shared latents")
    data_flag("--unique-dim", syn, type=_positive_int, default=6,
              help="synthetic: unique latents per modality")
    data_flag("--x-dim", syn, type=_positive_int, default=100,
              help="synthetic: features per modality")
    data_flag("--label-fn", syn, choices=("linear", "nonlinear"), default="linear",
              help="synthetic: label function")
    data_flag("--label-parts", syn, type=_csv(str), default=("shared", "unique1", "unique2"),
              help="synthetic: latent parts the label depends on (default all three)")
    data_flag("--noise", syn, type=float, default=0.1, help="synthetic: observation noise std")
    data_flag("--projection", syn, choices=("uniform", "gaussian"), default="uniform",
              help="synthetic: random projection entries U[0, 1] as in the authors' "
                   "generator (default), or N(0, 1/k) (no preferred direction)")
    data_flag("--modalities", ("multibench",), type=_csv(str), default=("text", "vision"),
              help="multibench affect: the two modalities (default text,vision)")
    data_flag("--task", ("multibench",), type=_mimic_task, default=-1,
              help="multibench MIMIC: -1 mortality (6 classes), 0..19 an ICD-9 code")
    data_flag("--test-fraction", ("synthetic", "npz", "pt"), type=float, default=0.2,
              help="synthetic, or npz/pt without a split key: held-out fraction "
                   "(default %(default)s)")
    p.set_defaults(dataset_only_flags=only)


def _add_training_flags(p: argparse.ArgumentParser, compare: bool = False) -> None:
    from .models import BACKBONES, MODELS, SETTING_USERS

    d = DEFAULTS
    _add_data_flags(p)
    only: dict[str, tuple[str, object, tuple[str, ...]]] = {}

    def model_flag(g, flag: str, **kw) -> None:
        """A flag that only some models use (``models.SETTING_USERS``); given (with another value
        than its default) for other models only, it is refused (``_check_model_flags``) rather
        than ignored."""
        action = g.add_argument(flag, **kw)
        if isinstance(action, argparse.BooleanOptionalAction) and action.default is True:
            flag = "--no-" + flag[2:]  # the form that changes the default
        only[action.dest] = (flag, action.default, SETTING_USERS[action.dest])

    p.set_defaults(model_only_flags=only)
    g = p.add_argument_group("model")
    if not compare:
        g.add_argument("--model", choices=MODELS, default="factorcl-ssl")
    g.add_argument("--embed-dim", type=_positive_int, default=d["embed_dim"])
    g.add_argument("--backbone", choices=BACKBONES, default="auto",
                   help="sequence model (auto: gru); vector inputs always get an MLP")
    g.add_argument("--backbone-hidden", type=_positive_int, default=d["backbone_hidden"])
    g.add_argument("--backbone-layers", type=_nonneg_int, default=d["backbone_layers"])
    model_flag(g, "--critic-hidden", type=_positive_int, default=d["critic_hidden"],
               help="concat critics' width H (the paper: 512; default %(default)s for speed)")
    model_flag(g, "--critic-layers", type=_nonneg_int, default=d["critic_layers"],
               help="concat critics' hidden layers L")
    model_flag(g, "--temperature", type=_positive_float, default=0.07,
               help="SimCLR / SupCon temperature")
    model_flag(g, "--normalize-projections", action=argparse.BooleanOptionalAction,
               default=True,
               help="SimCLR / SupCon: L2-normalise the projections before the loss, as SimCLR "
                    "and SupCon define it (default); --no-normalize-projections feeds them "
                    "unnormalised, as the FactorCL authors' baseline code does")
    g.add_argument("--backend", default="auto",
                   choices=("auto", "cpu", "triton", "cuda", "reference"),
                   help="critic backend (auto: fused cpu on CPU, cuda/triton on GPU)")
    g.add_argument("--deterministic", action="store_true",
                   help="bit-identical runs on GPUs: the critic kernels' deterministic path "
                        "(Triton: no float32 atomics, a slower backward) and PyTorch's "
                        "deterministic algorithms; on the CPU the run already is")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=d["epochs"])
    g.add_argument("--batch-size", type=_positive_int, default=d["batch_size"],
                   help="global batch (split over torchrun processes)")
    g.add_argument("--lr", type=_positive_float, default=d["lr"])
    model_flag(g, "--club-lr", type=_positive_float, default=None,
               help="NCE-CLUB critics' learning rate (default: --lr)")
    model_flag(g, "--num-club-iter", type=_nonneg_int, default=1)
    model_flag(g, "--aug-noise", type=float, default=0.1,
               help="SSL augmentation noise std, in units of each feature's std (>= 0)")
    model_flag(g, "--aug-drop", type=float, default=0.2,
               help="SSL feature-drop probability, in [0, 1)")
    model_flag(g, "--augmentations", type=_csv(str), default=None,
               help="SSL view augmentations, comma-separated (vectors: noise, drop, "
                    "half_swap, identity; sequences: time_permute, time_drop, noise; "
                    "default: all that apply)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:k]")
    g.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="bfloat16 autocast (GPU only; auto: on for CUDA)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g.add_argument("--checkpoint-every", type=_nonneg_int, default=100,
                   help="steps between checkpoints (0: only at the end and on Ctrl-C)")
    g.add_argument("--log-every", type=_positive_int, default=10)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    if not compare:  # compare's table is the probe accuracy
        g.add_argument("--no-probe", action="store_true",
                       help="skip the linear probe at the end")
    g.add_argument("--mi-probe-steps", type=_nonneg_int, default=0,
                   help="also estimate I(S1;S2), I(U1;U2) with an InfoNCE critic (steps)")
    g.add_argument("--out", type=_out_path, required=True, help="output directory")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run(s) already in --out instead of refusing (train) or "
                        "continuing them (compare)")


def _train_config(args, model: str, seed: int):
    from .models import ModelConfig
    from .train import TrainConfig

    mc = ModelConfig(embed_dim=args.embed_dim, backbone=args.backbone,
                     backbone_hidden=args.backbone_hidden, backbone_layers=args.backbone_layers,
                     critic_hidden=args.critic_hidden, critic_layers=args.critic_layers,
                     temperature=args.temperature,
                     normalize_projections=args.normalize_projections, critic_backend=args.backend,
                     critic_deterministic=args.deterministic)
    return TrainConfig(model=model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       club_lr=args.club_lr, num_club_iter=args.num_club_iter, seed=seed,
                       device=args.device, amp=args.amp, dtype=args.dtype,
                       aug_noise=args.aug_noise, aug_drop=args.aug_drop,
                       augmentations=args.augmentations,
                       checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                       progress=not args.no_progress, probe=not getattr(args, "no_probe", False),
                       mi_probe_steps=args.mi_probe_steps, model_cfg=mc)


def _check_dataset_flags(args) -> None:
    """Refuse a data flag that the chosen --dataset does not use (given with another value than
    its default), instead of training on data the user did not ask for."""
    kind = args.dataset.partition(":")[0]
    for dest, (flag, default, kinds) in args.dataset_only_flags.items():
        if kind not in kinds and getattr(args, dest) != default:
            raise _usage(f"{flag} applies to --dataset {' / '.join(kinds)} only, not to "
                         f"{args.dataset}")


def _check_model_flags(args, models: Sequence[str]) -> None:
    """Refuse a flag that none of ``models`` uses (given with another value than its default),
    instead of training as if it had not been given."""
    for dest, (flag, default, users) in args.model_only_flags.items():
        if getattr(args, dest) != default and not set(users) & set(models):
            raise _usage(f"{flag} applies to --model {' / '.join(users)} only, not to "
                         f"{', '.join(models)}")


def _load_data(args, seed: int, dtype: str):
    """The dataset of ``args``; a file's features in ``dtype`` (the run's --dtype: float64 data
    keeps its precision for a float64 run)."""
    import torch

    from . import data as D

    _check_dataset_flags(args)
    syn = D.SyntheticConfig(num_examples=args.n_examples, shared_dim=args.shared_dim,
                            unique_dim=args.unique_dim, x_dim=args.x_dim,
                            label_parts=tuple(args.label_parts), label_fn=args.label_fn,
                            noise=args.noise, projection=args.projection,
                            test_fraction=args.test_fraction, seed=seed)
    # a file with a 'split' key refuses a --test-fraction given (other than the default)
    default = args.dataset_only_flags["test_fraction"][1]
    fraction = None if args.test_fraction == default else args.test_fraction
    return D.load_dataset(args.dataset, synthetic=syn, modalities=args.modalities,
                          task=args.task, test_fraction=fraction, seed=seed,
                          dtype=getattr(torch, dtype))


def _preflight(backend: str, device_name: str, deterministic: bool = False) -> str:
    """Resolve the backend and run one tiny critic through it, so that a backend that cannot
    run here fails now, in one line, rather than inside the first training step."""
    import torch

    from factorcl_ext.nn import InfoNCECritic

    from .train import TrainError, resolve_backend, resolve_device

    device = resolve_device(device_name)
    resolved = resolve_backend(backend, device)
    try:
        critic = InfoNCECritic(3, 2, 4, 1, "relu", backend=resolved,
                               deterministic=deterministic).to(device)
        x = torch.randn(3, 3, device=device, requires_grad=True)
        critic(x, torch.randn(3, 2, device=device)).backward()
    except Exception as exc:  # a missing or unimplemented kernel
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainError(f"--backend {backend} ({resolved}) cannot run here: {msg}; try "
                         "--backend reference") from None
    return resolved


def _require_scikit_learn(command: str) -> None:
    """The linear probe's scikit-learn (an optional extra), checked before any data is loaded or
    anything trained: without it the probe failed only after all the training."""
    try:
        import sklearn.linear_model  # noqa: F401
        import sklearn.preprocessing  # noqa: F401
    except ImportError as exc:
        skip = ", or pass --no-probe" if command == "train" else ""
        raise _usage(f"the linear probe needs scikit-learn, which cannot be imported here ({exc}); "
                     f"pip install scikit-learn (or the trainer's extra: pip install "
                     f"'factorcl-ext[train]'){skip}") from None


def _cmd_train(args, log) -> int:
    from .distributed import init_from_env
    from .train import METRICS_FILE, resolve_device, train

    _check_model_flags(args, [args.model])
    if not args.no_probe:
        _require_scikit_learn("train")
    _preflight(args.backend, args.device, args.deterministic)
    device = resolve_device(args.device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # one GPU per torchrun process
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        device = resolve_device(args.device)
        import torch

        torch.cuda.set_device(device)
    comm = init_from_env(device)
    data = _load_data(args, args.seed, args.dtype)
    cfg = _train_config(args, args.model, args.seed)
    try:
        res = train(cfg, data, args.out, resume=args.resume, overwrite=args.overwrite, comm=comm,
                    log=log)
    finally:
        if comm.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if res["interrupted"]:
        if comm.is_main and res.get("interrupted_in") == "evaluation":
            print(f"factorcl train: interrupted in the final evaluation; the trained model's "
                  f"checkpoint (step {res['steps']}/{res['total_steps']}) is kept at "
                  f"{res['checkpoint']}; evaluate it with the same command and --resume "
                  f"{res['checkpoint']} (nothing is trained again)", file=sys.stderr)
        elif comm.is_main:
            print(f"factorcl train: interrupted at step {res['steps']}/{res['total_steps']}; "
                  f"checkpoint saved to {res['checkpoint']} (continue with --resume "
                  f"{res['checkpoint']})", file=sys.stderr)
        return EXIT_INTERRUPTED
    if comm.is_main:
        done = (f"[train] {res['steps']} steps in {res['seconds']:.1f} s "
                f"({res['samples_per_second']:.0f} samples/s, backend {res['backend']}); "
                f"final loss {res['final_loss']:.4g}")
        metrics = os.path.join(args.out, METRICS_FILE)
        if "probe_accuracy" in res:
            acc = ", ".join(f"{k} {100 * v:.1f}%" for k, v in res["accuracies"].items())
            log(f"{done}; linear probe: {acc}; metrics in {metrics}")
        else:
            log(f"{done}; no linear probe (--no-probe); metrics in {metrics}, checkpoint "
                f"{res['checkpoint']}")
    return 0


def _cmd_compare(args, log) -> int:
    from .compare import compare
    from .models import MODELS

    if not args.models:  # "" or ",": an empty shell variable (--seeds takes one or more)
        raise _usage("--models must name at least one, got an empty list")
    for m in args.models:
        if m not in MODELS:
            raise _usage(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
    for name, values in (("--models", args.models), ("--seeds", args.seeds)):
        repeated = sorted({v for v in values if list(values).count(v) > 1})
        if repeated:
            raise _usage(f"{name} repeats {', '.join(map(str, repeated))}: each is run once")
    _check_dataset_flags(args)  # before any run (the data itself loads per seed)
    _check_model_flags(args, args.models)
    _require_scikit_learn("compare")  # the table is the probe's (matplotlib: see compare)
    _preflight(args.backend, args.device, args.deterministic)
    cfg = _train_config(args, args.models[0], args.seeds[0])
    cfg.validate()  # before --out is created
    if args.dataset != "synthetic":
        _load_data(args, args.seeds[0], args.dtype)  # fail early on unusable data
    res = compare(cfg, lambda seed: _load_data(args, seed, args.dtype), args.out,
                  models=args.models, seeds=args.seeds, log=log, overwrite=args.overwrite)
    if res.get("interrupted"):
        print(f"factorcl compare: interrupted; the last run's checkpoint is {res['checkpoint']}; "
              "run the same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(res["table"])
    chart = ", compare.png" if os.path.exists(os.path.join(args.out, "compare.png")) else ""
    log(f"[compare] wrote {os.path.join(args.out, 'compare.md')}{chart}, compare.json")
    return 0


def _cmd_mi_bench(args, log) -> int:
    from .mi_bench import (
        LARGE_BATCH_FILE,
        STAIRCASE_FILE,
        MIBenchConfig,
        check_previous_results,
        run_large_batch,
        run_mi_bench,
    )

    overrides = {k: v for k, v in dict(
        dims=args.dims, levels=args.levels, steps_per_level=args.steps_per_level,
        tail_steps=args.tail_steps, batch=args.batch, hidden=args.hidden, layers=args.layers,
        lr=args.lr, estimators=args.estimators, large_batch_sizes=args.large_batch_sizes,
        large_batch_steps=args.large_batch_steps,
    ).items() if v is not None}
    overrides.update(cubic=args.cubic, backend=args.backend, device=args.device, seed=args.seed)
    cfg = MIBenchConfig.quick(**overrides) if args.quick else MIBenchConfig(**overrides)
    files = (STAIRCASE_FILE,) if args.no_large_batch else (STAIRCASE_FILE, LARGE_BATCH_FILE)
    try:
        cfg.validate()
        if not args.overwrite:  # both files checked before either run starts
            check_previous_results(cfg, args.out, files)
    except ValueError as exc:
        raise _usage(str(exc)) from None
    _preflight(args.backend, args.device)
    kw = dict(log=log, overwrite=args.overwrite, progress=not args.no_progress)
    try:
        out = run_mi_bench(cfg, args.out, **kw)
        log(f"[mi-bench] findings: {json.dumps(out['findings'])}")
        if not args.no_large_batch:
            lb = run_large_batch(cfg, args.out, **kw)
            log(f"[mi-bench] InfoNCE estimate rises with the batch: {lb['rises_with_batch']}")
    except KeyboardInterrupt:
        print(f"factorcl mi-bench: interrupted; the finished dimensions and batch sizes are kept "
              f"in {args.out}: run the same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    log(f"[mi-bench] wrote {args.out}/mi_bench.json, mi_bench.png"
        + ("" if args.no_large_batch else ", mi_large_batch.json, mi_large_batch.png"))
    return 0


def _cmd_embed(args, log) -> int:
    import numpy as np

    from .eval import embed
    from .train import (
        TrainError,
        _data_diff,
        _data_fingerprint,
        load_model,
        make_out_dir,
        write_atomically,
    )

    if not args.out.endswith(".npz"):
        raise _usage(f"--out must name a .npz file, got {args.out!r}")
    if os.path.exists(args.out) and not args.overwrite:
        raise _usage(f"{args.out} exists; pass --overwrite to replace it")
    _check_dataset_flags(args)
    model, info = load_model(args.run, device=args.device, what="run")
    cfg, trained_on = info["config"], info["data"]
    data = _load_data(args, cfg.seed if args.seed is None else args.seed, cfg.dtype)
    shapes = (list(data.x1.shape[1:]), list(data.x2.shape[1:]))
    if shapes != (trained_on["x1"], trained_on["x2"]):
        raise _usage(f"the run was trained on examples of shape x1 {trained_on['x1']}, x2 "
                     f"{trained_on['x2']}; {data.name} has x1 {shapes[0]}, x2 {shapes[1]}")
    if os.path.isdir(args.out):
        raise TrainError(f"--out {args.out}: is a directory; name a .npz file")
    make_out_dir(os.path.dirname(os.path.abspath(args.out)), what=f"--out {args.out}: its folder")
    param = next(model.parameters())
    reps = embed(model, data.x1, data.x2, param.device, param.dtype)
    split = np.zeros(len(data.y), dtype=np.int8)
    split[data.test_idx.numpy()] = 1
    arrays = {k: v.to(param.dtype).numpy() for k, v in reps.items()}
    arrays.update(y=data.y.numpy(), split=split)
    write_atomically(args.out, lambda f: np.savez(f, **arrays))
    if "content_hash" not in trained_on:  # a checkpoint from before data hashes
        which = "the run does not record enough of its data to tell whether it was trained on it"
    elif _data_diff(trained_on, _data_fingerprint(data)) is None:
        which = "the data it was trained on"
    else:
        which = "not the data it was trained on"
    listed = ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items() if k not in ("y", "split"))
    log(f"[embed] {cfg.model} (step {info['step']}) on {data.describe()} ({which}): "
        f"wrote {listed}, y and split (0 train, 1 test) to {args.out}")
    return 0


class _UsageError(Exception):
    pass


def _usage(msg: str) -> _UsageError:
    return _UsageError(msg)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="factorcl", description="Train and evaluate FactorCL on fused critics.")
    sub = p.add_subparsers(dest="command", metavar="{train,compare,embed,mi-bench}",
                           parser_class=_Parser)
    sub.required = True
    p.commands = sub.choices  # name -> subcommand parser (main reports a stray flag there)

    t = sub.add_parser("train", help="train one model",
                       description="Train one model; writes OUT/metrics.json, metrics.jsonl and "
                                   "checkpoint.pt.")
    _add_training_flags(t)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", default=None, metavar="CKPT", help="continue from a checkpoint")

    c = sub.add_parser("compare", help="train the four models and tabulate probe accuracy",
                       description="Train FactorCL-SUP, FactorCL-SSL, SimCLR and SupCon; writes "
                                   "OUT/compare.md, compare.png, compare.json.")
    _add_training_flags(c, compare=True)
    c.add_argument("--models", type=_csv(str), default=("factorcl-sup", "factorcl-ssl", "simclr",
                                                        "supcon"))
    c.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="seeds to average over (e.g. --seeds 0 1 2)")

    e = sub.add_parser("embed", help="write a trained model's representations of a dataset",
                       description="Write the representations a trained run gives every example "
                                   "of a dataset (FactorCL: backbone, S, U1, U2, S+U1+U2, S1, "
                                   "S2; SimCLR/SupCon: backbone, x1, x2), with y and the "
                                   "train/test split, to one .npz file.")
    e.add_argument("run", help="the run's --out directory or its checkpoint.pt")
    _add_data_flags(e)
    e.add_argument("--seed", type=int, default=None,
                   help="data seed (synthetic data, random splits; default: the run's)")
    e.add_argument("--device", default="cpu", help="auto | cpu | cuda[:k] (default cpu)")
    e.add_argument("--out", type=_out_path, required=True, help="output .npz file")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    m = sub.add_parser("mi-bench", help="the Gaussian MI benchmark",
                       description="InfoNCE, CLUB and NCE-CLUB on correlated Gaussians; writes "
                                   "OUT/mi_bench.json, mi_bench.png and the large-batch files.")
    m.add_argument("--out", type=_out_path, required=True)
    m.add_argument("--quick", action="store_true", help="dim 20 and short levels (tens of seconds)")
    m.add_argument("--dims", type=_csv(_positive_int), default=None)
    m.add_argument("--levels", type=_csv(_positive_float), default=None)
    m.add_argument("--steps-per-level", type=_positive_int, default=None)
    m.add_argument("--tail-steps", type=_positive_int, default=None)
    m.add_argument("--batch", type=_positive_int, default=None)
    m.add_argument("--hidden", type=_positive_int, default=None)
    m.add_argument("--layers", type=_nonneg_int, default=None)
    m.add_argument("--lr", type=_positive_float, default=None,
                   help="Adam's step size, at most 1 like the trainer's (default 1e-3)")
    m.add_argument("--estimators", type=_csv(str), default=None,
                   help="comma-separated subset of infonce,club,nce-club")
    m.add_argument("--cubic", action="store_true", help="y -> y^3 (same MI)")
    m.add_argument("--no-large-batch", action="store_true", help="skip the large-batch mode")
    m.add_argument("--large-batch-sizes", type=_csv(_positive_int), default=None)
    m.add_argument("--large-batch-steps", type=_positive_int, default=None)
    m.add_argument("--backend", default="auto",
                   choices=("auto", "cpu", "triton", "cuda", "reference"))
    m.add_argument("--device", default="auto", help="auto | cpu | cuda[:k]")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--overwrite", action="store_true",
                   help="compute everything again, replacing the results in --out (by "
                        "default those of other settings are refused and those of the same "
                        "settings reused)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .data import DataError

    parser = build_parser()
    args, stray = parser.parse_known_args(argv)
    if stray:  # named after the subcommand whose --help lists the flags
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(stray)}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from .train import TrainError

    commands = {"train": _cmd_train, "compare": _cmd_compare, "embed": _cmd_embed,
                "mi-bench": _cmd_mi_bench}
    try:
        with _deterministic_mode(getattr(args, "deterministic", False)):
            return commands[args.command](args, log)
    except (DataError, TrainError, _UsageError) as exc:
        print(f"factorcl {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"factorcl {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


@contextlib.contextmanager
def _deterministic_mode(on: bool):
    """``--deterministic``: besides the critics' own deterministic path (``ModelConfig``),
    PyTorch's deterministic algorithms for the backbones and optimisers, with the fixed cuBLAS
    workspace they need on GPUs (set before the first GPU matrix product). An op that has no
    deterministic implementation warns, naming itself, rather than stopping the run. The
    previous settings come back afterwards (``main`` may run inside a larger program)."""
    if not on:
        yield
        return
    import torch

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


if __name__ == "__main__":
    sys.exit(main())
