"""``d2ema``: the command line.

Subcommands::

    d2ema demo   [--quick] [--dataset shapes|digits] [--iters N] [--output DIR] [--seed S]
                 [--decays 0.99,0.998] [--eval-period K] [--verbose] [KEY VALUE ...]
    d2ema train  --config-file CFG [--dataset NAME=ANNOTATIONS.json:IMAGE_DIR ...] [--resume]
                 [--eval-only] [--num-gpus N] [--num-machines M] [--machine-rank R]
                 [--dist-url URL] [KEY VALUE ... | key=value ...]
    d2ema export CHECKPOINT -o OUT.pth [--config RUN_CONFIG.yaml] [--allow-nonfinite]
    d2ema posthoc OUTPUT_DIR [--sigma-rel S,..] [--decay D,..] [--eval] [--export-best OUT]
    d2ema bench  [arguments of the update-speed benchmark]

``train`` is detectron2's ``tools/train_net.py`` (YAML configs) and
``tools/lazyconfig_train_net.py`` (``.py`` LazyConfigs) with EMA: ``MODEL_EMA.*`` or
``train.model_ema.*``. ``--dataset`` registers your COCO-format datasets (and records them in
the run's config); the embedded datasets (``shapes_*``, ``digits_*``) are generated and
registered when a config names them.

A mistake in the input (unknown dataset, missing or unreadable config or checkpoint, a
checkpoint without EMA, an invalid ``MODEL_EMA`` value) prints one line on stderr saying what
and how to fix it, and exits with status 2; ``--verbose`` adds the traceback. Ctrl-C, SIGTERM
and SIGHUP print one line and exit with 128 + the signal number (130, 143, 129), removing
temporary files.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from d2ema.errors import D2EMAError, one_line
from d2ema.io.interrupts import exit_line, exit_status, signals_as_interrupts
from d2ema.io.safe_pickle import add_trust_pickle, trust_pickles

__all__ = ["build_parser", "main"]

PROG = "d2ema"
EXIT_USAGE = 2


# ----------------------------------------------------------------------------- parser
def _add_verbose(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not overwrite `d2ema --verbose <command>`.
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show detectron2's log on the console and tracebacks of errors")


def _add_tail(parser: argparse.ArgumentParser, func, opts_help: str) -> None:
    """--verbose, trailing config overrides, and the function that runs the command."""
    _add_verbose(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help=opts_help)
    parser.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    from d2ema import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Exact, fast and safe EMA of model weights for detectron2.",
        epilog="Run 'd2ema <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="tracebacks of errors, detectron2's log on the console")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    demo = sub.add_parser(
        "demo", help="train a small RetinaNet on the CPU and compare raw vs EMA AP",
        description="Train a ResNet-18 FPN RetinaNet (128 px, from scratch) on an embedded "
        "dataset on the CPU with EMA; evaluate raw and EMA weights periodically; print a table "
        "and write a plot, TensorBoard events and a checkpoint. About 3-5 minutes on 2 cores "
        "(--quick: about 1 minute).",
    )
    demo.add_argument("--quick", action="store_true", help="a short smoke run (about 1 minute)")
    demo.add_argument("--dataset", default="shapes", help="shapes (default) or digits")
    demo.add_argument("--iters", type=int, default=None, help="training iterations")
    demo.add_argument("-o", "--output", default="output/d2ema_demo", metavar="DIR",
                      help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--decays", default=None,
                      help="comma-separated constant EMA decays shown beside the power EMA "
                      "sigma_rel 0.05 (default: 0.99; --quick: 0.97)")
    demo.add_argument("--eval-period", type=int, default=None, metavar="K",
                      help="evaluate every K iterations (0: at the end only)")
    demo.add_argument("--threads", type=int, default=None, metavar="N",
                      help="CPU threads (default: one per core, or 1 when other jobs already "
                      "keep every core busy: one is faster than several on a busy machine)")
    _add_tail(demo, cmd_demo, "detectron2 config overrides, e.g. SOLVER.BASE_LR 0.0005")

    train = sub.add_parser(
        "train", help="detectron2's train_net.py with EMA (YAML or LazyConfig .py)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train (or --eval-only) a detectron2 model with EMA of its weights.\n"
        "YAML configs: MODEL_EMA.ENABLED True, MODEL_EMA.DECAY 0.9998, ...; LazyConfigs: "
        "train.model_ema.enabled=True, ...\n\nExamples:\n"
        "  d2ema train --config-file cfg.yaml MODEL_EMA.ENABLED True SOLVER.MAX_ITER 1000\n"
        "  d2ema train --config-file cfg.yaml --dataset my_train=train.json:images/ "
        "--dataset my_val=val.json:images/ DATASETS.TRAIN \"('my_train',)\" "
        "DATASETS.TEST \"('my_val',)\"\n"
        "  d2ema train --config-file cfg.yaml --eval-only MODEL.WEIGHTS out/model_final.pth "
        "MODEL_EMA.ENABLED True MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY True\n"
        "  d2ema train --config-file cfg.py train.model_ema.enabled=True",
    )
    train.add_argument("--config-file", required=True, metavar="FILE",
                       help="YAML config, or a LazyConfig .py")
    train.add_argument("--dataset", action="append", default=[],
                       metavar="NAME=ANNOTATIONS.json:IMAGE_DIR",
                       help="register a COCO-format instances dataset under NAME (repeatable); "
                       "recorded in the run's config.yaml (DATASETS.COCO_INSTANCES or "
                       "train.coco_instances), so a resume needs no --dataset")
    train.add_argument("--resume", action="store_true",
                       help="resume from the last checkpoint of the output folder")
    train.add_argument("--start-over", action="store_true",
                       help="start a new run in an OUTPUT_DIR that holds another run: its "
                       "checkpoints and snapshots are moved into OUTPUT_DIR/previous-<time>/")
    train.add_argument("--eval-only", action="store_true", help="evaluate only")
    add_trust_pickle(train)
    train.add_argument("--num-gpus", type=int, default=1, help="GPUs per machine (default 1)")
    train.add_argument("--num-machines", type=int, default=1, help="number of machines")
    train.add_argument("--machine-rank", type=int, default=0, help="rank of this machine")
    port = 2**15 + 2**14 + hash(os.getuid() if sys.platform != "win32" else 1) % 2**14
    train.add_argument("--dist-url", default=None, help=f"process group URL (default tcp://"
                       f"127.0.0.1:{port}; 'auto': a free local port; --num-machines: machine "
                       "0's address, 127.0.0.1 for 'machines' on this host)")
    train.set_defaults(default_dist_url=f"tcp://127.0.0.1:{port}")
    _add_tail(train, cmd_train, "config overrides: 'KEY VALUE' pairs (YAML) or key=value (.py)")

    export = sub.add_parser(
        "export", help="write a checkpoint whose weights are the EMA (for MODEL.WEIGHTS)",
        description="Write OUT: a detectron2 checkpoint whose 'model' holds the EMA weights of "
        "CHECKPOINT (its 'ema_state'), loadable by any detectron2 as MODEL.WEIGHTS. Written "
        "atomically. With the run's config.yaml (found beside CHECKPOINT, or --config), also "
        "writes OUT with the suffix .yaml: that config without d2ema's keys, MODEL.WEIGHTS set "
        "to OUT, for plain detectron2.",
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="training checkpoint (.pth)")
    export.add_argument("-o", "--output", required=True, metavar="OUT.pth", help="file to write")
    export.add_argument("--config", default=None, metavar="RUN_CONFIG.yaml",
                        help="the run's config (default: config.yaml beside CHECKPOINT)")
    export.add_argument("--allow-nonfinite", action="store_true",
                        help="write the EMA even if it holds NaN/Inf (refused by default)")
    _add_verbose(export)
    export.set_defaults(func=cmd_export)

    from d2ema.app.posthoc import add_posthoc_parser

    add_posthoc_parser(sub, _add_verbose, add_trust_pickle)

    bench = sub.add_parser(
        "bench", add_help=False, help="time EMA updates against the floor and the peers",
        description="Run the update-speed benchmark (d2ema.app.speed.update_speed); every "
        "argument is passed on ('d2ema bench --help' shows them).",
    )
    bench.set_defaults(func=cmd_bench)
    return parser


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``d2ema`` command line; return the exit status."""
    # the process's own command (``d2ema ...``, ``python -m d2ema``): a signal while it exits
    # is one line and 128 + the signal too
    then = exit_line(lambda: prog) if argv is None else None
    argv = list(sys.argv[1:] if argv is None else argv)
    prog, verbose = PROG, False
    try:
        with signals_as_interrupts(then):
            parser = build_parser()
            args, extra = parser.parse_known_args(argv)
            prog = f"{PROG} {args.command}"
            if args.command == "bench":
                args.bench_args = extra
            elif extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            verbose = bool(getattr(args, "verbose", False))
            if not verbose:
                _quiet_warnings()
            return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        resume = (f"; checkpoints kept: {getattr(e, 'resume_note', '--resume continues')}"
                  * (prog == f"{PROG} train"))
        print(f"{prog}: interrupted{f' by {e}' if str(e) else ''}{resume}", file=sys.stderr)
        return exit_status(e)
    except D2EMAError as e:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


