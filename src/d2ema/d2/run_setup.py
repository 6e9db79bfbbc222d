"""Where a ``d2ema train`` process writes, and where d2ema's own log lines go.

A run's folder (``OUTPUT_DIR`` / ``train.output_dir``) holds its ``config.yaml``, the config
that resumes it; detectron2's ``default_setup`` rewrites that file at every start. A training
(new or resumed) is the run, so it may; an ``--eval-only`` evaluation is not, so it gets a
folder of its own, ``OUTPUT_DIR/eval/<date-time>/`` (its config, ``log.txt`` and
``inference*/`` files), chosen once by the launching process so that every rank agrees.

d2ema's loggers (names under ``d2ema``) get detectron2's handlers too: the console (main
process) and ``log.txt`` (``log.txt.rank<N>`` for the others), as ``default_setup`` does for
``detectron2`` and ``fvcore``.

Example::

    args.eval_dir = new_eval_dir(run_dir(cfg)) if args.eval_only else None   # launcher
    run = setup_run(cfg, args)                                             # each worker
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

__all__ = ["EVAL_FOLDER", "new_eval_dir", "run_dir", "setup_d2ema_logger", "setup_run"]

EVAL_FOLDER = "eval"


def _is_lazy(cfg) -> bool:
    return not hasattr(cfg, "SOLVER")


def run_dir(cfg) -> str:
    """The run's output folder (yacs ``OUTPUT_DIR`` or LazyConfig ``train.output_dir``)."""
    if _is_lazy(cfg):
        return str(cfg.train.get("output_dir", "./output") or "./output")
    return str(cfg.OUTPUT_DIR)


def _set_output_dir(cfg, folder: str) -> None:
    if _is_lazy(cfg):
        cfg.train.output_dir = folder
        return
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.OUTPUT_DIR = folder
    if was_frozen:
        cfg.freeze()


def new_eval_dir(run: str) -> str:
    """``run/eval/<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ... when that one exists already)."""
    base = os.path.join(run, EVAL_FOLDER, time.strftime("%Y%m%d-%H%M%S"))
    folder, n = base, 1
    while os.path.exists(folder):
        n += 1
        folder = f"{base}-{n}"
    return folder


def setup_d2ema_logger(output_dir: str | None) -> logging.Logger:
    """detectron2's ``setup_logger`` for ``d2ema`` (console on the main process, ``log.txt``)."""
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    logger = setup_logger(output_dir, distributed_rank=comm.get_rank(), name="d2ema")
    logger.setLevel(logging.INFO)
    # setup_logger turns propagation off; d2ema's records still reach the root logger's
    # handlers (a user's logging setup, pytest's caplog), which have none under `d2ema train`
    logger.propagate = True
    return logger


def setup_run(cfg: Any, args: Any) -> str:
    """``default_setup`` for this process, writing into the run's folder for a training and
    into ``args.eval_dir`` for ``--eval-only``; returns the run's folder (for checkpoints)."""
    from detectron2.engine import default_setup

    run = run_dir(cfg)
    if getattr(args, "eval_only", False):
        folder = getattr(args, "eval_dir", None) or new_eval_dir(run)
        _set_output_dir(cfg, folder)
    if not _is_lazy(cfg):
        cfg.freeze()
    default_setup(cfg, args)
    setup_d2ema_logger(run_dir(cfg))
    if getattr(args, "eval_only", False):
        logging.getLogger(__name__).info(
            "Evaluation only: its config, log and results go to %s (the run's %s keeps its "
            "config.yaml)", run_dir(cfg), run)
    return run
