"""What a post-hoc sweep leaves in ``OUTPUT_DIR/posthoc``: the table, ``results.json`` and
the plot of AP against EMA length (the chosen length marked), for ``d2ema posthoc --eval``
and for the selection at the end of training (``MODEL_EMA.POSTHOC.SELECT``) alike.

Rows are dicts: ``target`` (a label), ``kind`` (``sigma_rel``, ``decay``, ``raw``), ``value``,
``sigma_rel``, ``misfit``, ``l1``, ``snapshots`` and, once evaluated, ``AP`` and ``AP50``.
Every file is written atomically (`d2ema.io.atomic`).

Example::

    rows = [fit_row(f) | result_metrics(results) for f, results in scored]
    print("\n".join(table(rows, evaluated=True)))
    write_results(out / "posthoc", {"step": 800, "rows": rows}, rows, title="run", chosen=best)
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from d2ema.errors import UsageError
from d2ema.io.atomic import atomic_write_bytes, atomic_write_text
from d2ema.posthoc import Fit

__all__ = [
    "LEGEND",
    "fit_row",
    "plot_ap_vs_length",
    "primary_ap",
    "result_metrics",
    "table",
    "write_results",
]


RESULTS, PLOT, TABLE = "results.json", "ap_vs_length.png", "table.txt"


LEGEND = ("misfit: how far the snapshots' combination is from the target's averaging profile "
          "(relative error); sum|x|: the sum of the combination's absolute weights, how much "
          "it amplifies the snapshots' rounding (1 for a snapshot or a plain average; large: "
          "less exact)")


_RAW_STYLE: dict[str, Any] = {"color": "0.35", "linestyle": "--"}


_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def primary_ap(results: Mapping[str, Any]) -> float:
    """The headline AP of detectron2 results: ``bbox/AP``, else the first task's ``AP``; NaN
    (COCO's "no detections") counts as 0."""
    tasks = [results["bbox"]] if "bbox" in results else list(results.values())
    for task in tasks:
        if isinstance(task, Mapping) and "AP" in task:
            ap = float(task["AP"])
            return 0.0 if math.isnan(ap) else ap
    raise UsageError(f"the evaluation gave no AP (results: {sorted(results)}); d2ema posthoc "
                     "--eval needs a detection or segmentation test set")


def fit_row(fit: Fit) -> dict[str, Any]:
    """The table row of one fitted target (before evaluation)."""
    return {"target": fit.target.label, "kind": fit.target.kind, "value": fit.target.value,
            "sigma_rel": fit.sigma_rel, "misfit": fit.residual, "l1": fit.l1,
            "snapshots": fit.used}


def result_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """``AP`` (`primary_ap`: bbox AP, else the first task's) and
    ``AP50`` of detectron2 results."""
    box = results.get("bbox", {})
    ap50 = float(box.get("AP50", math.nan)) if isinstance(box, Mapping) else math.nan
    return {"AP": primary_ap(results), "AP50": 0.0 if math.isnan(ap50) else ap50}


def table(rows: Sequence[Mapping[str, Any]], evaluated: bool) -> list[str]:
    """The printed table: one line per row, a header first."""
    head = f"{'EMA':<18}{'~sigma_rel':>11}{'misfit':>9}{'sum|x|':>8}"
    head += f"{'AP':>7}{'AP50':>7}" if evaluated else ""
    lines = [head]
    for r in rows:
        if r["kind"] == "raw":
            line = f"{r['target']:<18}{'':>11}{'':>9}{'':>8}"
        else:
            line = (f"{r['target']:<18}{r['sigma_rel']:>11.3f}{r['misfit']:>9.2%}"
                    f"{r['l1']:>8.2f}")
        if evaluated:
            line += f"{r.get('AP', math.nan):>7.1f}{r.get('AP50', math.nan):>7.1f}"
        lines.append(line)
    return lines


def write_results(folder: str | os.PathLike[str], data: Mapping[str, Any],
                  rows: Sequence[Mapping[str, Any]], *, title: str = "",
                  chosen: Mapping[str, Any] | None = None, lines: Sequence[str] = ()) -> Path:
    """Write ``results.json`` (``data``), ``table.txt`` (``lines``, if any) and the plot of
    ``rows`` into ``folder``; returns the plot's path."""
    folder = Path(folder)
    atomic_write_text(json.dumps(data, indent=1, default=float) + "\n", folder / RESULTS)
    if lines:
        atomic_write_text("\n".join(lines) + "\n", folder / TABLE)
    return plot_ap_vs_length(rows, folder / PLOT, title=title, chosen=chosen)


def _ticks(ax, xs: Sequence[float]) -> None:
    """Labels at 1-2-5 steps inside the range, as plain numbers; none on the minor ticks (the
    log axis labels them when it spans less than a decade, and they overlap)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    lo, hi = min(xs), max(xs)
    steps = [m * 10.0**e for e in range(-4, 1) for m in (1, 2, 5)]
    major = [s for s in steps if lo / 1.05 <= s <= hi * 1.05] or [lo, hi]
    ax.xaxis.set_major_locator(FixedLocator(major))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_ap_vs_length(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    chosen: Mapping[str, Any] | None = None,
) -> Path:
    """COCO AP against EMA length (``sigma_rel``, log scale) for post-hoc EMAs.

    Power EMAs are joined by a line, constant decays are marked at their width at that step,
    the raw weights are a dashed horizontal line, and ``chosen`` (a row) is ringed. Written
    atomically (PNG, or whatever the suffix names); returns the path.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    power = sorted((r["sigma_rel"], r["AP"]) for r in rows if r["kind"] == "sigma_rel")
    if power:
        xs, curve = zip(*power)
        ax.plot(xs, curve, color=_COLOURS[0], marker="o", label="power EMA (sigma_rel)")
    for colour, r in zip(_COLOURS[1:] * 8, [r for r in rows if r["kind"] == "decay"]):
        ax.plot([r["sigma_rel"]], [r["AP"]], marker="s", linestyle="", color=colour,
                label=f"{r['target']} (~sigma_rel {r['sigma_rel']:.3f})")
    for r in rows:
        if r["kind"] == "raw":
            won = chosen is not None and chosen.get("kind") == "raw"
            ax.axhline(r["AP"], label="chosen: raw weights" if won else "raw weights",
                       **{**_RAW_STYLE, **({"color": "tab:red"} if won else {})})
    if chosen is not None and chosen.get("kind") != "raw":
        ax.plot([chosen["sigma_rel"]], [chosen["AP"]], marker="o", markersize=14,
                markerfacecolor="none", markeredgecolor="tab:red", markeredgewidth=2,
                linestyle="", label=f"chosen: {chosen['target']}")
    ys = [r["AP"] for r in rows if isinstance(r.get("AP"), (int, float))]
    if ys and max(ys) - min(ys) < 1e-6:  # all equal (e.g. no detections): a readable axis
        ax.set_ylim(min(ys) - 1, max(ys) + 1)
    ax.set_xscale("log")
    widths = [r["sigma_rel"] for r in rows if r["kind"] != "raw"]
    if widths:
        _ticks(ax, widths)
    ax.set_xlabel("EMA length: sigma_rel (std of the averaging profile / training length)")
    ax.set_ylabel("COCO AP (%)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(loc="best", fontsize="small")
    if title:
        ax.set_title(title, fontsize="medium")
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png")
    atomic_write_bytes(buffer.getvalue(), path)
    return path
