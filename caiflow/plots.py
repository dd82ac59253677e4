"""Pictures of an evaluation, as PNG files: what people would rather look at than read.

- rewards.png: the reward model's score distributions per stage (before vs after training);
- refusal.png: refusal of harmful prompts and over-refusal of benign ones per stage, with their
  Wilson 95% intervals;
- rl.png: RL reward, KL and completion length over the optimiser steps;
- elo.png: Elo ratings per stage with their 95% bootstrap intervals.

Matplotlib's Agg backend draws without a display. Each function takes plain numbers (the
evaluate step's metrics) and returns the file it wrote, or None when there is nothing to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

COLOURS = {"base": "#7f7f7f", "prompted": "#2ca02c", "sl": "#1f77b4", "rl": "#d62728"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def rewards_plot(rewards: dict[str, np.ndarray], kinds: np.ndarray, path: Path) -> Path | None:
    """Histograms of each stage's reward on red-team and on benign prompts."""
    if not rewards:
        return None
    plt = _pyplot()
    panels = [(k, kinds == k) for k in ("red-team", "benign") if (kinds == k).any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False)
    values = np.concatenate([np.asarray(v, dtype=float) for v in rewards.values()])
    edges = np.linspace(values.min(), values.max() + 1e-9, 21)
    for ax, (kind, mask) in zip(axes[0], panels):
        for stage, scores in rewards.items():
            ax.hist(
                np.asarray(scores)[mask],
                bins=edges,
                histtype="step",
                linewidth=2,
                color=COLOURS.get(stage),
                label=f"{stage} (mean {np.asarray(scores)[mask].mean():+.2f})",
            )
        ax.set_title(f"reward on {kind} prompts")
        ax.set_xlabel("reward-model score")
        ax.set_ylabel("answers")
        ax.legend(fontsize=8)
    return _save(fig, path)


def refusal_plot(refusal: dict[str, dict[str, dict[str, Any]]], path: Path) -> Path | None:
    """Refusal rate per stage on red-team, benign and look-alike prompts, with 95% intervals."""
    groups = [
        ("red_team", "refuses harmful"),
        ("benign", "refuses benign"),
        ("lookalike", "refuses look-alikes"),
    ]
    groups = [(k, label) for k, label in groups if any(refusal[s].get(k, {}).get("n") for s in refusal)]
    if not groups:
        return None
    plt = _pyplot()
    stages = list(refusal)
    width = 0.8 / len(stages)
    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(groups), 3.4))
    for j, stage in enumerate(stages):
        xs, ys, lo, hi = [], [], [], []
        for i, (key, _) in enumerate(groups):
            r = refusal[stage].get(key) or {}
            if not r.get("n"):
                continue
            xs.append(i + (j - (len(stages) - 1) / 2) * width)
            ys.append(100 * r["rate"])
            lo.append(100 * max(0.0, r["rate"] - r["lo"]))
            hi.append(100 * max(0.0, r["hi"] - r["rate"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=COLOURS.get(stage), label=stage)
    ax.set_xticks(range(len(groups)), [label for _, label in groups])
    ax.set_ylabel("% of answers that refuse")
    ax.set_ylim(0, 100)
    ax.set_title("refusal with Wilson 95% intervals")
    ax.legend(fontsize=8)
    return _save(fig, path)


def rl_plot(history: list[dict[str, Any]], path: Path) -> Path | None:
    """RL reward, KL to the SL model and completion length per logged step."""
    history = [h for h in history or [] if h.get("step") is not None]
    if not history:
        return None
    plt = _pyplot()
    steps = [h["step"] for h in history]
    series = [
        ("reward", "mean reward"),
        ("kl", "KL to the SL model"),
        ("completion_length", "completion tokens"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (key, title) in zip(axes, series):
        ys = [np.nan if h.get(key) is None else h[key] for h in history]
        ax.plot(steps, ys, marker="o", markersize=3, color=COLOURS["rl"])
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
    return _save(fig, path)


def elo_plot(elo: dict[str, dict[str, dict[str, float]]], path: Path) -> Path | None:
    """Elo rating per stage and dimension with its 95% bootstrap interval."""
    if not elo:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(elo), figsize=(4.2 * len(elo), 3.2), squeeze=False)
    for ax, (dim, ratings) in zip(axes[0], elo.items()):
        stages = [s for s in COLOURS if s in ratings] + sorted(set(ratings) - set(COLOURS))
        ys = [ratings[s]["rating"] for s in stages]
        # a bootstrap interval need not hold the point estimate: no negative error bars
        err = [
            [max(0.0, ratings[s]["rating"] - ratings[s]["lo"]) for s in stages],
            [max(0.0, ratings[s]["hi"] - ratings[s]["rating"]) for s in stages],
        ]
        ax.bar(stages, ys, yerr=err, capsize=4, color=[COLOURS.get(s, "#444444") for s in stages])
        ax.axhline(1000, color="black", linewidth=0.8, linestyle=":")
        ax.set_ylim(min(r["lo"] for r in ratings.values()) - 20, max(r["hi"] for r in ratings.values()) + 20)
        ax.set_title(f"Elo, {dim}")
    return _save(fig, path)
