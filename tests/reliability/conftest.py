"""The fault suite's tally, printed as ONE line at the end of every test run that includes it.

Tests add to it through the ``tally`` fixture: kills injected into trainings and resumes that
continued bit-exactly (test_kill_resume.py), bad inputs tried and refused cleanly (one
D2EMAError naming the key and value, nothing changed), and bytes of saved state lost; the
hostile-input tests (test_hostile_*.py, test_run_lock.py, test_disk_full.py) add what they
observed: marker files that a pickle or a config would have created (code executions), files
outside the run's folder created, changed or deleted, and second starts refused.
"""

from __future__ import annotations

import collections

import pytest

_TALLY: collections.Counter = collections.Counter()


@pytest.fixture
def tally() -> collections.Counter:
    return _TALLY


def summary_line(t: collections.Counter) -> str:
    return (
        f"reliability: {t['kills']} kills injected, {t['exact_resumes']} resumes continued "
        f"exactly, {t['bad_inputs']} bad inputs tried, {t['refused_cleanly']} refused cleanly, "
        f"{t['bytes_lost']} bytes of state lost"
        + (f", code executions {t['code_executions']}, files outside OUTPUT_DIR touched "
           f"{t['outside_touched']}, concurrent starts refused {t['concurrent_refused']}"
           if t["hostile_checks"] else "")
    )


def pytest_terminal_summary(terminalreporter) -> None:
    if _TALLY:
        terminalreporter.write_line(summary_line(_TALLY))
