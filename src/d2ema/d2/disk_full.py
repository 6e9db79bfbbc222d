"""A full disk during ``d2ema train``: one line and exit status 2, not a traceback.

Checkpoints and snapshots are written atomically (:mod:`d2ema.atomic`), so a full disk leaves
every earlier one intact and the run can be resumed once space is freed; their writers say so
themselves (:class:`~d2ema.errors.CheckpointError`, ``PostHocError``). Any other write that
fails for lack of space (detectron2's ``metrics.json``, an evaluation's output) becomes
:class:`DiskFullError` here.

Example::

    with disk_full_as_error("output"):
        trainer.train()
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from ..errors import D2EMAError

__all__ = ["DiskFullError", "disk_full_as_error", "is_disk_full"]

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


class DiskFullError(D2EMAError, OSError):
    """No space left for a training's output; earlier checkpoints are intact."""


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _FULL


@contextlib.contextmanager
def disk_full_as_error(folder: str) -> Iterator[None]:
    """Turn a full disk under the block into :class:`DiskFullError` (one line)."""
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
