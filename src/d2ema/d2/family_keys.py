"""``MODEL_EMA.EXTRA_DECAYS``, ``EXTRA_SIGMA_RELS`` and ``POSTHOC.*``: read and checked for
:func:`~d2ema.d2.config.ema_settings` (the EMAs themselves are built in :mod:`d2ema.d2.family`;
``POSTHOC.SELECT`` runs in :mod:`d2ema.d2.posthoc_select`, which also checks, before training,
the selection set and that the snapshots will represent the ``SELECT_SIGMA_RELS``).

Example::

    extra = several_emas(values, key, schedule)   # {"extra_decays": (...), "posthoc": ...}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import PurePath
from typing import Any

from ..errors import ConfigError
from ..schedules import SigmaRel

__all__ = ["NUMBER_LISTS", "PostHocSettings", "several_emas"]

MIN_AUTO_PERIOD = 10  # iterations between snapshots at POSTHOC.PERIOD 0, at least
NUMBER_LISTS = ("EXTRA_DECAYS", "EXTRA_SIGMA_RELS", "POSTHOC.SIGMA_RELS",
                "POSTHOC.SELECT_SIGMA_RELS")  # checked here


@dataclasses.dataclass(frozen=True)
class PostHocSettings:
    """``MODEL_EMA.POSTHOC.*``, validated."""

    sigma_rels: tuple[float, ...]
    period: int  # 0: automatic, see period_for
    dtype: str
    dir: str
    select: bool = False  # choose the length at the end of training (d2.posthoc_select)
    select_sigma_rels: tuple[float, ...] = ()  # (): the default sweep
    select_on: str = ""  # "": DATASETS.TEST[0]

    def period_for(self, max_iter: int) -> int:
        """``PERIOD``, or for 0: about 100 snapshots in a run, never closer than
        :data:`MIN_AUTO_PERIOD` iterations. Each snapshot costs two fp32 copies of the model
        on disk; snapshots a few iterations apart hold almost the same averages, so a short
        run gains nothing from more (a 30-iteration run: 3 snapshots, not 30)."""
        return self.period or max(min(MIN_AUTO_PERIOD, max_iter), round(max_iter / 100), 1)



def _inside_output(v: dict[str, Any], key: Callable[[str], str]) -> str:
    """``POSTHOC.DIR``: a folder inside OUTPUT_DIR, given relative to it."""
    folder = str(v["POSTHOC.DIR"] or "")
    parts = PurePath(folder).parts
    if PurePath(folder).is_absolute() or ".." in parts or "\\" in folder:
        raise ConfigError(f"{key('POSTHOC.DIR')} = {folder!r} must be a folder inside OUTPUT_DIR, "
                          "given relative to it (no '..', not absolute), e.g. 'ema_snapshots'; "
                          "'' is OUTPUT_DIR/ema_snapshots")
    return folder


def several_emas(v: dict[str, Any], key: Callable[[str], str], schedule) -> dict[str, Any]:
    """``EXTRA_DECAYS``, ``EXTRA_SIGMA_RELS`` and ``POSTHOC.*``, validated."""

    def widths(name: str, lo: float, hi: float) -> tuple[float, ...]:
        values = v[name]
        values = [values] if isinstance(values, (int, float)) else values
        ok = isinstance(values, Sequence) and not isinstance(values, str)  # ListConfig too
        values = list(values) if ok else []
        ok = ok and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and lo < x < hi
            for x in values
        )
        if not ok or len(set(values)) != len(values):
            raise ConfigError(f"{key(name)} = {v[name]!r} must be a list of distinct numbers in "
                              f"({lo:g}, {hi:.4g}), e.g. [0.05, 0.1]")
        names = [f"{x:g}" for x in values]  # the EMAs' names and snapshot files use these
        if len(set(names)) != len(names):
            raise ConfigError(f"{key(name)} = {v[name]!r} has values that print the same with "
                              f"6 significant digits ({names}), so their EMAs would share one "
                              "name and one would be lost; use values that differ in the first "
                              "6 digits")
        return tuple(float(x) for x in values)

    out: dict[str, Any] = {
        "extra_decays": widths("EXTRA_DECAYS", 0.0, 1.0),
        "extra_sigma_rels": widths("EXTRA_SIGMA_RELS", 0.0, 12**-0.5),
    }
    if out["extra_decays"] and isinstance(schedule, SigmaRel):
        raise ConfigError(f"{key('EXTRA_DECAYS')} needs a decay schedule, but "
                          f"{key('SCHEDULE')} is 'sigma_rel' (which has no decay); list the "
                          f"widths in {key('EXTRA_SIGMA_RELS')} instead")
    sigmas = widths("POSTHOC.SIGMA_RELS", 0.0, 12**-0.5)  # all checked, used or not
    select_sigmas = widths("POSTHOC.SELECT_SIGMA_RELS", 0.0, 12**-0.5)
    period = v["POSTHOC.PERIOD"]
    if isinstance(period, bool) or not isinstance(period, int) or period < 0:
        raise ConfigError(f"{key('POSTHOC.PERIOD')} = {period!r} must be an integer >= 0 "
                          "(0: about MAX_ITER / 100)")
    dtype = str(v["POSTHOC.DTYPE"]).lower()
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"{key('POSTHOC.DTYPE')} = {v['POSTHOC.DTYPE']!r} must be float32,"
                          " float16 or bfloat16")
    if v["POSTHOC.ENABLED"]:
        if not sigmas:
            raise ConfigError(f"{key('POSTHOC.SIGMA_RELS')} is empty; use e.g. [0.05, 0.1]")
        out["posthoc"] = PostHocSettings(sigmas, period, dtype, _inside_output(v, key),
                                         v["POSTHOC.SELECT"], select_sigmas,
                                         v["POSTHOC.SELECT_ON"])
    elif v["POSTHOC.SELECT"]:
        raise ConfigError(f"{key('POSTHOC.SELECT')} = True chooses among post-hoc EMAs, but "
                          f"{key('POSTHOC.ENABLED')} is False; set POSTHOC.ENABLED True")
    if not v["ENABLED"] and (out["extra_decays"] or out["extra_sigma_rels"] or "posthoc" in out):
        raise ConfigError(f"{key('EXTRA_DECAYS')}/{key('EXTRA_SIGMA_RELS')}/{key('POSTHOC')} "
                          f"need {key('ENABLED')} True")
    return out
