"""``d2ema posthoc OUTPUT_DIR``: choose the EMA length after training.

Reads the snapshots a run with ``MODEL_EMA.POSTHOC.ENABLED`` wrote (``OUTPUT_DIR/ema_snapshots``),
fits each asked-for EMA (``--sigma-rel`` widths, ``--decay`` classic constant decays) and prints
how well the snapshots represent it. With ``--eval`` each EMA is rebuilt (streamed from disk)
and scored on the run's test set, next to the raw weights; a table, ``results.json`` and a PNG
of AP against EMA length go to ``OUTPUT_DIR/posthoc``, and ``--export-best OUT.pth`` writes the
best EMA as a plain detectron2 checkpoint (``MODEL.WEIGHTS``).

Example::

    report = run_posthoc(PostHocOptions("output/run", sigma_rels="0.02,0.05,0.1", evaluate=True))
    print("\\n".join(report.lines))
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from ..confined import no_links_out
from ..errors import UsageError
from ..posthoc import Fit, PostHocError, Target, plan, reconstruct

__all__ = ["DEFAULT_SIGMA_RELS", "PostHocOptions", "PostHocReport", "parse_targets",
           "run_posthoc"]

DEFAULT_SIGMA_RELS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25)


@dataclasses.dataclass
class PostHocOptions:
    """What ``d2ema posthoc`` takes on its command line."""

    output_dir: str
    sigma_rels: str | None = None  # "0.02,0.05"; None and no decays: DEFAULT_SIGMA_RELS
    decays: str | None = None  # "0.999,0.9998"
    step: int | None = None  # default: the last snapshot's
    evaluate: bool = False
    export_best: str | None = None
    snapshots: str | None = None  # default: OUTPUT_DIR/ema_snapshots
    config_file: str | None = None  # default: OUTPUT_DIR/config.yaml
    verbose: bool = False
    datasets: tuple[str, ...] = ()  # NAME=ANNOTATIONS.json:IMAGE_DIR, as for d2ema train
    batch: int = 4  # targets rebuilt per pass over the snapshots (memory: batch + 1 models)


@dataclasses.dataclass
class PostHocReport:
    rows: list[dict[str, Any]]  # one per target (+ "raw weights" with --eval)
    lines: list[str]  # the printed table
    step: int
    best: dict[str, Any] | None = None
    plot: Path | None = None
    exported: Path | None = None


def _numbers(text: str, flag: str) -> list[float]:
    values = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise UsageError(f"{flag}: {item!r} is not a number; e.g. {flag} 0.05,0.1") from None
    if not values:
        raise UsageError(f"{flag}: give at least one value, e.g. {flag} 0.05,0.1")
    return values


def parse_targets(sigma_rels: str | None, decays: str | None) -> tuple[list[Target], bool]:
    """The targets, and whether the user named them (else the default sweep, from which
    widths the snapshots cannot represent are left out instead of refused)."""
    if sigma_rels is None and decays is None:
        return [Target("sigma_rel", s) for s in DEFAULT_SIGMA_RELS], False
    targets = []
    try:
        for s in _numbers(sigma_rels, "--sigma-rel") if sigma_rels is not None else []:
            targets.append(Target("sigma_rel", s))
        for d in _numbers(decays, "--decay") if decays is not None else []:
            targets.append(Target("decay", d))
    except PostHocError as e:
        raise UsageError(str(e)) from None
    return list(dict.fromkeys(targets)), True


def _row(fit: Fit) -> dict[str, Any]:
    return {"target": fit.target.label, "kind": fit.target.kind, "value": fit.target.value,
            "sigma_rel": fit.sigma_rel, "misfit": fit.residual, "l1": fit.l1,
            "snapshots": fit.used}


LEGEND = ("misfit: how far the snapshots' combination is from the target's averaging profile "
          "(relative error); sum|x|: the sum of the combination's absolute weights, how much "
          "it amplifies the snapshots' rounding (1 for a snapshot or a plain average; large: "
          "less exact)")


def _table(rows: list[dict[str, Any]], evaluated: bool) -> list[str]:
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


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="d2ema posthoc", unit="file", file=sys.stderr,
                disable=not enabled, dynamic_ncols=True, leave=False)


def run_posthoc(options: PostHocOptions, stream: TextIO | None = None) -> PostHocReport:
    """Fit (and with ``evaluate`` rebuild and score) every target; see the module docstring."""
    stream = stream or sys.stdout
    out = Path(options.output_dir)
    if not out.is_dir():
        raise UsageError(f"{out} is not a folder; pass the OUTPUT_DIR of a training run")
    if options.export_best and not options.evaluate:
        raise UsageError("--export-best needs --eval (the best EMA is the one with the best AP)")
    folder = Path(options.snapshots) if options.snapshots else out / "ema_snapshots"
    targets, named = parse_targets(options.sigma_rels, options.decays)
    entries, fits, step = plan(folder, targets, options.step, skip_unrepresentable=not named)
    if not fits:
        raise PostHocError(f"none of the widths {DEFAULT_SIGMA_RELS} can be reconstructed from "
                           f"the snapshots in {folder}; check them with --sigma-rel 0.05")
    sigmas = sorted({e.sigma_rel for e in entries})
    say = lambda text: print(f"[d2ema posthoc] {text}", file=stream, flush=True)  # noqa: E731
    say(f"{len(entries)} snapshots of power EMAs sigma_rel {', '.join(map(str, sigmas))} in "
        f"{folder}; EMAs at step {step}")
    skipped = [t.label for t in targets if t not in {f.target for f in fits}]
    if skipped:
        say(f"left out (the snapshots cannot represent them): {', '.join(skipped)}")
    rows = [_row(f) for f in fits]
    report = PostHocReport(rows, [], step)
    if options.evaluate:
        _evaluate(options, folder, fits, step, report, say)
    report.lines = _table(report.rows, options.evaluate)
    print("\n".join(report.lines), file=stream, flush=True)
    print(LEGEND, file=stream, flush=True)
    if report.best is not None:
        say(f"best: {report.best['target']} (AP {report.best['AP']:.1f}); results and plot in "
            f"{report.plot.parent}")
    if report.exported is not None:
        say(f"wrote {report.exported}: use it as MODEL.WEIGHTS {report.exported}")
    return report


def _evaluate(options, folder: Path, fits: list[Fit], step: int, report: PostHocReport,
              say) -> None:
    from ..d2.run_eval import RunEvaluator, primary_ap
    from .data import register_for_config

    out = Path(options.output_dir)
    results_dir = out / "posthoc"
    no_links_out(out, f"the run folder {out}")  # results are written in it, links not followed
    results_dir.mkdir(parents=True, exist_ok=True)
    run = RunEvaluator.load(out, options.config_file, prepare=register_for_config,
                            inference_dir=results_dir, datasets=options.datasets)
    quiet = contextlib.nullcontext() if options.verbose else contextlib.redirect_stdout(
        io.StringIO())  # pycocotools prints every summary
    say(f"evaluating {len(fits)} EMAs and the raw weights ({run.checkpoint.name}); EMAs are "
        "rebuilt from the snapshots, a few at a time")
    best_tensors = None
    with _progress(len(fits) + 1, sys.stderr.isatty()) as bar:
        with quiet:
            raw = run.evaluate(None)
        bar.update(1)
        report.rows.append({"target": "raw weights", "kind": "raw", **_metrics(raw, primary_ap)})
        recs = reconstruct(folder, [f.target for f in fits], step, batch=options.batch,
                           skip_unrepresentable=True)
        for row, rec in zip(report.rows[: len(fits)], recs):
            with quiet:
                row.update(_metrics(run.evaluate(rec.tensors), primary_ap))
            bar.update(1)
            say(f"{row['target']}: AP {row['AP']:.1f}")
            if report.best is None or row["AP"] > report.best["AP"]:
                report.best, best_tensors = row, rec.tensors
    (results_dir / "results.json").write_text(json.dumps(
        {"step": step, "snapshots": str(folder), "rows": report.rows}, indent=1))
    from .plotting import plot_ap_vs_length

    report.plot = Path(plot_ap_vs_length(report.rows, results_dir / "ap_vs_length.png",
                                         title=f"{out.name}: EMA length chosen after training "
                                         f"(step {step})"))
    if options.export_best:
        report.exported = _export(run.checkpoint, best_tensors, report.best, step,
                                  Path(options.export_best))


def _metrics(results: dict, primary_ap) -> dict[str, float]:
    box = results.get("bbox", {})
    ap50 = float(box.get("AP50", math.nan))
    return {"AP": primary_ap(results), "AP50": 0.0 if math.isnan(ap50) else ap50}


def _export(checkpoint: Path, tensors, best: dict, step: int, output: Path) -> Path:
    from ..atomic import atomic_save
    from ..export import EXPORT_KEY, ema_model_state
    from ..format import STATE_KEY
    from ..resume import read_checkpoint

    raw = read_checkpoint(checkpoint)  # weights_only; one line if it cannot be read
    raw = raw if isinstance(raw, dict) else {}
    state, *_ = ema_model_state({STATE_KEY: tensors, "model": raw.get("model", {})},
                                f"checkpoint {checkpoint}")
    try:
        atomic_save({"model": state, EXPORT_KEY: {
            "source": str(checkpoint), "step": step, "posthoc": best["target"],
            "format": "d2ema post-hoc EMA export, v1"}}, output)
    except OSError as e:
        raise UsageError(f"cannot write {output}: {e.strerror or e}") from e
    return output
