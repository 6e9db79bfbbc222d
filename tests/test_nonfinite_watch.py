"""The default NaN watch checks every 32 updates (a full pass over the EMA costs a third to a
half of an update) and confirms exactly when asked: the step is reported as a range that always
contains the update that poisoned the average."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from d2ema import EMA
from d2ema.averaging.health import NonfiniteWatch, nonfinite_message


def _run(poison_at: int | None, steps: int) -> EMA:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9)
    for step in range(1, steps + 1):
        with torch.no_grad():
            model[0].weight.add_(0.01)
            if step == poison_at:
                model[0].weight[1, 2] = float("nan")
        ema.update(model)
    return ema


@pytest.mark.parametrize(
    ("poison_at", "steps", "seen", "after"),
    [
        (5, 40, 32, 0),  # flagged by the check at update 32; no finite check before it
        (40, 70, 64, 32),  # finite at the check of 32, flagged at 64
        (66, 70, 70, 64),  # after the last periodic check: found by the exact check when asked
        (None, 70, None, 70),
    ],
)
def test_default_watch_reports_a_range_holding_the_poisoned_update(poison_at, steps, seen, after):
    assert NonfiniteWatch.every == 32
    ema = _run(poison_at, steps)
    assert ema.nonfinite_step == seen
    assert ema.nonfinite_after == after
    if poison_at is not None:
        assert after < poison_at <= seen
        assert ema.meta()["nonfinite_step"] == seen
        line = nonfinite_message(seen, "saving model.pth", after)
        assert f"steps {after + 1}..{seen}" in line and f"before step {after + 1}" in line
    else:
        assert "nonfinite_step" not in ema.meta()


def test_checks_run_every_32_updates_only(monkeypatch):
    sums = []
    real_sum = torch.Tensor.sum

    def counting_sum(self, *args, **kwargs):
        sums.append(self.numel())
        return real_sum(self, *args, **kwargs)

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    monkeypatch.setattr(torch.Tensor, "sum", counting_sum)
    ema = EMA(model, decay=0.9)
    for _ in range(64):
        ema.update(model)
    assert len(sums) == 2  # at updates 32 and 64, one averaged group each



@pytest.mark.parametrize("flat", [False, True])
def test_guard_is_not_fooled_by_an_overflowing_sum(flat):
    """skip_nonfinite's cheap check is a sum (a 2-norm without a flat view): huge finite
    weights overflow it, and the exact check then lets the update through."""
    model = nn.Linear(1000, 1000, bias=False)
    with torch.no_grad():
        model.weight.fill_(3e35)  # sum 3e41 and squares overflow float32
    ema = EMA(model, decay=0.5, skip_nonfinite=True, flat=flat)
    with torch.no_grad():
        model.weight.mul_(0.5)
    ema.update(model)
    assert ema.num_skipped == 0
    torch.testing.assert_close(ema.tensors()["weight"], torch.full((1000, 1000), 2.25e35))
    with torch.no_grad():
        model.weight[3, 4] = float("inf")
    ema.update(model)
    assert ema.num_skipped == 1
