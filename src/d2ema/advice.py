"""Warn about an EMA that will still mostly be its starting weights when training ends.

A classic EMA with constant decay ``d`` and no ramp keeps ``d**n`` of the weights it started
from after ``n`` updates: 0.999**800 = 45%, so a short run's EMA is mostly random (or
pretrained) initialisation, and evaluating it shows no detections at all. This is the most
common wrong guess (D2Go's default is 0.999 without a ramp); :func:`initial_share_warning`
says so when training starts, with the fix.

Example::

    message = initial_share_warning(ema, total_steps=800)
    if message:
        logger.warning(message)
"""

from __future__ import annotations

from .ema import EMA
from .schedules import Constant

__all__ = ["WARN_SHARE", "initial_share", "initial_share_warning"]

WARN_SHARE = 0.01  # warn when the starting weights keep more than this share at the end


def initial_share(ema: EMA, total_steps: int) -> float:
    """The weight the EMA's starting weights (those at step ``start``) still have at step
    ``total_steps``: the product of the decays of every update until then."""
    n = total_steps - ema.start
    if n <= 0:
        return 1.0
    if isinstance(ema.schedule, Constant):
        return ema.decay ** ((n // ema.every) * ema.every)
    share = 1.0
    for k in range(ema.every, n + 1, ema.every):
        share *= ema.decay_at(ema.start + k)
        if share < 1e-9:  # ramps and power EMAs get here within a few updates
            return share
    return share


def initial_share_warning(ema: EMA, total_steps: int, name: str = "the EMA",
                          keys: str = "MODEL_EMA.") -> str | None:
    """A warning with the fix if ``ema`` keeps more than :data:`WARN_SHARE` of its starting
    weights at ``total_steps``, else None. ``keys`` prefixes the config keys it names."""
    share = initial_share(ema, total_steps)
    if share <= WARN_SHARE:
        return None
    n = total_steps - ema.start
    constant = isinstance(ema.schedule, Constant)
    formula = f" ({ema.decay:g}**{n})" if constant else ""
    ramp = f"a ramp ({keys}SCHEDULE yolov5), " if constant else ""
    return (
        f"{name} (decay {ema.decay:g}, schedule {ema.meta()['schedule']}) will still be "
        f"{share:.0%} its starting weights after {n} steps{formula}: it would mostly show the "
        f"initial (random or pretrained) weights. Use {ramp}a power EMA ({keys}SCHEDULE "
        f"sigma_rel, {keys}SIGMA_REL 0.05, which adapts to the run length), or a decay of at "
        f"most {WARN_SHARE ** (1 / max(n, 1)):.4f} for this run"
    )