def _quiet_warnings() -> None:
    """Deprecation notices of torch/detectron2 internals are not the user's to act on."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for module in ("torch", "detectron2", "fvcore", "iopath", "pycocotools"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
    # "No CUDA runtime is found, using CUDA_HOME=..." on every CPU-only start: not actionable.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    from d2ema.app.demo import DemoOptions, run_demo, summary_lines

    options = DemoOptions(
        quick=args.quick, dataset=args.dataset, iters=args.iters, output=args.output,
        seed=args.seed, decays=args.decays, eval_period=args.eval_period,
        verbose=bool(getattr(args, "verbose", False)), opts=tuple(args.opts or ()),
        threads=args.threads,
    )
    print("\n".join(summary_lines(run_demo(options))), flush=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from d2ema.app.data import DATASETS, register_for_config
    from d2ema.d2.engine.train_net import train_main
    from d2ema.errors import UsageError

    late = next((i for i, word in enumerate(args.opts or ()) if word.startswith("--")), None)
    if late is not None:  # argparse leaves options after the first override in the overrides
        raise UsageError(f"options go before the config overrides: {args.opts[late]!r} comes "
                         f"after {' '.join(args.opts[:late])!r}; e.g. d2ema train --config-file "
                         "CFG --dataset NAME=ANN.json:IMAGES --resume KEY VALUE ...")

    with trust_pickles(args.trust_pickle):
        return train_main(args, prepare=register_for_config, known_datasets=tuple(DATASETS))


def cmd_export(args: argparse.Namespace) -> int:
    from d2ema.d2.checkpoint.export import export_with_config

    lines = export_with_config(args.checkpoint, args.output, args.config,
                               allow_nonfinite=args.allow_nonfinite)
    print("\n".join(lines))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from d2ema.app.bench import run_update_speed

    return run_update_speed(args.bench_args, prog=f"{PROG} bench")


if __name__ == "__main__":
    sys.exit(main())
