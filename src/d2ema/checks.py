"""Checks of `EMA`'s arguments, run before anything is allocated.

A wrong argument raises `ConfigError` (a ``ValueError``) that names the
argument, the value given and what is allowed, instead of a bare ``AttributeError`` from deep
inside, or worse, an EMA that silently does the wrong thing (``master_dtype=torch.int32``
rounds every weight to an integer; ``device="meta"`` keeps no data at all).

Example::

    >>> check_ema_arguments(nn.Linear(2, 2), decay=True)
    Traceback (most recent call last):
    d2ema.errors.ConfigError: EMA argument decay = True must be a number in [0, 1], not a bool
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from d2ema.averaging.state import Slot, unwrap_model
from d2ema.errors import ConfigError
from d2ema.schedules import Schedule
from d2ema.versions import require_torch

__all__ = ["check_ema_arguments", "check_slots", "check_step", "compile_patterns"]


def _fail(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"EMA argument {name} = {value!r} {allowed}")


def compile_patterns(patterns: Sequence[str], what: str) -> list[re.Pattern]:
    """Compile ``exclude`` patterns; refuse a non-string, an invalid one, and one that matches
    every name (it matches the empty string, like ``""`` or ``".*"``)."""
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise ConfigError(f"{what} = {list(patterns)!r}: {p!r} is not a string; give "
                              "regular expressions of tensor names, e.g. ['num_batches_tracked']")
        try:
            pattern = re.compile(p)
        except re.error as e:
            raise ConfigError(f"{what}: {p!r} is not a valid regular expression ({e})") from e
        if pattern.search("") is not None:
            raise ConfigError(f"{what}: {p!r} matches every tensor name (it matches the empty "
                              "string), so nothing would be averaged; anchor it, e.g. r'\\.bias$'")
        compiled.append(pattern)
    return compiled


def check_ema_arguments(
    model: Any,
    *,
    decay: Any = 0.9998,
    schedule: Any = "constant",
    schedule_params: Any = None,
    every: Any = 1,
    start: Any = 0,
    exclude: Any = (),
    device: Any = None,
    master_dtype: Any = torch.float32,
    **flags: Any,
) -> tuple[tuple[str, ...], torch.device | None]:
    """Validate `EMA`'s arguments; return ``(exclude, device)`` normalised.

    ``flags`` are the boolean arguments (``include_frozen``, ``skip_nonfinite``, ...).
    """
    require_torch("d2ema's EMA")
    if not isinstance(model, nn.Module):
        raise _fail("model", type(model).__name__, "is not a torch.nn.Module; pass the model "
                    "whose weights to average (DDP and torch.compile wrappers are fine)")
    bad = not isinstance(decay, numbers.Real) or isinstance(decay, bool)
    if bad or not (math.isfinite(decay) and 0.0 <= decay <= 1.0):
        raise _fail("decay", decay, "must be a number in [0, 1]" + (", not a bool" if
                    isinstance(decay, bool) else ", e.g. 0.9998"))
    if not isinstance(schedule, (str, Schedule, Mapping)) and not callable(schedule):
        raise _fail("schedule", schedule, "must be a schedule name, a Schedule or a callable "
                    "n -> decay")
    if schedule_params is not None and not isinstance(schedule_params, Mapping):
        raise _fail("schedule_params", schedule_params, "must be a dict of the schedule's "
                    "parameters, e.g. {'tau': 2000}")
    for name, value, low in (("every", every, 1), ("start", start, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise _fail(name, value, f"must be an integer >= {low}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise _fail(name, value, "must be True or False")
    exclude = (exclude,) if isinstance(exclude, str) else exclude
    if not isinstance(exclude, Sequence):
        raise _fail("exclude", exclude, "must be a list of regular expressions")
    compile_patterns(exclude, "EMA argument exclude")
    if master_dtype is not None and not (
        isinstance(master_dtype, torch.dtype) and master_dtype.is_floating_point
    ):
        raise _fail("master_dtype", master_dtype, "must be a floating torch.dtype "
                    "(torch.float32, torch.float64) or None (keep the model's dtypes)")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise _fail("device", device, "is not a device ('cpu', 'cuda', 'cuda:1', ...)") from e
        if device.type == "meta":
            raise _fail("device", str(device), "holds no data; give 'cpu', 'cuda', ... or None "
                        "(each tensor's own device)")
    return tuple(exclude), device


def check_slots(model: nn.Module, slots: list[Slot], exclude: Sequence[str]) -> list[Slot]:
    """``slots``; refuses a model with nothing to track, or whose tensors have no data."""
    if not slots:
        why = f" (exclude={list(exclude)!r} matches all of them)" if exclude else ""
        raise ConfigError(f"the model has no tensors to track{why}; check include_frozen, "
                          "include_buffers and exclude")
    empty = [s.name for s in slots if s.get().device.type == "meta"]
    if empty:
        raise ConfigError(
            f"the model's tensors are on the meta device and hold no data ({empty[0]}, ...); "
            f"build the EMA after materialising {type(unwrap_model(model)).__name__} "
            "(model.to_empty(device=...) and load its weights)"
        )
    return slots


def check_step(step: Any, current: int) -> int:
    """``update(step=...)``: an integer >= 0 (an iteration number, 1-based)."""
    if step is None:
        return current + 1
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise _fail("step", step, "must be an integer >= 0 (the 1-based optimizer step)")
    if step < 0:
        raise _fail("step", step, "must be >= 0 (the 1-based optimizer step)")
    return int(step)

