"""Decay schedules: pure functions from the averaging step ``n`` (1, 2, 3, ...) to a decay.

The EMA update at averaging step ``n`` is ``ema = d(n) * ema + (1 - d(n)) * w``. Every schedule
is a small frozen dataclass: call it with ``n``, save it with :meth:`Schedule.to_dict`, rebuild it
with :func:`make_schedule`. Because a schedule depends on ``n`` alone, a run resumed with the
same step counter continues exactly.

=============  ==============================================================================
name           decay at averaging step ``n``
=============  ==============================================================================
``constant``   ``decay``
``yolov5``     ``decay * (1 - exp(-n / tau))``                     (YOLOv5's ramp; tau=2000)
``tf``         ``min(decay, (1 + n) / (warmup_factor + n))``       (TensorFlow, D2Go's
               ``DECAY_WARM_UP_FACTOR``)
``power``      ``clamp(1 - (1 + n / inv_gamma) ** -power, min_decay, decay)``   (timm, diffusers)
``sigma_rel``  ``(1 - 1 / n) ** (gamma + 1)``, gamma solved from the relative width
               ``sigma_rel`` (Karras et al. 2024, "Analyzing and Improving the Training
               Dynamics of Diffusion Models"); ``decay`` is not used.
=============  ==============================================================================

Example::

    >>> sched = make_schedule("yolov5", decay=0.9999, tau=2000)
    >>> round(sched(2000), 6)
    0.632057
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from d2ema.errors import ConfigError

__all__ = [
    "SCHEDULES",
    "Constant",
    "Power",
    "Schedule",
    "SigmaRel",
    "TFWarmup",
    "YOLOv5Ramp",
    "decay_over",
    "make_schedule",
    "sigma_rel_to_gamma",
]


def _check_number(
    what: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False
) -> None:
    """Refuse ``value`` unless it is a real number (not a bool) in the given range: a
    :class:`~d2ema.errors.ConfigError` (a ``ValueError``) naming it, the value and the range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (open_low and value == low) or value > high:
        bounds = f"{'(' if open_low else '['}{low}, {high}{']' if math.isfinite(high) else ')'}"
        raise ConfigError(f"{what} must be a finite number in {bounds}, got {value!r}")


