"""``factorcl compare``: train the four models on one dataset (one or more seeds) and write a
Markdown table (``compare.md``), a bar chart (``compare.png``) and the numbers
(``compare.json``). Re-running the same command continues where it stopped: finished runs are
reused from their ``metrics.json``, an interrupted run resumes from its checkpoint (the result is
an uninterrupted run's); ``overwrite=True`` (``--overwrite``) trains everything again."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
from typing import Callable, Optional, Sequence

from . import data as D
from .models import MODELS
from .train import (
    METRICS_FILE,
    TrainConfig,
    TrainError,
    make_out_dir,
    previous_run,
    train,
    write_atomically,
    write_text_atomically,
)

__all__ = ["compare", "markdown_table", "bar_chart"]

_LABELS = {"factorcl-sup": "FactorCL-SUP", "factorcl-ssl": "FactorCL-SSL", "simclr": "SimCLR",
           "supcon": "SupCon"}


def _mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """The mean and the sample standard deviation; the std is None (``null``) for one value,
    which has none."""
    if len(values) == 1:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values)


def compare(cfg: TrainConfig, make_data: Callable[[int], D.PairedData], out_dir: str,
            models: Sequence[str] = MODELS, seeds: Sequence[int] = (0,), log=print,
            overwrite: bool = False) -> dict:
    """Train every model in ``models`` for every seed (``make_data(seed)`` gives that seed's data)
    with the settings of ``cfg``; returns and writes the summary. The runs already in ``out_dir``
    with the same settings are reused (finished) or continued (interrupted) unless
    ``overwrite``; a run there with other settings is an error. ``cfg.probe`` must be set: the
    summary is the linear probe's accuracy. The chart needs matplotlib: without it
    ``compare.png`` is skipped (an older one removed) and ``log`` says so."""
    if not cfg.probe:
        raise TrainError("compare tabulates the linear probe's accuracy: it needs probe=True "
                         "(the evaluation that probe=False skips)")
    make_out_dir(out_dir)
    if overwrite:  # the old summary goes now: it must not outlive a failed run
        for name in ("compare.json", "compare.md", "compare.png"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(out_dir, name))
    runs: dict[str, list[dict]] = {m: [] for m in models}
    for seed in seeds:
        data = make_data(seed)
        for m in models:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.model, run_cfg.seed = m, seed
            run_dir = os.path.join(out_dir, f"{m}-seed{seed}")
            prior = None if overwrite else previous_run(run_dir, run_cfg, data)
            if prior is not None and prior["metrics"] is not None:
                log(f"[compare] {_LABELS[m]} seed {seed}: finished earlier, reusing "
                    f"{os.path.join(run_dir, METRICS_FILE)}")
                res = prior["metrics"]
            else:
                res = train(run_cfg, data, run_dir, log=log, overwrite=overwrite,
                            resume=prior["checkpoint"] if prior is not None else None)
            if res.get("interrupted"):
                return {"interrupted": True, "checkpoint": res["checkpoint"]}
            res.pop("model_ref", None)
            runs[m].append(res)
            log(f"[compare] {_LABELS[m]} seed {seed}: probe accuracy "
                f"{100 * res['probe_accuracy']:.1f}% ({res['steps']} steps, "
                f"{res['seconds']:.1f} s, backend {res['backend']})")
    summary = {"seeds": list(seeds), "models": {}}
    for m, rs in runs.items():
        acc = [r["probe_accuracy"] for r in rs]
        parts = {}
        for key in rs[0]["accuracies"]:
            if key != "backbone":
                parts[key] = _mean_std([r["accuracies"][key] for r in rs])
        mean, std = _mean_std(acc)
        summary["models"][m] = {
            "label": _LABELS[m], "probe_accuracy": mean, "probe_accuracy_std": std,
            "per_seed": acc, "parts": parts, "steps": rs[0]["steps"],
            "seconds": statistics.fmean(r["seconds"] for r in rs),
            "backend": rs[0]["backend"],
            # each seed has its own data (synthetic data is drawn per seed), so its own chance
            # accuracy: the mean over the seeds, the same for every model (they share the data)
            "chance_accuracy": statistics.fmean(r["chance_accuracy"] for r in rs),
        }
    summary["table"] = markdown_table(summary)
    write_text_atomically(os.path.join(out_dir, "compare.json"), json.dumps(summary, indent=2))
    write_text_atomically(os.path.join(out_dir, "compare.md"), summary["table"] + "\n")
    png = os.path.join(out_dir, "compare.png")
    try:
        bar_chart(summary, png)
    except ImportError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(png)  # an older chart would not show these numbers
        log(f"[compare] warning: no compare.png: the chart needs matplotlib, which cannot be "
            f"imported here ({exc}); pip install matplotlib (or the trainer's extra: pip install "
            f"'factorcl-ext[train]') and run the same command again to draw it")
    return summary


def markdown_table(summary: dict) -> str:
    seeds = summary["seeds"]
    plural = "s" if len(seeds) > 1 else ""
    head = (f"| model | linear probe, backbone (%, {len(seeds)} seed{plural}) "
            "| other representations (%) | steps | train s | backend |")
    lines = [head, "|---|---|---|---|---|---|"]
    for m in summary["models"].values():
        acc = f"{100 * m['probe_accuracy']:.1f}"
        if m["probe_accuracy_std"] is not None:  # None for one seed
            acc += f" ± {100 * m['probe_accuracy_std']:.1f}"
        parts = " · ".join(f"{k} {100 * v[0]:.1f}" for k, v in m["parts"].items())
        lines.append(f"| {m['label']} | {acc} | {parts} | {m['steps']} | {m['seconds']:.0f} | "
                     f"{m['backend']} |")
    return "\n".join(lines)


def bar_chart(summary: dict, path: str) -> None:
    """The probe accuracies as a bar chart (error bars: the std over seeds, none for one seed),
    written to ``path`` atomically. Drawn on its own Agg canvas: pyplot's figures and the
    caller's matplotlib backend are left as they were. An ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ms = list(summary["models"].values())
    acc = [100 * m["probe_accuracy"] for m in ms]
    std = [None if m["probe_accuracy_std"] is None else 100 * m["probe_accuracy_std"]
           for m in ms]
    fig = Figure(figsize=(6, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = range(len(ms))
    yerr = None if all(s is None for s in std) else [s or 0.0 for s in std]
    ax.bar(xs, acc, yerr=yerr, capsize=4,
           color=["#3b6ea8", "#6d9fd6", "#c27c3a", "#e0a96d"][:len(ms)])
    # the same for every model (the mean over the seeds' data, which all models share)
    chance = 100 * ms[0]["chance_accuracy"]
    ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.0f}%)")
    ax.set_xticks(list(xs), [m["label"] for m in ms])
    lo = min(a - (s or 0.0) for a, s in zip(acc, std))
    ax.set_ylim(max(0.0, min(chance, lo) - 5), 100)
    ax.set_ylabel("linear-probe test accuracy (%)")
    n = len(summary["seeds"])
    ax.set_title(f"Linear probe on frozen representations ({n} seed{'s' if n > 1 else ''})")
    ax.legend(loc="lower right", fontsize=8)
    for x, a in zip(xs, acc):
        ax.text(x, a + 0.5, f"{a:.1f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png"))
