"""Write a file so that it is either complete or absent: never truncated under its final name.

:func:`atomic_save` writes to a temporary file in the target's folder, flushes it to disk,
gives it the mode the target would get, and renames it into place. A crash, a kill or a full
disk at any point leaves the old file (if any) intact and at most a hidden temporary file,
which is removed whenever Python still runs its cleanup.

Example::

    atomic_save({"model": model.state_dict()}, Path("out/model_final.pth"))
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["atomic_save", "atomic_write_text", "file_mode"]


def file_mode(path: Path) -> int:
    """The mode an existing ``path`` has, else what a new file gets under the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_save(obj: Any, output: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to a temporary file next to ``output``, then rename it into place.

    Raises ``OSError`` (the folder cannot be made, the disk is full, ...) with no file left
    behind and ``output`` unchanged.
    """
    _write_atomically(output, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, output: str | os.PathLike[str]) -> None:
    """Write ``text`` (UTF-8) to ``output`` the same way as :func:`atomic_save`."""
    _write_atomically(output, lambda f: f.write(text.encode("utf-8")))


def _write_atomically(output: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> None:
    output = Path(output)
    folder = output.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode(output))  # mkstemp makes 0600; give what open() would
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
