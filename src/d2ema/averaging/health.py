"""Notice, without stalling the GPU or slowing the update, when an EMA first held NaN or Inf.

With ``skip_nonfinite=False`` (the default) one NaN weight poisons the average for good:
``lerp`` keeps a NaN forever (an Inf turns into NaN at the next update). `NonfiniteWatch`
finds the step at which that happened. A check is one ``sum`` over each averaged group (NaN and
Inf propagate through it; it is the cheapest full reduction), about a third to a half of an
update's memory traffic, so it runs every `NonfiniteWatch.every` updates (32: ~1-2% of the
update; benchmarks/results/update_speed.md) and its result stays on the device (a
``masked_fill_`` of a 0-d tensor: no host sync). When someone asks (a checkpoint save, an
evaluation, ``ema.meta()``) the EMA is checked exactly (``aminmax``; a sum of huge finite values
could overflow) and the answer is the step range the poisoning happened in: after the last
check that found the EMA finite, at or before the first that did not. Set ``every = 1`` for the
exact step at the cost of one more pass per update.

Example::

    watch = NonfiniteWatch()
    watch.observe(ema_groups, step)            # after each update
    step = watch.first_step(ema_groups, current_step)
    if step is not None:
        logger.warning(nonfinite_message(step, after=watch.last_finite_step))
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from d2ema.averaging.state import TensorGroup

__all__ = ['NONFINITE_FIX', 'NonfiniteWatch', 'nonfinite_message']


NONFINITE_FIX = ("EMA.skip_nonfinite",)  # the parameter nonfinite_message tells the user to set


class NonfiniteWatch:
    """The step at which the observed groups first held NaN or Inf (None: never)."""

    every: int = 32  # updates between checks (1: the exact step, one more pass per update)

    def __init__(self, first_step: int | None = None):
        self.reset(first_step)

    def reset(self, first_step: int | None = None) -> None:
        self._known = first_step
        self.last_finite_step = 0  # the poisoning happened after this step
        self._calls = 0
        self._checked = 0  # the step of the latest periodic check
        # per device, 0-d: the first step a check found non-finite (-1: none), and the last
        # step a check found finite
        self._flags: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def observe(self, groups: Iterable[TensorGroup], step: int, guarded: bool = False) -> None:
        """After the update of ``step``; ``guarded``: updates with NaN/Inf weights are skipped,
        so nothing non-finite gets in and there is nothing to watch."""
        if guarded or self._known is not None:
            return
        self._calls += 1
        if self._calls % self.every:
            return
        self._checked = step
        for g in groups:
            if not g.averaged or not g.flat.numel():
                continue
            bad = ~g.flat.sum().isfinite()
            if g.device not in self._flags:
                self._flags[g.device] = (
                    torch.full((), -1, device=g.device), torch.zeros((), device=g.device)
                )
            first, last_ok = self._flags[g.device]
            last_ok.masked_fill_(~bad & (first < 0), step)
            first.masked_fill_(bad & (first < 0), step)

    def first_step(self, groups: Iterable[TensorGroup], now: int | None = None) -> int | None:
        """The first step seen non-finite (synchronises with the device). With ``now``, the
        EMA's current step, the EMA is also checked exactly as it is now."""
        if self._known is not None:
            return self._known
        groups = list(groups)
        flagged = [(int(f), int(ok)) for f, ok in self._flags.values() if int(f) >= 0]
        if not flagged and now is None:
            return None
        if _nonfinite(groups):
            if flagged:
                self._known = min(f for f, _ in flagged)
                self.last_finite_step = max(
                    [self.last_finite_step] + [ok for _, ok in flagged if ok < self._known]
                )
            else:  # every periodic check found it finite
                self._known = now
                self.last_finite_step = max(self.last_finite_step, self._checked)
        elif now is not None:
            self.last_finite_step = now
        self._flags.clear()  # confirmed, or a sum of huge finite values overflowed
        return self._known

    def meta(self, groups: Iterable[TensorGroup], now: int | None = None) -> dict[str, int]:
        """``{"nonfinite_step": step}`` for a checkpoint's ``ema_meta`` of a poisoned EMA."""
        step = self.first_step(groups, now)
        return {} if step is None else {"nonfinite_step": step}


def _nonfinite(groups: Iterable[TensorGroup]) -> bool:
    for g in groups:
        if g.averaged and g.flat.numel():
            low, high = torch.aminmax(g.flat)
            if not (low.isfinite() and high.isfinite()):
                return True
    return False


def nonfinite_message(step: int, where: str = "", after: int | None = None) -> str:
    """One line for the log: since when the EMA is unusable, and what to do. ``after``: the
    last step at which it was seen finite, when the step is known only as a range."""
    at = f" ({where})" if where else ""
    exact = after is None or after >= step - 1
    since = (f"since step {step}" if exact or after is None
             else f"since one of steps {after + 1}..{step}")
    first = step if after is None else after + 1
    return (
        f"the EMA has held NaN/Inf {since}{at}: a NaN/Inf weight then poisoned the average, "
        "so EMA results and exports from now on are meaningless. Resume from a checkpoint "
        f"before step {first} with EMA(skip_nonfinite=True) to skip such updates"
    )
