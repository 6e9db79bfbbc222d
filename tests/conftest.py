"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
from _loggers import loggers_restored


@pytest.fixture
def restore_loggers():
    """:func:`loggers_restored` around a test."""
    with loggers_restored():
        yield


def pytest_sessionfinish(session, exitstatus):
    """A passing run leaves no temporary folders: the post-hoc and distributed tests write GBs
    of checkpoints and snapshots (about 7 GB a run). Removed at the end of the session, not
    after each test (``tmp_path_retention_policy = "failed"``), since some tests use files
    an earlier one made (registered datasets); kept after a failure, to look at."""
    import shutil

    factory = getattr(session.config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None)
    if exitstatus == 0 and basetemp is not None and factory._given_basetemp is None:
        shutil.rmtree(basetemp, ignore_errors=True)
