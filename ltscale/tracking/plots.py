"""Figures for long-tailed results: per-class accuracy against class size, virtual-example counts.

Figures are built as ``matplotlib.figure.Figure`` on an Agg canvas, never through pyplot, so no
global figure registry or GUI backend is involved and nothing is left open after logging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MANY_SHOT_MIN = 100
"""A class with more than this many training examples is many-shot."""
FEW_SHOT_MAX = 20
"""A class with fewer than this many training examples is few-shot; in between is medium-shot."""

SHOT_GROUPS = ("many", "medium", "few")


def shot_group(train_count: int) -> str:
    """``"many"`` (> 100 training examples), ``"medium"`` (20-100) or ``"few"`` (< 20)."""
    if train_count > MANY_SHOT_MIN:
        return "many"
    if train_count < FEW_SHOT_MAX:
        return "few"
    return "medium"


def _new_figure(width: float = 7.0, height: float = 4.5) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _as_counts(class_counts: Sequence[int], name: str = "class_counts") -> np.ndarray:
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {counts.shape}")
    if (counts < 0).any() or not np.isfinite(counts).all():
        raise ValueError(f"{name} must be finite and non-negative")
    return counts


def per_class_accuracy_figure(accuracy: Sequence[float], class_counts: Sequence[int], title: str) -> Figure:
    """Scatter of per-class accuracy against training class size (log x), with shot-group bands.

    Bands: few-shot (< 20), medium-shot (20-100), many-shot (> 100); a horizontal segment over each
    band marks the mean accuracy of its classes. Classes with no training example are drawn at 0.5.
    """
    counts = _as_counts(class_counts)
    values = np.asarray(accuracy, dtype=np.float64)
    if values.shape != counts.shape:
        raise ValueError(f"accuracy has {values.size} entries but class_counts has {counts.size}")
    x = np.maximum(counts, 0.5)  # log axis: an empty class cannot sit at 0
    left, right = x.min() / 1.5, x.max() * 1.5
    edges = {
        "few": (min(left, FEW_SHOT_MAX / 2), FEW_SHOT_MAX),
        "medium": (FEW_SHOT_MAX, MANY_SHOT_MIN),
        "many": (MANY_SHOT_MIN, max(right, MANY_SHOT_MIN * 2)),
    }
    colors = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    groups = np.array([shot_group(int(c)) for c in counts])

    figure = _new_figure()
    axes = figure.add_subplot()
    axes.set_xscale("log")
    for group in SHOT_GROUPS:
        low, high = edges[group]
        members = groups == group
        label = f"{group} ({int(members.sum())} classes"
        if members.any():
            mean = float(values[members].mean())
            axes.hlines(mean, low, high, colors=colors[group], linestyles="--", linewidth=1.5)
            label += f", mean {mean:.3g}"
        axes.axvspan(low, high, color=colors[group], alpha=0.08, label=label + ")")
    axes.scatter(x, values, s=10, c=[colors[g] for g in groups], alpha=0.7, linewidths=0)
    axes.set_xlim(edges["few"][0], edges["many"][1])
    axes.set_xlabel("training examples in class (log scale)")
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.legend(loc="best", fontsize="small")
    axes.grid(True, which="major", alpha=0.3)
    return figure


def virtual_example_figure(
    distributions: Mapping[str, np.ndarray], class_counts: Sequence[int], title: str
) -> Figure:
    """Per-class virtual-example counts for each (T, p) setting next to the input class counts.

    ``distributions`` maps a label such as ``"T=2, p=0.5"`` to per-class counts (same class order as
    ``class_counts``). Classes are sorted by training count, head to tail, on the x axis.
    """
    counts = _as_counts(class_counts)
    if not distributions:
        raise ValueError("distributions is empty: pass at least one (T, p) setting")
    order = np.argsort(-counts, kind="stable")
    series = {"input counts": counts}
    for label, values in distributions.items():
        array = np.asarray(values, dtype=np.float64)
        if array.shape != counts.shape:
            raise ValueError(f"distribution {label!r} has shape {array.shape}, expected {counts.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"distribution {label!r} has non-finite entries")
        series[str(label)] = array

    figure = _new_figure()
    axes = figure.add_subplot()
    rank = np.arange(counts.size)
    for label, values in series.items():
        style = {"color": "black", "linewidth": 2.0} if label == "input counts" else {"linewidth": 1.2}
        axes.plot(rank, values[order], label=label, **style)
    positive = all((values > 0).all() for values in series.values())
    # A zero count cannot be drawn on a log axis; symlog keeps it visible instead of masking it.
    axes.set_yscale("log" if positive else "symlog")
    axes.set_xlabel("class (sorted by training count, head to tail)")
    axes.set_ylabel("examples per class")
    axes.set_title(title)
    axes.legend(loc="best", fontsize="small")
    axes.grid(True, which="major", alpha=0.3)
    return figure
