"""Files a run folder names, kept inside that folder.

A run folder is data, not a set of instructions: ``last_checkpoint`` and the snapshot index
``index.json`` name files *in the folder*, and whoever edited them must not make d2ema read or
delete anything elsewhere. `confined` accepts a plain file name only (no folder part, no
``..``, not absolute) and, when the file exists, refuses a symbolic link whose target lies
outside the folder. Symbolic links inside the folder (e.g. a run folder that is itself a link,
or a snapshot linked to another file of the same folder) keep working.

Example::

    path = confined("output", "model_0000999.pth", "last_checkpoint")   # output/model_0000999.pth
    confined("output", "../x.pth", "last_checkpoint")                    # OutsideFolderError
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from d2ema.errors import D2EMAError, OutsideFolderError

__all__ = ['confined', 'escapes', 'no_links_out', 'output_folder', 'read_regular']


def escapes(folder: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """Whether ``path``, with every symbolic link followed, lies outside ``folder``."""
    root = os.path.realpath(folder)
    target = os.path.realpath(path)
    return os.path.commonpath([root, target]) != root


def confined(folder: str | os.PathLike[str], name: object, source: str) -> Path:
    """``folder / name`` if ``name`` is a plain file name whose file (if any) lies inside
    ``folder``; else `OutsideFolderError` naming ``source`` (what named it) and the fix."""
    folder = Path(folder)
    bad = None
    if not isinstance(name, str) or not name.strip():
        bad = "is not a file name"
    elif "\x00" in name or "/" in name or "\\" in name or name in (".", ".."):
        bad = "is not a plain file name in the folder (it has a folder part)"
    if bad is None:
        path = folder / name  # type: ignore[operator]  # a str: checked above
        if (path.exists() or path.is_symlink()) and escapes(folder, path):
            bad = f"is a symbolic link to {os.path.realpath(path)}, outside the folder"
    if bad is not None:
        raise OutsideFolderError(
            f"{source} names {name!r}, which {bad}; a run folder may only name its own files, "
            f"so nothing outside {folder} is read or deleted. Remove or fix that entry (or the "
            "link), or start the run in a new OUTPUT_DIR")
    return path


def no_links_out(folder: str | os.PathLike[str], what: str, depth: int = 3) -> None:
    """Refuse a file in ``folder`` (or in its folders, ``depth`` levels down) that is a symbolic
    link leading out of it: a command writing its outputs there (detectron2's config.yaml,
    log.txt and metrics.json; checkpoints; snapshots; evaluation results) would replace the
    file it points to. Linked folders are allowed: a run's folder, or a part of it, may live on
    another disk."""
    folder = Path(folder)
    todo = [(folder, 0)] if folder.is_dir() else []
    while todo:
        sub, level = todo.pop()
        try:
            entries = list(os.scandir(sub))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir():  # a linked folder (say, data on another disk) is not scanned
                if level + 1 < depth and not entry.is_symlink():
                    todo.append((Path(entry.path), level + 1))
            elif entry.is_symlink() and escapes(sub, entry.path):
                raise OutsideFolderError(
                    f"{entry.path} is a symbolic link to {os.path.realpath(entry.path)}, outside "
                    f"{what}: outputs are written there, so it would replace that file; remove "
                    "the link, or use another folder")


def read_regular(path: str | os.PathLike[str], limit: int, what: str, fix: str,
                 error: type[D2EMAError] = D2EMAError) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes; else
    ``error`` in one line naming ``what`` it should be and ``fix``.

    Opened without blocking and checked with ``fstat`` before any byte is read, so that a FIFO
    or a device named where a file is expected never hangs a command, and a huge (or sparse)
    file is refused instead of read. Example::

        text = read_regular("output/last_checkpoint", 4096, "last_checkpoint", "rewrite it",
                            CheckpointError).decode()
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}; {fix}") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {path} is not a regular file (a FIFO, device or folder); {fix}")
        if info.st_size > limit:
            raise error(f"{what} {path} is {info.st_size} bytes, more than the {limit} bytes "
                        f"one can be; {fix}")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # grew while read
            raise error(f"{what} {path} is more than {limit} bytes; {fix}")
        return b"".join(chunks)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}; {fix}") from e
    finally:
        os.close(fd)


def output_folder(run: str | os.PathLike[str], name: str, need: int = 0,
                  error: type[D2EMAError] = D2EMAError, scan: bool = True) -> Path:
    """The folder ``run/name`` that a command writes its results into, made ready before any
    long work whose result must be written: the one owner of every write into a run folder.

    Refused in one line (``error``), before anything is written: ``name`` (or a folder or file
    inside it, 3 levels down) a symbolic link leading out of ``run`` (only OUTPUT_DIR itself and
    ``ema_snapshots`` may be links); a folder this user cannot write (read-only disk,
    permissions: probed with a temporary file, removed at once); less than ``need`` bytes (plus
    1 MB) free there. ``scan=False``: a folder of the user's choosing (not a run's), whose
    contents are not scanned. Example::

        results = output_folder("output", "posthoc", need=checkpoint_bytes)   # output/posthoc
    """
    run = Path(run)
    folder = run / name
    if (folder.exists() or folder.is_symlink()) and escapes(run, folder):
        raise error(f"{folder} is a symbolic link to {os.path.realpath(folder)}, outside the run "
                    f"folder {run}: results are written there; remove the link (or make it a "
                    "folder)")
    todo = [(folder, 0)] if scan and folder.is_dir() else []
    while todo:
        sub, level = todo.pop()
        with os.scandir(sub) as entries:
            for entry in entries:
                if entry.is_symlink() and escapes(folder, entry.path):
                    raise error(f"{entry.path} is a symbolic link to "
                                f"{os.path.realpath(entry.path)}, outside {folder}: results are "
                                "written there; remove the link")
                if entry.is_dir(follow_symlinks=False) and level + 1 < 3:
                    todo.append((Path(entry.path), level + 1))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".d2ema-write-probe-"):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise error(f"cannot write into {folder} ({e.strerror or e}); its results would be lost: "
                    "make it writable, or copy the run to a folder you can write") from None
    if free < need + (1 << 20):
        raise error(f"{folder} has {free / 1e6:.1f} MB free, and the results need about "
                    f"{(need + (1 << 20)) / 1e6:.1f} MB; free some space first, or copy the run "
                    "to a larger disk")
    return folder
