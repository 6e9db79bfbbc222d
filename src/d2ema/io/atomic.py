"""Write a file so that it is either complete or absent: never truncated under its final name.

`atomic_save` (``torch.save``) and `atomic_write_text` write to a temporary file in
the target's folder, flush it to disk (``fsync``), give it the mode the target would get, rename
it into place and ``fsync`` the folder, so that the rename itself survives a power cut. A crash,
a kill or a full disk at any point leaves the old file (if any) intact and at most a hidden
temporary file ``.NAME.HOST.PID.XXXX.tmp``: removed at once when Python still runs (exceptions,
and SIGTERM/SIGHUP under `d2ema.io.interrupts.signals_as_interrupts`), and by the next write
into the same folder once process PID is gone (SIGKILL, power loss).

The target must be a regular file or absent: a folder, FIFO, device node or socket at that path
is refused, never replaced; a symbolic link is followed (the file it points to is replaced).

Example::

    atomic_save({"model": model.state_dict()}, Path("out/model_final.pth"))
    atomic_write_text("model_final.pth", Path("out/last_checkpoint"))
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_files",
    "atomic_write_text",
    "check_target",
    "file_mode",
    "remove_stale_temps",
]


_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"


_TEMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


_KINDS = {stat.S_ISDIR: "folder", stat.S_ISFIFO: "FIFO", stat.S_ISCHR: "character device",
          stat.S_ISBLK: "block device", stat.S_ISSOCK: "socket"}


def file_mode(path: Path) -> int:
    """The mode an existing ``path`` has, else what a new file gets under the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def check_target(output: str | os.PathLike[str]) -> Path:
    """``output`` with symbolic links followed; ``OSError`` unless a regular file or absent."""
    path = Path(output)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return path
    for test, kind in _KINDS.items():
        if test(mode):
            code = errno.EISDIR if kind == "folder" else errno.EEXIST
            raise OSError(code, f"it is a {kind}, not a regular file; it is never replaced. "
                          "Write to a regular file instead", str(path))
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that killed writers of this host left in ``folder``."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _TEMP.match(entry.name)
            if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _alive(
                int(m["pid"])
            ):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


class _Recorder:
    """A file wrapper that remembers what stopped a write: ``torch.save`` turns an exception in
    its writer into an opaque ``RuntimeError`` ("unexpected pos ..."), losing "No space left"
    and even a Ctrl-C or SIGTERM."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.error: BaseException | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except BaseException as e:  # OSError (disk full), or KeyboardInterrupt (a signal)
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _interrupt_behind(error: BaseException) -> BaseException | None:
    """The KeyboardInterrupt (Ctrl-C, or SIGTERM/SIGHUP under signals_as_interrupts) that
    ``error`` was raised while handling, if any: torch.save's zip writer masks one raised in
    its own Python code with a RuntimeError of its ``__exit__``."""
    seen: BaseException | None = error.__context__
    for _ in range(16):
        if seen is None or isinstance(seen, KeyboardInterrupt):
            return seen
        seen = seen.__context__
    return None


def _create(tmp: Path) -> int:
    """Create ``tmp``, which must not exist; its descriptor, open for writing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return os.open(tmp, flags | getattr(os, "O_CLOEXEC", 0), 0o600)


def _stage(output: str | os.PathLike[str], write: Callable[[Any], None]) -> tuple[Path, Path]:
    """Write a complete, synced temporary file next to ``output``: ``(temporary, target)``."""
    path = check_target(output)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    tmp: Path | None = None
    try:
        # the name is known before the file exists, so an interrupt at any instant finds it
        for _ in range(100):
            tmp = folder / f".{path.name}.{_HOST}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
            try:
                fd = _create(tmp)
                break
            except FileExistsError:
                tmp = None
        else:
            raise FileExistsError(f"no free temporary file name in {folder}")
        with os.fdopen(fd, "wb") as f:
            recorder = _Recorder(f)
            try:
                write(recorder)
            except Exception as e:
                if recorder.error is not None:
                    raise recorder.error from e
                interrupt = _interrupt_behind(e)
                if interrupt is not None:
                    raise interrupt from e
                raise
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode(path))  # created 0600; give what open() would
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    return tmp, path


def _commit(staged: list[tuple[Path, Path]]) -> None:
    """Rename the staged files into place (removing every one left on failure), then make the
    renames durable (fsync of the folders, not possible everywhere)."""
    try:
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    for folder in dict.fromkeys(path.parent for _, path in staged):
        with contextlib.suppress(OSError):
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def _write_atomically(output: str | os.PathLike[str], write: Callable[[Any], None]) -> None:
    _commit([_stage(output, write)])


def atomic_write_files(files: list[tuple[str | os.PathLike[str], Any]]) -> None:
    """Write several files as a group: ``(path, obj)`` pairs, ``obj`` a ``str`` (UTF-8 text) or
    anything else (``torch.save``). Every file is written to its temporary file first; only
    when all are complete are they renamed into place, so a full disk (or any error) while
    writing leaves every target as it was.

    Example::

        atomic_write_files([("ema.pth", {"model": state}), ("ema.yaml", config_text)])
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for output, obj in files:
            if isinstance(obj, str):
                data = obj.encode("utf-8")
                staged.append(_stage(output, lambda f, d=data: f.write(d)))  # type: ignore[misc]
            else:
                staged.append(_stage(output, lambda f, o=obj: torch.save(o, f)))  # type: ignore[misc]
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    _commit(staged)


def atomic_save(obj: Any, output: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to a temporary file next to ``output``, then rename it into place.

    Raises ``OSError`` (the folder cannot be made, the disk is full, the target is a special
    file, ...) with no file left behind and ``output`` unchanged.
    """
    _write_atomically(output, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, output: str | os.PathLike[str]) -> None:
    """Write ``text`` (UTF-8) to ``output`` atomically, like `atomic_save`."""
    atomic_write_bytes(text.encode("utf-8"), output)


def atomic_write_bytes(data: bytes, output: str | os.PathLike[str]) -> None:
    """Write ``data`` to ``output`` atomically, like `atomic_save` (e.g. a PNG)."""
    _write_atomically(output, lambda f: f.write(data))
