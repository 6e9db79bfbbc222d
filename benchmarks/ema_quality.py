"""Does the EMA beat the raw weights? COCO box AP of raw vs EMA weights during training.

Trains the demo's ResNet-18 FPN RetinaNet from scratch on the embedded datasets (CPU), once per
configuration, and scores the raw weights and an EMA per decay at every evaluation
(:func:`d2ema.app.demo.run_demo`; all EMAs of a run see the same raw trajectory). Configurations:

* ``shapes`` and ``digits``;
* a constant learning rate after warm-up (the regime where EMA matters most: SGD noise is never
  annealed away) and one with two LR steps (x0.1 at 60% and 85% of training);
* the YOLOv5 decay ramp ``d * (1 - exp(-n / tau))`` on, and off (constant decay), on shapes.

Writes ``benchmarks/results/ema_quality.md`` (a table per run and a summary of EMA - raw at
each evaluation after warm-up) and ``benchmarks/results/ema_quality.png``. Reported as measured,
whatever it shows. Takes about half an hour on 2 cores at the default size::

    .venv/bin/python benchmarks/ema_quality.py            # or: --iters 200 --quick-check
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from d2ema.app.demo import DemoOptions, run_demo
from d2ema.app.demo.options import RAW

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    dataset: str
    lr_steps: bool
    ramp: bool


RUNS = (
    Run("shapes, constant LR, yolov5 ramp", "shapes", lr_steps=False, ramp=True),
    Run("shapes, constant LR, constant decay", "shapes", lr_steps=False, ramp=False),
    Run("shapes, LR steps, yolov5 ramp", "shapes", lr_steps=True, ramp=True),
    Run("digits, constant LR, yolov5 ramp", "digits", lr_steps=False, ramp=True),
    Run("digits, LR steps, yolov5 ramp", "digits", lr_steps=True, ramp=True),
)
DEFAULT_RUNS = "1,2,3,4"  # run 5 too with --runs 1,2,3,4,5


def options_for(run: Run, iters: int, evals: int, decays, output: Path, seed: int) -> DemoOptions:
    opts = []
    if run.lr_steps:
        steps = f"({int(iters * 0.6)}, {int(iters * 0.85)})"
        opts += ["SOLVER.STEPS", steps, "SOLVER.GAMMA", "0.1"]
    if not run.ramp:
        opts += ["MODEL_EMA.SCHEDULE", "constant"]
    return DemoOptions(
        dataset=run.dataset,
        iters=iters,
        eval_period=max(1, iters // evals),
        output=output,
        seed=seed,
        decays=decays,
        opts=tuple(opts),
    )


@dataclasses.dataclass
class SavedRun:
    """A finished run read back from its ``results.json`` (what ``run_demo`` writes)."""

    history: list
    labels: list
    settings: dict
    train_seconds: float
    eval_seconds: float

    @classmethod
    def load(cls, path: Path) -> SavedRun:
        data = json.loads(path.read_text())
        labels = list(dict.fromkeys(r["weights"] for r in data["history"]))
        seconds = data["seconds"]
        return cls(data["history"], labels, data["settings"], seconds["train"], seconds["eval"])


def run_table(run: Run, result) -> str:
    iters = sorted({r["iter"] for r in result.history})
    by = {(r["iter"], r["weights"]): r for r in result.history}
    lines = [f"### {run.name}", "", "| iteration | " + " | ".join(result.labels) + " |",
             "|--:|" + "--:|" * len(result.labels)]
    for it in iters:
        cells = []
        for label in result.labels:
            r = by.get((it, label))
            ap = r["AP"] if r else float("nan")
            cells.append("—" if math.isnan(ap) else f"{ap:.1f}")
        lines.append(f"| {it} | " + " | ".join(cells) + " |")
    lines += ["", f"Train {result.train_seconds / 60:.1f} min, evaluation "
              f"{result.eval_seconds / 60:.1f} min.", ""]
    return "\n".join(lines)


def gains(result, warmup: int) -> dict[str, list[float]]:
    """EMA AP minus raw AP at each evaluation after warm-up, per EMA label."""
    by = {(r["iter"], r["weights"]): r["AP"] for r in result.history}
    out: dict[str, list[float]] = {}
    for (it, label), ap in sorted(by.items()):
        raw = by.get((it, RAW), float("nan"))
        if label == RAW or it <= warmup or math.isnan(ap) or math.isnan(raw):
            continue
        out.setdefault(label, []).append(ap - raw)
    return out


def plot(results: list[tuple[Run, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), squeeze=False)
    for ax, (run, result) in zip(axes[0], results):
        for label in result.labels:
            pts = sorted((r["iter"], r["AP"]) for r in result.history if r["weights"] == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label,
                    lw=2.2 if label == RAW else 1.4)
        ax.set_title(run.name, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("COCO box AP (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--evals", type=int, default=5, help="evaluations per run")
    parser.add_argument("--decays", default="0.99,0.998")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="run numbers (1-based), e.g. 1,3")
    parser.add_argument("--work", default="output/ema_quality")
    parser.add_argument("--out", default=str(RESULTS / "ema_quality.md"))
    parser.add_argument("--include", action="append", default=[], metavar="NAME=RESULTS_JSON",
                        help="add a finished run (e.g. of `d2ema demo`) to the report")
    parser.add_argument("--reuse", action="store_true",
                        help="read runs already finished in --work instead of training them")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    chosen = [RUNS[int(i) - 1] for i in args.runs.split(",") if i] or list(RUNS)
    results = []
    started = time.time()
    for run in chosen:
        work = Path(args.work) / f"run{RUNS.index(run)}"
        saved = work / "results.json"
        if args.reuse:
            if saved.is_file():
                results.append((run, SavedRun.load(saved)))
            continue
        opts = options_for(run, args.iters, args.evals, args.decays, work, args.seed)
        print(f"[ema_quality] {run.name}: {args.iters} iterations", flush=True)
        result = run_demo(opts, stream=io.StringIO())
        print(result.table(), flush=True)
        results.append((run, result))
    for item in args.include:
        name, _, path = item.partition("=")
        saved = SavedRun.load(Path(path))
        results.append((Run(name, saved.settings.get("dataset", "?"), False, True), saved))
    first = results[0][1].settings if results else {}
    warmup = first.get("warmup_iters", 0)
    settings = ", ".join(f"{k} {first[k]}" for k in ("batch_size", "base_lr", "warmup_iters")
                         if k in first)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(results, png)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# EMA vs raw weights: COCO box AP during training",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.processor() or 'CPU'}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"- command: `python benchmarks/ema_quality.py {command}`",
        f"- model: RetinaNet ResNet-18 FPN from scratch, 128 px, trained as `d2ema demo` trains "
        f"it ({settings}), {args.iters} iterations, seed {args.seed}",
        f"- EMA decays {args.decays}; yolov5 ramp tau = iterations / 10 where on",
        f"- runs: {len(results)} of {len(chosen)} chosen"
        + ("" if args.reuse else f"; total time {(time.time() - started) / 60:.0f} min"),
        "",
        "## Summary: EMA AP minus raw AP at each evaluation after warm-up",
        "",
        "| run | EMA | min | mean | max | EMA above raw |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for run, result in results:
        for label, g in gains(result, warmup).items():
            above = sum(x > 0 for x in g)
            lines.append(f"| {run.name} | {label} | {min(g):+.1f} | {sum(g) / len(g):+.1f} | "
                         f"{max(g):+.1f} | {above}/{len(g)} |")
    lines += ["", f"![AP curves]({png.name})", "", "## Every evaluation (AP, %)", ""]
    lines += [run_table(run, result) for run, result in results]
    out.write_text("\n".join(lines) + "\n")
    print(f"[ema_quality] wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
