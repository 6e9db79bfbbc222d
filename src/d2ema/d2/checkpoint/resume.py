"""Which checkpoint a resumed run loads: the tagged one if it is complete, else the newest
complete one, so that one damaged file never costs more than the steps since the one before.

A training folder holds checkpoints named ``PREFIX_0000123.pth`` / ``PREFIX_final.pth`` and a
text file ``last_checkpoint`` naming the newest. d2ema writes both atomically
(`d2ema.io.atomic`), but a folder may come from elsewhere: a run of another tool killed while
it wrote, a disk that filled up, a copy cut short. `find_resume_checkpoint` reads the
tagged checkpoint and, when that one is missing, truncated, unreadable or not complete, the
others from the newest down, and says in a warning which it took instead. Every candidate, the
tagged one included, must be a dict with ``model`` and ``iteration`` (what a trainer saves), so
an export (``d2ema export``, ``{"model": ...}``) or a stray file never becomes a resume point.

Example::

    found = find_resume_checkpoint("output")
    if found.warning:
        logger.warning(found.warning)
    checkpoint = found.checkpoint         # already loaded: no second read
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from d2ema.errors import CheckpointError, D2EMAError, one_line
from d2ema.io.confined import confined, escapes, read_regular
from d2ema.io.format import checkpoint_problems

__all__ = [
    "TAG_FILE",
    "ResumePoint",
    "checkpoint_candidates",
    "find_resume_checkpoint",
    "read_checkpoint",
    "tagged_checkpoint",
]


TAG_FILE = "last_checkpoint"


_NAME = re.compile(r"^.+_(?P<iter>\d+|final)\.pth$")


class _Unreadable(CheckpointError):
    def __init__(self, path: str | os.PathLike[str], problem: str):
        super().__init__(f"checkpoint {path} {problem}")
        self.problem = problem


def read_checkpoint(path: str | os.PathLike[str],
                    error: type[D2EMAError] | None = None) -> Any:
    """The one reader of a checkpoint file (training, EMA or export), for every command:
    a regular file (a FIFO or device is never opened), ``torch.load``-ed to the CPU as plain data
    (``weights_only``), then checked whole (`d2ema.io.format.checkpoint_problems`: tensor
    kinds, meta tensors, format version, step bounds) before any of it is used. Any failure is
    one line naming the file and the reason: `CheckpointError`, or ``error``."""
    try:
        try:
            info = os.stat(path)
        except OSError as e:
            raise _Unreadable(path, f"cannot be read ({e.strerror or e})") from e
        if not stat.S_ISREG(info.st_mode):
            raise _Unreadable(path, "is not a regular file (a FIFO, device or folder)")
        try:
            checkpoint = torch.load(path, map_location=torch.device("cpu"), weights_only=True)
        except OSError as e:
            raise _Unreadable(path, f"cannot be read ({e.strerror or e})") from e
        except Exception as e:
            # torch's own messages run on ("This is an internal miniz error. If you ..."): the
            # first sentence says it.
            reason = one_line(e).split(". ")[0][:120]
            raise _Unreadable(path, "is truncated or not a PyTorch checkpoint "
                              f"({type(e).__name__}{': ' + reason if reason else ''})") from e
        problems = checkpoint_problems(checkpoint)
        if problems:
            raise _Unreadable(path, "is refused: " + "; ".join(problems[:3]) + (
                f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
        return checkpoint
    except _Unreadable as e:
        if error is None:
            raise
        raise error(str(e)) from None


def checkpoint_candidates(folder: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint files of a training folder (``*_NNNNNNN.pth``, ``*_final.pth``), newest
    first (modification time, then the later iteration); links leading out of it are left out."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        m = _NAME.match(entry.name)
        if m and entry.is_file() and not escapes(folder, entry.path):
            order = float("inf") if m["iter"] == "final" else int(m["iter"])
            found.append((entry.stat().st_mtime_ns, order, Path(entry.path)))
    return [p for *_, p in sorted(found, key=lambda x: x[:2], reverse=True)]


@dataclasses.dataclass
class ResumePoint:
    path: Path
    checkpoint: Any  # the loaded checkpoint
    warning: str | None  # set when it is not the tagged one


def tagged_checkpoint(folder: str | os.PathLike[str]) -> tuple[Path | None, str]:
    """The checkpoint ``last_checkpoint`` names, or None and why not; OutsideFolderError if
    it names a file outside ``folder``."""
    folder = Path(folder)
    if not (folder / TAG_FILE).exists():
        return None, f"there is no {TAG_FILE}"
    try:  # a FIFO or a huge file named last_checkpoint: refused, never waited on or read
        name = read_regular(folder / TAG_FILE, 4096, TAG_FILE, "remove it (a resume then takes "
                            "the newest complete checkpoint)").decode("utf-8").strip()
    except D2EMAError as e:
        return None, str(e).split("; remove it")[0]
    except UnicodeDecodeError as e:
        return None, f"{TAG_FILE} cannot be read ({one_line(e)})"
    if not name:
        return None, f"{TAG_FILE} is empty"
    path = confined(folder, name, f"{folder / TAG_FILE}")
    if not path.is_file():
        return None, f"{TAG_FILE} names {name}, which does not exist"
    return path, ""


_TRAINING_STATE = ("iteration", "trainer", "optimizer", "scheduler")


def _complete(checkpoint: Any, need_iteration: bool) -> bool:
    """A training checkpoint: ``model`` and training state (what detectron2's checkpointers
    save beside it); a weights-only file (``{"model": ...}``, an export) is not."""
    return isinstance(checkpoint, Mapping) and "model" in checkpoint and (
        not need_iteration or any(k in checkpoint for k in _TRAINING_STATE)
    )


def find_resume_checkpoint(folder: str | os.PathLike[str]) -> ResumePoint:
    """The checkpoint to resume from; `CheckpointError` if the folder has none complete."""
    folder = Path(folder)
    tagged, why = tagged_checkpoint(folder)
    if tagged is not None:
        try:
            checkpoint = read_checkpoint(tagged)
        except _Unreadable as e:
            why = f"{TAG_FILE} names {tagged.name}, which {e.problem}"
        else:
            if _complete(checkpoint, need_iteration=True):
                return ResumePoint(tagged, checkpoint, None)
            why = (f"{TAG_FILE} names {tagged.name}, which is not a training checkpoint "
                   "('model' but no iteration, trainer or optimizer state: weights only, e.g. a "
                   "d2ema export)")
    for path in checkpoint_candidates(folder):
        if tagged is not None and path == tagged:
            continue
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError:
            continue
        if _complete(checkpoint, need_iteration=True):
            return ResumePoint(path, checkpoint, f"{why}; resuming from {path.name} instead, "
                               "the newest complete checkpoint in the folder")
    raise CheckpointError(
        f"cannot resume from {folder}: {why}, and no other complete checkpoint is there; "
        "nothing was loaded. Restore a training checkpoint, or start a new run without --resume "
        "(--start-over moves this one aside; or another OUTPUT_DIR; MODEL.WEIGHTS for weights)"
    )
