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
from typing import Callable, Sequence

from . import data as D
from .models import MODELS
from .train import METRICS_FILE, TrainConfig, make_out_dir, previous_run, train

__all__ = ["compare", "markdown_table", "bar_chart"]

_LABELS = {"factorcl-sup": "FactorCL-SUP", "factorcl-ssl": "FactorCL-SSL", "simclr": "SimCLR",
           "supcon": "SupCon"}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def compare(cfg: TrainConfig, make_data: Callable[[int], D.PairedData], out_dir: str,
            models: Sequence[str] = MODELS, seeds: Sequence[int] = (0,), log=print,
            overwrite: bool = False) -> dict:
    """Train every model in ``models`` for every seed (``make_data(seed)`` gives that seed's data)
    with the settings of ``cfg``; returns and writes the summary. The runs already in ``out_dir``
    with the same settings are reused (finished) or continued (interrupted) unless
    ``overwrite``; a run there with other settings is an error."""
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
            "backend": rs[0]["backend"], "chance_accuracy": rs[0]["chance_accuracy"],
        }
    summary["table"] = markdown_table(summary)
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(summary["table"] + "\n")
    bar_chart(summary, os.path.join(out_dir, "compare.png"))
    return summary


def markdown_table(summary: dict) -> str:
    seeds = summary["seeds"]
    plural = "s" if len(seeds) > 1 else ""
    head = (f"| model | linear probe, backbone (%, {len(seeds)} seed{plural}) "
            "| other representations (%) | steps | train s | backend |")
    lines = [head, "|---|---|---|---|---|---|"]
    for m in summary["models"].values():
        acc = f"{100 * m['probe_accuracy']:.1f}"
        if len(seeds) > 1:
            acc += f" ± {100 * m['probe_accuracy_std']:.1f}"
        parts = " · ".join(f"{k} {100 * v[0]:.1f}" for k, v in m["parts"].items())
        lines.append(f"| {m['label']} | {acc} | {parts} | {m['steps']} | {m['seconds']:.0f} | "
                     f"{m['backend']} |")
    return "\n".join(lines)


def bar_chart(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = list(summary["models"].values())
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    xs = range(len(ms))
    ax.bar(xs, [100 * m["probe_accuracy"] for m in ms],
           yerr=[100 * m["probe_accuracy_std"] for m in ms], capsize=4,
           color=["#3b6ea8", "#6d9fd6", "#c27c3a", "#e0a96d"][:len(ms)])
    chance = 100 * ms[0]["chance_accuracy"]
    ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.0f}%)")
    ax.set_xticks(list(xs), [m["label"] for m in ms])
    lo = min(100 * m["probe_accuracy"] - 100 * m["probe_accuracy_std"] for m in ms)
    ax.set_ylim(max(0.0, min(chance, lo) - 5), 100)
    ax.set_ylabel("linear-probe test accuracy (%)")
    n = len(summary["seeds"])
    ax.set_title(f"Linear probe on frozen representations ({n} seed{'s' if n > 1 else ''})")
    ax.legend(loc="lower right", fontsize=8)
    for x, m in zip(xs, ms):
        ax.text(x, 100 * m["probe_accuracy"] + 0.5, f"{100 * m['probe_accuracy']:.1f}",
                ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
