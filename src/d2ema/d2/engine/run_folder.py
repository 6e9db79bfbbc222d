"""The run folder of ``d2ema train``: checked before start, one training at a time, where each
process writes and logs, and a full disk as one line.

**A full disk** is one line and exit status 2, not a traceback. Checkpoints and snapshots are
written atomically (`d2ema.io.atomic`), so a full disk leaves every earlier one intact and the
run can be resumed once space is freed; their writers say so themselves
(`CheckpointError`, ``PostHocError``). Any other write that fails for lack of
space (detectron2's ``metrics.json``, an evaluation's output) becomes `DiskFullError` here.

Example::

    with disk_full_as_error("output"):
        trainer.train()

**One training per OUTPUT_DIR**: the main process holds a lock on ``OUTPUT_DIR/.d2ema.lock``.
Two trainings writing into one folder interleave their checkpoints and snapshot series, and
each deletes what it takes for the other's leftovers. `run_lock` takes an exclusive
``flock`` on a file in OUTPUT_DIR before anything is written there, and holds it until the
training ends; the kernel releases it when the process ends in any way (a SIGKILL or a power
cut leaves no stale lock). A second start refuses with `RunLockedError`,
naming the holder's PID (written into the lock file). The lock is taken by the process that
launches the workers, so worker ranks never wait for it; in a multi-machine run only machine 0
takes it (a shared filesystem would otherwise refuse the other machines).

Example::

    with run_lock(cfg, args):
        launch(train_worker, ...)

**Where a process writes**, and where d2ema's own log lines go. A run's folder (``OUTPUT_DIR`` /
``train.output_dir``) holds its ``config.yaml``, the config that resumes it; detectron2's
``default_setup`` rewrites that file at every start. A training (new or resumed) is the run, so it
may; an ``--eval-only`` evaluation is not, so it gets a folder of its own,
``OUTPUT_DIR/eval/<date-time>/`` (its config, ``log.txt`` and ``inference*/`` files), chosen once
by the launching process so that every rank agrees.

d2ema's loggers (names under ``d2ema``) get detectron2's handlers too: the console (main
process) and ``log.txt`` (``log.txt.rank<N>`` for the others), as ``default_setup`` does for
``detectron2`` and ``fvcore``.

Example::

    args.eval_dir = new_eval_dir(run_dir(cfg)) if args.eval_only else None   # launcher
    run = setup_run(cfg, args)                                             # each worker

**Before start**, `check_output_dir` refuses an OUTPUT_DIR that is a file, cannot be
written, or links out, and a new run (no ``--resume``) in a folder that holds another run's
checkpoints or snapshots: that run is kept until the user says otherwise (``--resume``, another
OUTPUT_DIR, or ``--start-over``, which moves it into ``OUTPUT_DIR/previous-<time>/``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from d2ema.d2.config import settings as config_settings
from d2ema.d2.config.settings import EMASettings
from d2ema.d2.config.view import ConfigView
from d2ema.errors import D2EMAError, RunLockedError, UsageError
from d2ema.io.confined import no_links_out, output_folder

__all__ = [
    "EVAL_FOLDER",
    "LOCK_FILE",
    "DiskFullError",
    "check_output_dir",
    "disk_full_as_error",
    "is_disk_full",
    "new_eval_dir",
    "output_dir",
    "run_dir",
    "run_lock",
    "setup_d2ema_logger",
    "setup_run",
]


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


class DiskFullError(D2EMAError, OSError):
    """No space left for a training's output; earlier checkpoints are intact."""


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _FULL


@contextlib.contextmanager
def disk_full_as_error(folder: str) -> Iterator[None]:
    """Turn a full disk under the block into `DiskFullError` (one line)."""
    try:
        yield
    except D2EMAError:
        raise
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise DiskFullError(
            f"no space left to write {e.filename or 'the training output'} "
            f"({e.strerror or e}); the checkpoints and snapshots written before are intact: "
            f"free disk space, then train again with --resume to continue in {folder}") from e


LOCK_FILE = ".d2ema.lock"


def output_dir(cfg) -> str:
    """``OUTPUT_DIR`` (yacs) or ``train.output_dir`` (LazyConfig)."""
    return ConfigView.of(cfg).output_dir


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return f"process {text}"
    return "another process"


@contextlib.contextmanager
def run_lock(cfg, args) -> Iterator[Path | None]:
    """Hold the lock of the run's OUTPUT_DIR while the block runs (a training; not
    ``--eval-only``); yields the lock file, or None where no lock is taken."""
    folder = output_dir(cfg)
    if getattr(args, "eval_only", False) or getattr(args, "machine_rank", 0) or not folder or (
        "://" in folder
    ):
        yield None
        return
    import fcntl

    path = Path(folder) / LOCK_FILE
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise UsageError(f"cannot create {path}: {e.strerror or e}; OUTPUT_DIR must be a folder "
                         "this user can write") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"{folder} is in use: {_holder(fd)} is training into it (it holds {path}); "
                "wait for it to finish or stop it, or train into another OUTPUT_DIR") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if getattr(args, "start_over", False) and not getattr(args, "resume", False):
            move_earlier_run(cfg)  # under the lock: no other training is using them
        yield path
    finally:
        os.close(fd)  # releases the lock


EVAL_FOLDER = "eval"


def run_dir(cfg) -> str:
    """The run's output folder (yacs ``OUTPUT_DIR`` or LazyConfig ``train.output_dir``)."""
    view = ConfigView.of(cfg)
    return view.output_dir or ("./output" if view.lazy else "")


