"""Test helper: undo the console handlers detectron2's default_setup() adds to its loggers."""

from __future__ import annotations

import contextlib
import logging
import sys


@contextlib.contextmanager
def loggers_restored():
    """detectron2's default_setup() adds console handlers bound to the test's captured stdout;
    drop the ones added inside, so that later tests do not write to a closed stream."""
    names = ("detectron2", "fvcore", "d2ema")
    saved = {n: list(logging.getLogger(n).handlers) for n in names}
    flags = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names}
    _forget_setup_logger_calls()
    try:
        yield
    finally:
        for name, handlers in saved.items():
            logger = logging.getLogger(name)
            for h in [h for h in logger.handlers if h not in handlers]:
                logger.removeHandler(h)
            logger.level, logger.propagate = flags[name]
        _forget_setup_logger_calls()


def _forget_setup_logger_calls() -> None:
    """detectron2's setup_logger and its log-file streams are memoised on their (relative) paths:
    a second run in this process with OUTPUT_DIR "output" in another folder would otherwise write
    its log.txt into the first run's folder."""
    d2_logger = sys.modules.get("detectron2.utils.logger")
    if d2_logger is not None:
        d2_logger.setup_logger.cache_clear()
        d2_logger._cached_log_stream.cache_clear()
