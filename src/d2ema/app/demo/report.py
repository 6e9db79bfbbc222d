"""What a demo run reports: progress lines, the history of evaluations, the result table and
``results.json``."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from d2ema.app.demo.options import METRICS, RAW, DemoOptions, DemoPreset, ema_sources
from d2ema.io.atomic import atomic_write_text

__all__ = ["DemoResult", "RunLog", "duration", "summary_lines", "write_json"]


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _number(x: Any) -> float:
    """A COCO AP in %; detectron2 reports NaN when the model made no detections: that is 0."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if math.isnan(x) else x


class RunLog:
    """State shared by the trainer's hooks: printing, eval timing, the history of results."""

    def __init__(self, options: DemoOptions, preset: DemoPreset, decays, stream: TextIO,
                 num_val: int):
        self.options, self.preset, self.decays, self.stream = options, preset, decays, stream
        self.num_val = num_val
        self.sources = {RAW: "bbox", **{label: f"{prefix}/bbox" for label, prefix
                                        in ema_sources(preset, decays).items()}}
        self.labels = list(self.sources)
        self.history: list[dict[str, Any]] = []
        self.eval_seconds = 0.0
        self.eval_durations: list[float] = []
        self.train_started = time.perf_counter()
        self.print_period = _print_period(preset.iters)

    def say(self, line: str) -> None:
        print(f"[d2ema demo] {line}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def quiet_stdout(self) -> Iterator[None]:
        """pycocotools prints its summaries; keep them out of the console (not of log.txt)."""
        if self.options.verbose:
            yield
            return
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            yield
        logging.getLogger("d2ema.demo").info("COCO evaluation output:\n%s", buffer.getvalue())

    def eval_points(self) -> list[int]:
        p, n = self.preset.eval_period, self.preset.iters
        points = list(range(p, n, p)) if p > 0 else []
        return [*points, n]

    def remaining_evals(self, it: int) -> int:
        return sum(1 for p in self.eval_points() if p > it)

    def eval_estimate(self) -> float:
        if self.eval_durations:
            return self.eval_durations[-1]
        return 0.06 * self.num_val * len(self.labels)  # ~2 cores, until measured

    def record(self, it: int, results: dict[str, Any], seconds: float) -> None:
        self.eval_seconds += seconds
        self.eval_durations.append(seconds)
        for label, key in self.sources.items():
            box = results.get(key, {})
            self.history.append(
                {"iter": it, "weights": label, **{m: _number(box.get(m)) for m in METRICS}}
            )
        self.say(f"eval at iter {it}: {self._ap_text(it)}  ({duration(seconds)})")

    def _ap_text(self, it: int) -> str:
        rows = [r for r in self.history if r["iter"] == it]
        return "  ".join(f"{r['weights']} AP {r['AP']:.1f}" for r in rows)

    def latest_ap(self) -> str:
        if not self.history:
            return ""
        it = self.history[-1]["iter"]
        return f"  | AP@{it}: " + ", ".join(
            f"{r['weights']} {r['AP']:.1f}" for r in self.history if r["iter"] == it
        )


def _print_period(iters: int) -> int:
    raw = max(iters / 10, 1)
    for nice in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000):
        if nice >= raw:
            return nice
    return int(raw)


@dataclasses.dataclass
class DemoResult:
    """What a demo run produced: every evaluation, and where its files are."""

    history: list[dict[str, Any]]
    labels: list[str]
    output_dir: Path
    plot: Path
    results_json: Path
    checkpoint: Path | None
    seconds: float
    train_seconds: float
    eval_seconds: float
    settings: dict[str, Any]

    def final(self) -> dict[str, dict[str, float]]:
        """Metrics of each weights at the last evaluation."""
        last = max(r["iter"] for r in self.history)
        return {r["weights"]: r for r in self.history if r["iter"] == last}

    def best(self) -> dict[str, tuple[float, int]]:
        """Best AP of each weights over the run, and its iteration."""
        out: dict[str, tuple[float, int]] = {}
        for r in self.history:
            ap = r["AP"]
            if not math.isnan(ap) and (r["weights"] not in out or ap > out[r["weights"]][0]):
                out[r["weights"]] = (ap, r["iter"])
        return out

    def table(self) -> str:
        """Raw vs each EMA at the final evaluation (COCO AP, %), plus each one's best AP."""
        final, best = self.final(), self.best()
        last = max(r["iter"] for r in self.history)
        raw_ap = final.get(RAW, {}).get("AP", float("nan"))
        width = max(12, *(len(label) + 1 for label in self.labels))
        header = (f"{'weights':<{width}}{'AP':>7}{'AP50':>7}{'AP75':>7}{'vs raw':>8}   "
                  f"best AP (iter)")
        lines = [f"COCO box AP (%) on the validation set at iteration {last}:", header,
                 "-" * len(header)]
        for label in self.labels:
            row = final.get(label)
            if row is None:
                continue
            gain = "" if label == RAW else f"{row['AP'] - raw_ap:+.1f}"
            b_ap, b_it = best.get(label, (float("nan"), 0))
            lines.append(
                f"{label:<{width}}{row['AP']:>7.1f}{row['AP50']:>7.1f}{row['AP75']:>7.1f}"
                f"{gain:>8}   {b_ap:.1f} ({b_it})"
            )
        decays = self.settings.get("decays", [])
        if decays:
            spans = ", ".join(f"{d:g}: ~{round(1 / (1 - d))}" for d in decays)
            lines.append(
                f"An EMA with decay d averages about the last 1/(1-d) iterations ({spans} of "
                f"{last}); one that spans much of a run lags while AP still rises. A power EMA "
                f"(sigma_rel) averages a share of the run as it goes, the setting "
                f"docs/ema-length.md recommends."
            )
        return "\n".join(lines)


def write_json(result: DemoResult) -> None:
    data = {
        "settings": result.settings,
        "history": result.history,
        "seconds": {"total": result.seconds, "train": result.train_seconds,
                    "eval": result.eval_seconds},
    }
    atomic_write_text(json.dumps(data, indent=1, allow_nan=True) + "\n", result.results_json)


def summary_lines(result: DemoResult) -> list[str]:
    """What ``d2ema demo`` prints at the end: the table and where every output is."""
    out = result.output_dir
    lines = [
        "",
        result.table(),
        "",
        f"plot:        {result.plot}",
        f"TensorBoard: tensorboard --logdir {out}   (scalars bbox/AP, ema_sigma0.05/bbox/AP, "
        "ema_<decay>/bbox/AP)",
        f"results:     {result.results_json}",
        f"full log:    {out / 'log.txt'}",
    ]
    if result.checkpoint is not None:
        lines.append(f"checkpoint:  {result.checkpoint}   (EMA as plain weights: d2ema export "
                     f"{result.checkpoint} -o {out / 'model_ema.pth'})")
    lines.append(f"took {duration(result.seconds)} (training {duration(result.train_seconds)}, "
                 f"evaluation {duration(result.eval_seconds)})")
    return lines
