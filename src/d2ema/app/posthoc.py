"""``d2ema posthoc OUTPUT_DIR``: choose the EMA length after training.

Reads the snapshots a run with ``MODEL_EMA.POSTHOC.ENABLED`` wrote (``OUTPUT_DIR/ema_snapshots``),
fits each asked-for EMA (``--sigma-rel`` widths, ``--decay`` classic constant decays) and prints
how well the snapshots represent it. With ``--eval`` each EMA is rebuilt (streamed from disk)
and scored on the run's test set (or on ``--select-on NAME``, a held-out set; the best is then
also scored on the test set), next to the raw weights; a table, ``results.json`` and a PNG of
AP against EMA length go to ``OUTPUT_DIR/posthoc``, and ``--export-best OUT.pth`` writes the
best EMA as a plain detectron2 checkpoint (``MODEL.WEIGHTS``) with a plain config beside it.
The rows, the table and the files are `d2ema.d2.evaluation.report`'s, the sweep and the
choice `d2ema.posthoc.select`'s, shared with ``MODEL_EMA.POSTHOC.SELECT``.

Example::

    report = run_posthoc(PostHocOptions("output/run", sigma_rels="0.02,0.05,0.1", evaluate=True))
    print("
".join(report.lines))

The command's arguments are added by `add_posthoc_parser`; torch is imported only when
the command runs, so that ``d2ema --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from d2ema.errors import UsageError
from d2ema.io.confined import no_links_out, output_folder
from d2ema.posthoc import DEFAULT_SIGMA_RELS, Fit, PostHocError, Target, plan, select

__all__ = [
    "DEFAULT_SIGMA_RELS",
    "PostHocOptions",
    "PostHocReport",
    "add_posthoc_parser",
    "parse_targets",
    "run_posthoc",
]


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
    select_on: str | None = None  # choose on this dataset, report the best on the test set


@dataclasses.dataclass
class PostHocReport:
    rows: list[dict[str, Any]]  # one per target (+ "raw weights" with --eval)
    lines: list[str]  # the printed table
    step: int
    best: dict[str, Any] | None = None
    plot: Path | None = None
    exported: Path | None = None
    export_lines: list[str] = dataclasses.field(default_factory=list)


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


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="d2ema posthoc", unit="file", file=sys.stderr,
                disable=not enabled, dynamic_ncols=True, leave=False)


def run_posthoc(options: PostHocOptions, stream: TextIO | None = None) -> PostHocReport:
    """Fit (and with ``evaluate`` rebuild and score) every target; see the module docstring."""
    from d2ema.d2.evaluation.report import LEGEND, fit_row, table

    stream = stream or sys.stdout
    out = Path(options.output_dir)
    if not out.is_dir():
        raise UsageError(f"{out} is not a folder; pass the OUTPUT_DIR of a training run")
    if options.export_best and not options.evaluate:
        raise UsageError("--export-best needs --eval (the best EMA is the one with the best AP)")
    if options.select_on and not options.evaluate:
        raise UsageError("--select-on needs --eval (it names the set the EMAs are scored on)")
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
    rows = [fit_row(f) for f in fits]
    report = PostHocReport(rows, [], step)
    if options.evaluate:
        _evaluate(options, folder, fits, step, report, say)
    report.lines = table(report.rows, options.evaluate)
    print("\n".join(report.lines), file=stream, flush=True)
    print(LEGEND, file=stream, flush=True)
    if report.best is not None:
        test = (f" on {options.select_on}; on the test set AP {report.best['test_AP']:.1f}"
                if options.select_on else "")
        best = (f"raw weights beat every EMA length on {options.select_on or 'the test set'}"
                if report.best["kind"] == "raw" else f"best: {report.best['target']}")
        say(f"{best} (AP {report.best['AP']:.1f}{test}); results and plot in "
            f"{report.plot.parent}")
    for line in report.export_lines:
        say(line)
    return report


def _evaluate(options, folder: Path, fits: list[Fit], step: int, report: PostHocReport,
              say) -> None:
    from d2ema.app.data import register_for_config
    from d2ema.d2.evaluation.report import result_metrics, write_results
    from d2ema.d2.evaluation.run_eval import RunEvaluator

    out = Path(options.output_dir)
    no_links_out(out, f"the run folder {out}")  # results are written in it, links not followed
    results_dir = output_folder(out, "posthoc", error=UsageError)  # before any evaluation
    run = RunEvaluator.load(out, options.config_file, prepare=register_for_config,
                            inference_dir=results_dir, datasets=options.datasets)
    if options.export_best:  # the export's room too, before the evaluation
        export = Path(options.export_best).resolve()
        output_folder(export.parent.parent, export.parent.name, run.checkpoint.stat().st_size,
                      UsageError, scan=False)
    select_on = _selection_set(options.select_on, run)
    report_on = "the test set" if run.lazy else run.cfg.DATASETS.TEST[0]
    quiet = contextlib.nullcontext() if options.verbose else contextlib.redirect_stdout(
        io.StringIO())  # pycocotools prints every summary
    on = f" on {select_on} (the best is then scored on {report_on})" if select_on else ""
    say(f"evaluating {len(fits)} EMAs and the raw weights ({run.checkpoint.name}){on}; EMAs are "
        "rebuilt from the snapshots, a few at a time")
    rows = {r["target"]: r for r in report.rows}
    with _progress(len(fits) + 1, sys.stderr.isatty()) as bar:
        with quiet:
            raw = run.evaluate(None, select_on)
        bar.update(1)
        report.rows.append({"target": "raw weights", "kind": "raw", **result_metrics(raw)})

        def score(rec) -> float:
            row = rows[rec.fit.target.label]
            with quiet:
                row.update(result_metrics(run.evaluate(rec.tensors, select_on)))
            bar.update(1)
            say(f"{row['target']}: AP {row['AP']:.1f}")
            return row["AP"]

        sel = select(folder, score, [f.target for f in fits], step, batch=options.batch,
                     skip_unrepresentable=True, raw_score=report.rows[-1]["AP"],
                     raw_tensors=run.raw)
    report.best = report.rows[-1] if sel.raw_won else rows[sel.target.label]
    if select_on:
        with quiet:
            report.best["test_AP"] = result_metrics(run.evaluate(sel.tensors))["AP"]
    report.plot = write_results(
        results_dir, {"step": step, "snapshots": str(folder), "select_on": select_on or
                      report_on, "report_on": report_on, "rows": report.rows}, report.rows,
        chosen=report.best, title=f"{out.name}: EMA length chosen after training (step {step})"
        + (f" on {select_on}" if select_on else ""))
    if options.export_best:
        from d2ema.d2.checkpoint.export import export_with_config

        report.export_lines = export_with_config(
            run.checkpoint, options.export_best, ema=sel.tensors,
            info={"step": step, "posthoc": sel.chosen, "select_on": select_on or report_on,
                  "format": "d2ema post-hoc EMA export, v1"})
        report.exported = Path(options.export_best)


def _selection_set(name: str | None, run) -> str | None:
    """``--select-on NAME``: a registered dataset (d2ema's demo sets are generated)."""
    if not name:
        return None
    from detectron2.data import DatasetCatalog

    from d2ema.app.data import DATASETS, register_datasets
    from d2ema.errors import DatasetError

    if run.lazy:
        raise UsageError("--select-on works with yacs configs; a LazyConfig run is evaluated on "
                         "its dataloader.test only")
    if name in DATASETS and name not in DatasetCatalog.list():
        register_datasets(names=[name])
    if name not in DatasetCatalog.list():
        raise DatasetError(f"--select-on {name}: no dataset of that name is registered; add it "
                           f"with --dataset {name}=ANNOTATIONS.json:IMAGE_DIR")
    return name


def add_posthoc_parser(sub, add_verbose: Callable[[argparse.ArgumentParser], None],
                       add_trust: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the ``posthoc`` subcommand to the ``d2ema`` parser's subparsers ``sub``."""
    posthoc = sub.add_parser(
        "posthoc", help="choose the EMA length after training (MODEL_EMA.POSTHOC snapshots)",
        description="Rebuild EMAs of any length from the snapshots a run with "
        "MODEL_EMA.POSTHOC.ENABLED wrote (OUTPUT_DIR/ema_snapshots), say how well the snapshots "
        "represent each, and with --eval score them on the run's test set (table, results.json "
        "and ap_vs_length.png in OUTPUT_DIR/posthoc).",
    )
    posthoc.add_argument("output_dir", metavar="OUTPUT_DIR", help="the training run's folder")
    for flag, metavar, text in (
        ("--sigma-rel", "S,S,...", "power-EMA widths (default without --decay: a sweep "
         "0.01..0.25)"),
        ("--decay", "D,D,...", "classic constant decays, as they stand at the step"),
        ("--export-best", "OUT.pth", "with --eval: write the best EMA as a MODEL.WEIGHTS file"),
        ("--snapshots", "DIR", "snapshot folder (default: OUTPUT_DIR/ema_snapshots)"),
        ("--config-file", "FILE", "the run's config (default: OUTPUT_DIR/config.yaml)"),
        ("--select-on", "NAME", "with --eval: score the EMAs on this dataset (held out) and the "
         "best on the test set too; default: the test set both chooses and reports"),
    ):
        posthoc.add_argument(flag, default=None, metavar=metavar, help=text)
    posthoc.add_argument("--dataset", action="append", default=[],
                         metavar="NAME=ANNOTATIONS.json:IMAGE_DIR",
                         help="with --eval: register a COCO-format dataset the run's config "
                         "tests on that it does not record (e.g. one your train_net.py "
                         "registered in code); repeatable")
    posthoc.add_argument("--step", type=int, help="the training step to rebuild the EMAs at "
                         "(default: the last)")
    posthoc.add_argument("--eval", action="store_true",
                         help="rebuild each EMA and evaluate it (and the raw weights)")
    add_verbose(posthoc)
    add_trust(posthoc)
    posthoc.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from d2ema.d2.config.keys import core_words_named
    from d2ema.io.safe_pickle import trust_pickles

    with trust_pickles(args.trust_pickle), core_words_named():  # snapshots' keys: yacs
        run_posthoc(PostHocOptions(args.output_dir, args.sigma_rel, args.decay, args.step,
                                   args.eval, args.export_best, args.snapshots, args.config_file,
                                   args.verbose, datasets=tuple(args.dataset),
                                   select_on=args.select_on))
    return 0
