"""Notice, without stalling the GPU, the step at which an EMA first held NaN or Inf.

With ``skip_nonfinite=False`` (the default) one NaN weight poisons the average for good:
``lerp`` keeps a NaN forever. :class:`NonfiniteWatch` records the first step whose update left
a NaN/Inf in the EMA. Each step adds one max-abs reduction per averaged group, and the result
stays on the device (a ``masked_fill_`` of a 0-d tensor), so there is no host sync; the step is
read only when someone asks (a checkpoint save, an evaluation, :func:`nonfinite_message`).

Example::

    watch = NonfiniteWatch()
    watch.observe(ema_groups, step)            # after each update
    if watch.first_step is not None:
        logger.warning(nonfinite_message(watch.first_step))
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .state import TensorGroup

__all__ = ["NonfiniteWatch", "nonfinite_message"]


class NonfiniteWatch:
    """The first step at which the observed groups held NaN or Inf (None: never)."""

    def __init__(self, first_step: int | None = None):
        self._known = first_step
        self._first: dict[torch.device, torch.Tensor] = {}

    @torch.no_grad()
    def observe(self, groups: Iterable[TensorGroup], step: int) -> None:
        if self._known is not None:
            return
        for g in groups:
            if not g.averaged or not g.flat.numel():
                continue
            finite = torch.linalg.vector_norm(g.flat, float("inf")).isfinite()
            first = self._first.get(g.device)
            if first is None:
                first = self._first[g.device] = torch.full((), -1, device=g.device)
            first.masked_fill_(~finite & (first < 0), step)

    @property
    def first_step(self) -> int | None:
        """The step (synchronises with the device, once a NaN was seen no more)."""
        if self._known is None and self._first:
            found = [int(t) for t in self._first.values() if int(t) >= 0]
            if found:
                self._known = min(found)
                self._first.clear()
        return self._known

    def reset(self, first_step: int | None = None) -> None:
        self._known, self._first = first_step, {}


def nonfinite_message(step: int, where: str = "") -> str:
    """One line for the log: since when the EMA is unusable, and what to do."""
    at = f" ({where})" if where else ""
    return (
        f"the EMA has held NaN/Inf since step {step}{at}: a NaN/Inf weight at that step "
        "poisoned the average, so EMA results and exports from now on are meaningless. Resume "
        f"from a checkpoint before step {step} with MODEL_EMA.SKIP_NONFINITE True "
        "(EMA(skip_nonfinite=True)) to skip such updates"
    )
