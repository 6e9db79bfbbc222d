"""Smoke tests of the speed benchmarks (d2ema.app.speed): they run, every d2ema row does the
work it claims (its average equals the foreach baseline's), and the reports are complete."""

from __future__ import annotations

import re

from torch import nn

from d2ema.app.speed import methods, train_step, update_speed
from d2ema.app.speed.methods import DEFAULT, FLAT


def test_update_speed_quick_report(monkeypatch):
    tiny = lambda: nn.Sequential(*(nn.Linear(8, 8) for _ in range(50)))  # noqa: E731
    for table, value in ((methods.MODELS, tiny), (methods.MODEL_TITLES, "50 × Linear(8, 8)")):
        monkeypatch.setitem(table, "tiny50", value)
    report = update_speed.run(["tiny50"], quick=True, threads=1, peers=False, log=lambda s: None)
    for row in ("floor: one lerp_", FLAT, DEFAULT, "seed loop", "foreach lerp_"):
        assert f"| {row}" in report, row
    assert "max |d2ema − foreach lerp_| after the run: 0.00e+00" in report
    assert "100/100 float tensors inside the block point into EMA storage" in report
    assert re.search(r"EMATrainer default ≤ 2\.00× floor", report)
    assert "GB/s" in report and "memory bandwidth" in report


def test_train_step_runs_every_variant():
    report = train_step.run(
        "cpu", arch="r18", size=64, batch=1, iters=1, rounds=1, warmup=0, threads=1,
        log=lambda s: None,
    )
    rows = [line for line in report.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split("|")[1].strip() for r in rows] == list(train_step.CPU_VARIANTS)
    assert "| off |" in report and "**1.000**" in report
    # every EMA variant timed its update alone
    for r in rows[1:]:
        assert float(r.split("|")[5]) > 0, r
