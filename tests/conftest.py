"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
from _loggers import loggers_restored


@pytest.fixture
def restore_loggers():
    """:func:`loggers_restored` around a test."""
    with loggers_restored():
        yield
