"""One training per OUTPUT_DIR: the main process holds a lock on ``OUTPUT_DIR/.d2ema.lock``.

Two trainings writing into one folder interleave their checkpoints and snapshot series, and
each deletes what it takes for the other's leftovers. :func:`run_lock` takes an exclusive
``flock`` on a file in OUTPUT_DIR before anything is written there, and holds it until the
training ends; the kernel releases it when the process ends in any way (a SIGKILL or a power
cut leaves no stale lock). A second start refuses with :class:`~d2ema.errors.RunLockedError`,
naming the holder's PID (written into the lock file). The lock is taken by the process that
launches the workers, so worker ranks never wait for it; in a multi-machine run only machine 0
takes it (a shared filesystem would otherwise refuse the other machines).

Example::

    with run_lock(cfg, args):
        launch(train_worker, ...)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import RunLockedError, UsageError

__all__ = ["LOCK_FILE", "output_dir", "run_lock"]

LOCK_FILE = ".d2ema.lock"


def output_dir(cfg) -> str:
    """``OUTPUT_DIR`` (yacs) or ``train.output_dir`` (LazyConfig)."""
    if hasattr(cfg, "OUTPUT_DIR"):
        return str(cfg.OUTPUT_DIR)
    return str(cfg.train.get("output_dir", "") if "train" in cfg else "")


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
        yield path
    finally:
        os.close(fd)  # releases the lock
