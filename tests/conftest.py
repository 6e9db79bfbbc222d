"""Shared pytest fixtures."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def restore_loggers():
    """detectron2's default_setup() adds console handlers bound to the test's captured stdout;
    drop the ones a test added, so that later tests do not write to a closed stream."""
    names = ("detectron2", "fvcore", "d2ema")
    saved = {n: list(logging.getLogger(n).handlers) for n in names}
    yield
    for name, handlers in saved.items():
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if h not in handlers]:
            logger.removeHandler(h)
