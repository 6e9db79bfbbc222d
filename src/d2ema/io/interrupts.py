"""SIGTERM and SIGHUP as exceptions, so that ``finally`` blocks run and temporary files go.

By default these signals end Python at once: no ``finally``, no ``except BaseException``, so a
half-written temporary file of `d2ema.io.atomic` would stay behind. Inside
`signals_as_interrupts` they raise `Interrupted`, a ``KeyboardInterrupt``, so that
whatever cleans up after Ctrl-C cleans up after them too. Signals whose handler someone else
set are left alone; SIGKILL cannot be caught (its leftovers are removed by the next write into
the same folder: `d2ema.io.atomic.remove_stale_temps`).

Example::

    with signals_as_interrupts():
        atomic_save(state, "out/model_ema.pth")     # `kill PID` leaves no .tmp file
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ['Interrupted', 'exit_line', 'exit_status', 'signals_as_interrupts']


_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


class Interrupted(KeyboardInterrupt):
    """A signal (SIGTERM, SIGHUP) that asked the process to stop."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


def exit_line(prog: Callable[[], str]) -> Callable[[int, Any], None]:
    """A handler for a process whose work is over and that is exiting (the interpreter's
    shutdown takes seconds with torch loaded): SIGTERM/SIGHUP then print ``PROG: interrupted by
    SIGTERM while exiting`` and end it with 128 + the signal, as during the work, instead of
    ending it with no word. Give it as ``signals_as_interrupts(then=...)``."""
    def late(signum: int, frame: Any) -> None:
        with contextlib.suppress(Exception):  # what the command printed comes first
            sys.stdout.flush()
            sys.stderr.flush()
        name = signal.Signals(signum).name
        os.write(2, f"{prog()}: interrupted by {name} while exiting\n".encode())
        os._exit(128 + signum)
    return late


@contextlib.contextmanager
def signals_as_interrupts(then: Callable[[int, Any], None] | None = None) -> Iterator[None]:
    """Inside: SIGTERM and SIGHUP (when at their default action) raise `Interrupted`.
    After: their default again, or ``then`` (set in the same call, so that no signal can arrive
    in between and end the process with no word; see `exit_line`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in _SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, then or handler)
