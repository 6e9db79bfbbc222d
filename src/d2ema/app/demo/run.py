"""``d2ema demo``: train a small detector on the CPU and watch EMA weights beat the raw ones.

A RetinaNet (ResNet-18 FPN, 128 px images, from scratch) trains on an embedded dataset
(``shapes`` or ``digits``, generated locally, no download) with `EMATrainer`.
The trainer's own EMA has the first decay (yolov5 ramp); beside it are the recommended power
EMA (sigma_rel 0.05, ``MODEL_EMA.EXTRA_SIGMA_RELS``) and one more EMA per extra decay, compared
side by side in one run. At every evaluation the raw weights and
each EMA are scored with COCO AP on the validation split.

Outputs, in the output folder: ``ap_curves.png`` (AP over iterations, raw vs each EMA),
TensorBoard events (scalars ``bbox/AP`` for the raw weights, ``ema_sigma0.05/bbox/AP`` and
``ema_<decay>/bbox/AP`` for the EMAs), ``results.json`` (every evaluation), ``log.txt``
(detectron2's full log, which the console leaves out) and ``model_final.pth`` (raw weights
+ the first EMA, for ``d2ema export``).
Measured run times and AP: benchmarks/results/demo.md. The thread count changes float
rounding, so numbers vary slightly with it (``--threads`` fixes it).

Example::

    from d2ema.app.demo import DemoOptions, run_demo
    result = run_demo(DemoOptions(quick=True, output="output/demo"))
    print(result.table())
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch

from d2ema.app.demo.options import RAW, DemoError, DemoOptions, check_options, demo_config
from d2ema.app.demo.report import DemoResult, RunLog, duration, write_json
from d2ema.app.demo.trainer import DemoTrainer

__all__ = ["choose_threads", "run_demo"]

_LOGGERS = ("detectron2", "fvcore", "d2ema")


@contextlib.contextmanager
def _console_logging(output_dir: Path, verbose: bool, stream: TextIO) -> Iterator[None]:
    """detectron2/fvcore/d2ema logs: everything to ``log.txt``, warnings (all if verbose) to
    the console. Restores the loggers afterwards."""
    formatter = logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%H:%M:%S")
    file_handler = logging.FileHandler(output_dir / "log.txt", mode="a")
    file_handler.setFormatter(formatter)
    console = logging.StreamHandler(stream)
    console.setFormatter(formatter)
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, list(logger.handlers)))
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.addHandler(file_handler)
        logger.addHandler(console)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level, propagate, handlers in saved:
            logger.removeHandler(file_handler)
            logger.removeHandler(console)
            for h in handlers:
                logger.addHandler(h)
            logger.setLevel(level)
            logger.propagate = propagate
        file_handler.close()


def choose_threads(requested: int | None) -> tuple[int | None, str]:
    """CPU threads for training, and why. Default: torch's (one per core), but 1 thread when
    other jobs already keep every core busy: then torch's spinning OpenMP threads wait on each
    other (benchmarks/results/demo.md has the measurement)."""
    if requested is not None:
        return requested, ""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None, ""
    if cores > 1 and load >= cores:
        return 1, (f"the machine is busy (load {load:.1f} on {cores} cores): training on 1 CPU "
                   f"thread, faster than several on a busy machine (--threads {cores} to override)")
    return None, ""


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    saved = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_demo(options: DemoOptions, stream: TextIO | None = None) -> DemoResult:
    """Train, evaluate and plot as described in the module docstring; print progress."""
    stream = stream or sys.stdout
    preset, decays = check_options(options)
    started = time.perf_counter()
    output_dir = Path(options.output).expanduser()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError(f"cannot create the output folder {output_dir}: {e.strerror}") from e
    cfg = demo_config(dataclasses.replace(options, output=str(output_dir)), preset)

    threads, why = choose_threads(options.threads)
    with _console_logging(output_dir, options.verbose, stream), _threads(threads):
        from detectron2.utils.env import seed_all_rng

        from d2ema.app.data import cache_root, get_dataset_spec, register_datasets

        train, val = cfg.DATASETS.TRAIN[0], cfg.DATASETS.TEST[0]
        sizes = {n: s for n, s in ((train, preset.train_images), (val, preset.val_images)) if s}
        n_train = sizes.get(train) or get_dataset_spec(train).num_images
        n_val = sizes.get(val) or get_dataset_spec(val).num_images
        run = RunLog(options, preset, decays, stream, n_val)
        run.say(f"datasets: {train} ({n_train} images), {val} ({n_val} images), "
                f"cached in {cache_root()}")
        t0 = time.perf_counter()
        register_datasets(sizes=sizes, names=[train, val])
        run.say(f"datasets ready in {duration(time.perf_counter() - t0)}")
        if why:
            run.say(why)
        run.say(
            f"training RetinaNet R18-FPN (128 px, from scratch) on {torch.get_num_threads()} "
            f"CPU thread(s): {preset.iters} iterations, batch {cfg.SOLVER.IMS_PER_BATCH}, "
            f"AdamW lr {cfg.SOLVER.BASE_LR:g}; power EMA sigma_rel "
            f"{', '.join(f'{s:g}' for s in preset.sigma_rels)} (recommended) and EMA decay "
            f"{', '.join(f'{d:g}' for d in decays)} (yolov5 ramp, tau {cfg.MODEL_EMA.TAU:g}); "
            "evaluating "
            + (f"every {preset.eval_period} iterations" if preset.eval_period else "at the end")
        )
        seed_all_rng(int(cfg.SEED))
        cfg.freeze()
        trainer = DemoTrainer(cfg, run)
        trainer.resume_or_load(resume=False)
        t_train = time.perf_counter()
        trainer.train()
        train_and_eval = time.perf_counter() - t_train

        from d2ema.app.plotting import plot_ap_curves

        plot = plot_ap_curves(
            run.history, output_dir / "ap_curves.png",
            title=f"d2ema demo: RetinaNet R18-FPN on {options.dataset} (seed {options.seed})",
            raw_label=RAW,
        )
    checkpoint = output_dir / "model_final.pth"
    result = DemoResult(
        history=run.history,
        labels=run.labels,
        output_dir=output_dir,
        plot=Path(plot),
        results_json=output_dir / "results.json",
        checkpoint=checkpoint if checkpoint.is_file() else None,
        seconds=time.perf_counter() - started,
        train_seconds=train_and_eval - run.eval_seconds,
        eval_seconds=run.eval_seconds,
        settings={**dataclasses.asdict(preset), "decays": list(decays),
                  "dataset": options.dataset, "seed": options.seed},
    )
    write_json(result)
    return result


