"""The arguments of ``d2ema posthoc`` (kept here so that ``d2ema.cli`` stays parser and
dispatch, and imports no torch before a command runs)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["add_posthoc_parser"]


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
    from ..safe_pickle import trust_pickles
    from .posthoc import PostHocOptions, run_posthoc

    with trust_pickles(args.trust_pickle):
        run_posthoc(PostHocOptions(args.output_dir, args.sigma_rel, args.decay, args.step,
                                   args.eval, args.export_best, args.snapshots, args.config_file,
                                   args.verbose, datasets=tuple(args.dataset),
                                   select_on=args.select_on))
    return 0