def _check_decay(decay: float) -> None:
    _check_number("decay", decay, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Base class: ``schedule(n) -> decay`` for the averaging step ``n >= 1``."""

    name: ClassVar[str] = ""
    decay: float = 0.9998

    def __post_init__(self) -> None:
        _check_decay(self.decay)

    def __call__(self, n: int) -> float:
        raise NotImplementedError

    def decay_over(self, n: int, every: int) -> float:
        """The decay of one update that stands for ``every`` steps and ends at step ``n``.

        ``decay(n) ** every`` keeps the averaging horizon in steps the same.
        """
        return self(n) ** every

    def to_dict(self) -> dict[str, Any]:
        """The schedule as plain data: ``{"name": ..., **parameters}`` (saved in checkpoints)."""
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Constant(Schedule):
    name: ClassVar[str] = "constant"

    def __call__(self, n: int) -> float:
        return self.decay


@dataclasses.dataclass(frozen=True)
class YOLOv5Ramp(Schedule):
    """YOLOv5's exponential ramp: small decays early, when weights move fast."""

    name: ClassVar[str] = "yolov5"
    tau: float = 2000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number("yolov5 schedule: tau", self.tau, 0.0, open_low=True)

    def __call__(self, n: int) -> float:
        return self.decay * (1.0 - math.exp(-n / self.tau))


@dataclasses.dataclass(frozen=True)
class TFWarmup(Schedule):
    """``tf.train.ExponentialMovingAverage(num_updates=...)``; D2Go's ``DECAY_WARM_UP_FACTOR``."""

    name: ClassVar[str] = "tf"
    warmup_factor: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number("tf schedule: warmup_factor", self.warmup_factor, 1.0)

    def __call__(self, n: int) -> float:
        return min(self.decay, (1.0 + n) / (self.warmup_factor + n))


@dataclasses.dataclass(frozen=True)
class Power(Schedule):
    """timm's ``ModelEmaV3`` / diffusers' warm-up: ``1 - (1 + n / inv_gamma) ** -power``."""

    name: ClassVar[str] = "power"
    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    min_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number("power schedule: inv_gamma", self.inv_gamma, 0.0, open_low=True)
        _check_number("power schedule: power", self.power, 0.0, open_low=True)
        _check_number("power schedule: min_decay (at most decay)", self.min_decay, 0.0,
                      self.decay)

    def __call__(self, n: int) -> float:
        d = 1.0 - (1.0 + n / self.inv_gamma) ** -self.power
        return min(self.decay, max(self.min_decay, d))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent ``gamma`` of the power-function EMA whose relative width is ``sigma_rel``.

    Solves ``sigma_rel**2 = (gamma + 1) / ((gamma + 2)**2 * (gamma + 3))`` (Karras et al. 2024,
    eq. 3), i.e. the cubic ``gamma**3 + 7 gamma**2 + (16 - t) gamma + (12 - t) = 0`` with
    ``t = sigma_rel**-2``. On gamma > 0, the range of valid widths ``(0, 12**-0.5)``, the width
    falls monotonically, so bisection is exact to float precision.
    """
    _check_number("sigma_rel", sigma_rel, 0.0, 12**-0.5, open_low=True)
    if sigma_rel == 12**-0.5:
        raise ConfigError(f"sigma_rel must be below {12**-0.5:.4f}, got {sigma_rel!r}")
    t = sigma_rel**-2

    def cubic(g: float) -> float:
        return ((g + 7.0) * g + 16.0 - t) * g + 12.0 - t

    lo, hi = 0.0, 1.0
    while cubic(hi) < 0:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cubic(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class SigmaRel(Schedule):
    """Karras et al.'s power-function EMA: weights of step ``t`` proportional to ``t ** gamma``.

    Its width relative to training length stays ``sigma_rel`` at every point of training (a
    constant decay's width is fixed in steps instead). ``decay`` is ignored.
    """

    name: ClassVar[str] = "sigma_rel"
    sigma_rel: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "_gamma", sigma_rel_to_gamma(self.sigma_rel))

    @property
    def gamma(self) -> float:
        return self._gamma  # type: ignore[attr-defined]

    def __call__(self, n: int) -> float:
        return (1.0 - 1.0 / n) ** (self.gamma + 1.0)

    def decay_over(self, n: int, every: int) -> float:
        """``(1 - every / n) ** (gamma + 1)``: the exact power profile over the weights seen at
        steps ``every, 2 every, ..., n`` (``decay(n) ** every`` would widen it several-fold)."""
        return max(0.0, 1.0 - every / n) ** (self.gamma + 1.0)


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (Constant, YOLOv5Ramp, TFWarmup, Power, SigmaRel)
}


def decay_over(schedule: Schedule | Callable[[int], float], n: int, every: int) -> float:
    """The decay of one update that stands for ``every`` steps and ends at averaging step ``n``.

    ``decay(n) ** every`` (the same horizon in steps) for every schedule but ``sigma_rel``, whose
    ``(1 - every / n) ** (gamma + 1)`` keeps the exact power profile; a callable's value is
    checked to be in [0, 1].
    """
    if isinstance(schedule, Schedule):
        return float(schedule.decay_over(n, every))
    d = float(schedule(n))
    if not 0.0 <= d <= 1.0 or math.isnan(d):
        raise ValueError(f"EMA schedule returned decay {d!r} at step {n}; it must be in [0, 1]")
    return d**every


def make_schedule(
    schedule: str | Schedule | Mapping[str, Any] | Callable[[int], float] = "constant",
    decay: float | None = None,
    **params: Any,
) -> Schedule | Callable[[int], float]:
    """Build a schedule from a name (``"yolov5"``), a saved dict, or pass one through.

    ``decay`` and ``params`` fill the dataclass fields; an unknown name or parameter raises a
    ``ValueError`` that lists the valid ones. A plain callable ``n -> decay`` is accepted as
    is (it cannot be saved in a checkpoint).
    """
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, Mapping):
        params = {**schedule, **params}
        schedule = params.pop("name", None)
    if callable(schedule):
        return schedule
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ConfigError(
            f"unknown EMA decay schedule {schedule!r}; choose one of {sorted(SCHEDULES)}"
        )
    cls = SCHEDULES[schedule]
    if decay is not None:
        params["decay"] = decay
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"schedule {schedule!r} takes {sorted(allowed)}, not {unknown}")
    return cls(**params)