def _set_output_dir(cfg, folder: str) -> None:
    if ConfigView.of(cfg).lazy:
        cfg.train.output_dir = folder
        return
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.OUTPUT_DIR = folder
    if was_frozen:
        cfg.freeze()


def new_eval_dir(run: str) -> str:
    """``run/eval/<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ... when that one exists already)."""
    if os.path.isdir(run):  # eval/ inside the run, writable, before the evaluation
        output_folder(run, EVAL_FOLDER, error=UsageError)
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
    if not ConfigView.of(cfg).lazy:
        cfg.freeze()
    default_setup(cfg, args)
    setup_d2ema_logger(run_dir(cfg))
    if getattr(args, "eval_only", False):
        logging.getLogger(__name__).info(
            "Evaluation only: its config, log and results go to %s (the run's %s keeps its "
            "config.yaml)", run_dir(cfg), run)
    return run


def _writable(folder: Path, key: str) -> None:
    """``folder`` is a folder this user can write, or can be made (its nearest existing parent
    is a writable folder)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == folder else f"is inside {probe}, which is a file"
        raise UsageError(f"{key} = {folder} {where}; give a folder (new or existing)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{key} = {folder} cannot be written ({probe} is read-only for this "
                         "user); give a folder you can write")


PREVIOUS = "previous-"
_WRITTEN = ("inference", "posthoc", EVAL_FOLDER)


def _earlier_files(cfg, settings: EMASettings | None = None) -> list[Path]:
    """What a training left in the run's folder that a new run would replace: its checkpoints,
    ``last_checkpoint`` and its snapshot series. ``settings``: the EMA settings already read."""
    from d2ema.d2.checkpoint.resume import TAG_FILE, checkpoint_candidates
    from d2ema.d2.engine.build import SNAPSHOT_FOLDER

    folder = output_dir(cfg)
    if not folder or "://" in folder or not Path(folder).is_dir():
        return []
    found = checkpoint_candidates(folder)
    if Path(folder, TAG_FILE).is_file():
        found.append(Path(folder, TAG_FILE))
    view = ConfigView.of(cfg)
    if settings is None and view.has_ema_node():
        settings = config_settings.ema_settings(cfg)
    posthoc = getattr(settings, "posthoc", None)
    series = Path(folder, getattr(posthoc, "dir", "") or SNAPSHOT_FOLDER)
    if (series / "index.json").is_file():
        found.append(series)
    return found


def earlier_run(cfg, settings: EMASettings | None = None) -> list[str]:
    """What another run left in the run's folder, in words (empty: nothing)."""
    files = _earlier_files(cfg, settings)
    checkpoints = [p for p in files if p.suffix == ".pth"]
    said = [f"{len(checkpoints)} checkpoints"] if checkpoints else []
    said += [f"{p.name}/ snapshots" for p in files if p.is_dir()]
    return said or [p.name for p in files]


def move_earlier_run(cfg) -> Path | None:
    """Move what another run left (`_earlier_files`) into ``OUTPUT_DIR/previous-<time>/``
    (``d2ema train --start-over``): renamed within the folder, nothing deleted or copied."""
    files = _earlier_files(cfg)
    if not files:
        return None
    aside = Path(output_dir(cfg), PREVIOUS + time.strftime("%Y%m%d-%H%M%S"))
    n = 0
    while aside.exists():
        n += 1
        aside = aside.with_name(f"{aside.name.split('.')[0]}.{n}")
    aside.mkdir()
    for path in files:
        target = aside / path.relative_to(output_dir(cfg))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    logging.getLogger(__name__).warning("--start-over: the earlier run's checkpoints and "
                                        "snapshots were moved into %s", aside)
    return aside


def check_output_dir(cfg, args, settings: EMASettings | None = None) -> None:
    """The run's output folder (and its snapshot folder) can be written, and a training has
    steps to run: checked before any process starts or anything is written. ``settings``: the
    EMA settings already read from ``cfg``."""
    view = ConfigView.of(cfg)
    key = view.name("output_dir")
    folder = view.output_dir
    if folder and "://" not in folder:
        _writable(Path(folder), key)
        no_links_out(folder, f"{key} = {folder}")  # no planted link makes a write land elsewhere
        for sub in _WRITTEN:  # nor a planted folder link (only OUTPUT_DIR and snapshots follow)
            if Path(folder, sub).is_symlink():
                output_folder(folder, sub, error=UsageError)
        if args.resume and Path(folder).is_dir():
            from d2ema.d2.checkpoint.resume import tagged_checkpoint

            tagged_checkpoint(folder)  # a last_checkpoint naming a file elsewhere: refused now
        settings = settings or config_settings.ema_settings(cfg)
        if settings.posthoc is not None and settings.posthoc.dir:
            _writable(Path(folder, settings.posthoc.dir), settings.key("POSTHOC.DIR"))
    if args.eval_only:
        return
    earlier = earlier_run(cfg, settings)
    if earlier and not args.resume and not getattr(args, "start_over", False):
        raise UsageError(
            f"{key} = {folder} holds another run ({', '.join(earlier)}), which a new run would "
            "replace; add --resume to continue it, train into another OUTPUT_DIR, or add "
            f"--start-over to move it into {Path(folder, PREVIOUS + '<time>')} first (nothing "
            "is deleted)")
    iters = view.max_iter
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        name = view.name("max_iter")
        raise UsageError(f"{name} = {iters!r}: a training needs at least 1 iteration; give a "
                         "whole number >= 1")
