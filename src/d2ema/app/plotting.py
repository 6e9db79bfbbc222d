"""Plots of evaluation curves: AP over iterations for the raw weights and each EMA, and AP
against EMA length for post-hoc EMAs.

Uses matplotlib's object API (no ``pyplot``), so it needs no display and changes no global
backend setting.

Example::

    history = [{"iter": 200, "weights": "raw", "AP": 12.0, "AP50": 30.1}, ...]
    plot_ap_curves(history, "output/ap.png", title="RetinaNet on shapes")
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["plot_ap_curves", "plot_ap_vs_length"]

_RAW_STYLE = {"color": "0.35", "linestyle": "--", "marker": "o"}
_EMA_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _series(history: Iterable[Mapping[str, Any]], metric: str) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for row in history:
        value = row.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        out.setdefault(str(row["weights"]), []).append((int(row["iter"]), float(value)))
    return {k: sorted(v) for k, v in out.items()}


def plot_ap_curves(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    metrics: Sequence[str] = ("AP", "AP50"),
    title: str = "",
    raw_label: str = "raw",
) -> str:
    """Draw one panel per metric (x: iteration, y: COCO AP in %), one line per weights.

    ``history`` rows hold ``iter``, ``weights`` (a label such as ``"raw"`` or ``"EMA 0.99"``)
    and the metrics. The raw weights are drawn dashed grey, each EMA in colour. Returns the
    path written (PNG, or whatever the suffix names).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(metrics), 4.0), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        series = _series(history, metric)
        colours = iter(_EMA_COLOURS * 4)
        for label, points in series.items():
            xs, ys = zip(*points)
            style = _RAW_STYLE if label == raw_label else {"color": next(colours), "marker": "."}
            ax.plot(xs, ys, label=label, linewidth=1.8, **style)
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"COCO {metric} (%)")
        ax.set_title(metric)
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(loc="best")
    if title:
        fig.suptitle(title)
    path = os.fspath(path)
    fig.savefig(path)
    return path


def plot_ap_vs_length(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    chosen: Mapping[str, Any] | None = None,
) -> str:
    """COCO AP against EMA length for post-hoc EMAs: see
    `d2ema.d2.evaluation.report.plot_ap_vs_length` (shared with the end-of-training
    selection); returns the path written."""
    from d2ema.d2.evaluation.report import plot_ap_vs_length as plot

    return os.fspath(plot(rows, path, title=title, chosen=chosen))
