"""EMA settings from a detectron2 config: yacs ``MODEL_EMA.*`` or LazyConfig ``train.model_ema``.

One table, :data:`d2ema.d2.config.keys.KEYS`, defines every setting once; the yacs keys are its
upper-case names (the seed's and D2Go's: ``ENABLED``, ``DECAY``, ``DEVICE``, ...) and the
LazyConfig keys its lower-case names (detrex's ``train.model_ema.enabled/decay/device/...``).
Values are checked when the trainer is built, and a bad one raises :class:`ConfigError` naming
the key, the value and what is allowed.

Example::

    cfg = get_cfg(); add_model_ema_configs(cfg)
    cfg.MODEL_EMA.ENABLED = True
    cfg.MODEL_EMA.SCHEDULE = "yolov5"
    settings = ema_settings(cfg)          # validated
    ema = EMA(model, **settings.ema_kwargs())

``MODEL_EMA.EXTRA_DECAYS``, ``EXTRA_SIGMA_RELS`` and ``POSTHOC.*`` are read and checked here
too (the EMAs themselves are built in
:mod:`d2ema.d2.engine.build`;
``POSTHOC.SELECT`` runs in :mod:`d2ema.d2.evaluation.select`, which also checks, before training,
the selection set and that the snapshots will represent the ``SELECT_SIGMA_RELS``).

Example::

    extra = several_emas(values, key, schedule)   # {"extra_decays": (...), "posthoc": ...}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import PurePath
from typing import Any

import torch

from d2ema.checks import compile_patterns
from d2ema.d2.config.keys import KEYS
from d2ema.d2.config.yacs_numbers import accept_integers_for_floats
from d2ema.errors import ConfigError
from d2ema.schedules import SCHEDULES, Schedule, SigmaRel, TFWarmup, make_schedule

__all__ = [
    "KEYS",
    "NUMBER_LISTS",
    "ConfigError",
    "EMASettings",
    "PostHocSettings",
    "add_model_ema_configs",
    "check_device",
    "d2go_schedule",
    "ema_settings",
    "lazy_model_ema_defaults",
    "several_emas",
]


# Schedule parameters, and the schedule that uses each (set for another, they do nothing).
_SCHEDULE_OF = {"TAU": "yolov5", "INV_GAMMA": "power", "POWER": "power", "MIN_DECAY": "power"}


_MASTER_DTYPES = {"float32": torch.float32, "float64": torch.float64, "none": None, "": None}


# (low, high, low excluded) of numeric keys; their type comes from the default in KEYS.
_RANGES: dict[str, tuple[float, float, bool]] = {
    "DECAY": (0.0, 1.0, False),
    "DECAY_WARM_UP_FACTOR": (-math.inf, math.inf, False),
    "TAU": (0.0, math.inf, True),
    "INV_GAMMA": (0.0, math.inf, True),
    "POWER": (0.0, math.inf, True),
    "MIN_DECAY": (0.0, 1.0, False),
    "SIGMA_REL": (0.0, 12**-0.5 * (1 - 1e-12), True),
    "UPDATE_EVERY": (1, math.inf, False),
    "START_ITER": (0, math.inf, False),
}


_RANGE_TEXT = {
    "DECAY_WARM_UP_FACTOR": "-1 (off) or a number >= 1 (D2Go's warm-up)",
    "SIGMA_REL": f"a number in (0, {12**-0.5:.4f})",
}


def add_model_ema_configs(cfg: Any) -> None:
    """Add ``cfg.MODEL_EMA`` with every key of :data:`KEYS` at its default (idempotent)."""
    from detectron2.config import CfgNode as CN

    # MODEL_EMA.TAU 5 in a file or an override, as people write it
    accept_integers_for_floats(f"MODEL_EMA.{k}" for k, (d, _) in KEYS.items() if type(d) is float)
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    if "MODEL_EMA" not in cfg:
        cfg.MODEL_EMA = CN()
    for key, (default, _) in KEYS.items():
        node = cfg.MODEL_EMA
        *parents, leaf = key.split(".")
        for part in parents:
            if part not in node:
                node[part] = CN()
            node = node[part]
        if leaf not in node:
            node[leaf] = list(default) if isinstance(default, list) else default
    if was_frozen:
        cfg.freeze()


def lazy_model_ema_defaults() -> dict[str, Any]:
    """``train.model_ema`` for a LazyConfig: ``train.model_ema = lazy_model_ema_defaults()``."""
    out: dict[str, Any] = {}
    for key, (value, _) in KEYS.items():
        *parents, leaf = key.lower().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = list(value) if isinstance(value, list) else value
    return out


def _unknown_keys(node, lower: bool) -> list[str]:
    """Names in ``node`` (and its sub-nodes such as ``POSTHOC``) that :data:`KEYS` lacks."""
    names = [k.lower() if lower else k for k in KEYS]
    unknown = sorted(set(node.keys()) - {n.split(".")[0] for n in names})
    for parent in {n.split(".")[0] for n in names if "." in n}:
        inner = {n.split(".", 1)[1] for n in names if n.startswith(parent + ".")}
        unknown += sorted(f"{parent}.{k}" for k in set(node.get(parent, None) or {}) - inner)
    return unknown


def _lookup(node, key: str, default: Any, lower: bool) -> Any:
    """``node[A][B]`` for the KEYS name ``A.B`` (lower-case names for LazyConfigs)."""
    *parents, leaf = key.lower().split(".") if lower else key.split(".")
    for part in parents:
        node = node.get(part, None) or {}
    return node.get(leaf, default)


@dataclasses.dataclass(frozen=True)
class EMASettings:
    """Validated EMA settings, whatever config system they came from."""

    enabled: bool
    decay: float
    device: str
    include_frozen: bool
    include_buffer: bool
    use_ema_weights_for_eval_only: bool
    schedule: Any
    update_every: int
    start_iter: int
    master_dtype: torch.dtype | None
    skip_nonfinite: bool
    exclude: tuple[str, ...]
    flat: bool | None
    eval_both: bool
    extra_decays: tuple[float, ...] = ()
    extra_sigma_rels: tuple[float, ...] = ()
    posthoc: PostHocSettings | None = None
    discard_on_resume: bool = False
    sharded: bool = False

    def ema_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`d2ema.EMA`."""
        return {
            "decay": self.decay,
            "schedule": self.schedule,
            "every": self.update_every,
            "start": self.start_iter,
            "include_frozen": self.include_frozen,
            "include_buffers": self.include_buffer,
            "exclude": self.exclude,
            "device": self.device or None,
            "master_dtype": self.master_dtype,
            "skip_nonfinite": self.skip_nonfinite,
            "flat": bool(self.flat),
        }


def _read(cfg) -> tuple[dict[str, Any], str, str]:
    """Raw values, the key prefix to name in errors, and the model's device."""
    if hasattr(cfg, "MODEL_EMA"):
        node = cfg.MODEL_EMA
        unknown = _unknown_keys(node, lower=False)
        if unknown:
            raise ConfigError(f"MODEL_EMA has unknown keys {unknown}; valid keys are "
                              f"{sorted({k.split('.')[0] for k in KEYS})}")
        values = {k: _lookup(node, k, d, lower=False) for k, (d, _) in KEYS.items()}
        return values, "MODEL_EMA.", str(cfg.MODEL.DEVICE)
    train = cfg.train if hasattr(cfg, "train") else cfg["train"]
    node = train.get("model_ema", None) or {}
    values = {k: _lookup(node, k, d, lower=True) for k, (d, _) in KEYS.items()}
    lowered = {k.lower().split(".")[0] for k in KEYS}
    unknown = _unknown_keys(node, lower=True)
    if unknown:
        raise ConfigError(
            f"train.model_ema has unknown keys {unknown}; valid keys are {sorted(lowered)}"
        )
    return values, "train.model_ema.", str(train.get("device", "cuda"))


def d2go_schedule(
    decay: float, decay_warm_up_factor: float, key: str = "DECAY_WARM_UP_FACTOR"
) -> Schedule | None:
    """D2Go's ``DECAY_WARM_UP_FACTOR``: -1 (any negative) is off (None), >= 1 the ``tf`` ramp.

    A factor in [0, 1) is refused: ``(1 + n) / (factor + n)`` is then above 1 and the ramp
    never lowers the decay, so the setting would silently do nothing.
    """
    if decay_warm_up_factor < 0:
        return None
    if decay_warm_up_factor < 1:
        raise ConfigError(
            f"{key} = {decay_warm_up_factor!r} has no effect (a warm-up factor below 1 never "
            "lowers the decay); use -1 for a constant decay or a factor >= 1, e.g. 10"
        )
    return TFWarmup(decay=decay, warmup_factor=float(decay_warm_up_factor))


def _check_types(v: dict[str, Any], key) -> None:
    """Every key: the type of its default (numbers: finite, in range), before any is used."""
    for name, (default, _) in KEYS.items():
        x = v[name]
        if isinstance(default, bool):
            if not isinstance(x, bool):
                raise ConfigError(f"{key(name)} = {x!r} must be True or False")
        elif isinstance(default, (int, float)):
            integer = isinstance(default, int)
            ok = isinstance(x, int if integer else (int, float)) and not isinstance(x, bool)
            lo, hi, open_lo = _RANGES.get(name, (-math.inf, math.inf, False))
            if not ok or not math.isfinite(x) or not lo <= x <= hi or (open_lo and x == lo):
                kind = "an integer" if integer else "a number"
                allowed = _RANGE_TEXT.get(name) or (
                    f"{kind} in {'(' if open_lo else '['}{lo}, {hi}{']' if hi < math.inf else ')'}"
                )
                raise ConfigError(f"{key(name)} = {x!r} must be {allowed}")
        elif isinstance(default, str) and not (isinstance(x, str) or
                                               (name == "MASTER_DTYPE" and x is None)):
            raise ConfigError(f"{key(name)} = {x!r} must be a string")
        elif isinstance(default, list) and name not in NUMBER_LISTS:  # those: several_emas
            patterns = [x] if isinstance(x, str) else x
            if not isinstance(patterns, Sequence):
                raise ConfigError(f"{key(name)} = {x!r} must be a list of regular expressions")
            compile_patterns(list(patterns), key(name))


def check_device(key: str, value: str, sep: str = " ") -> None:
    """Raise :class:`ConfigError` unless ``value`` names a device this machine has.

    ``sep`` joins key and value in the suggested fix (``" "`` for yacs, ``"="`` for LazyConfig).
    """
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"{key} = {value!r} is not a device name ('cpu', 'cuda:0', ...)") from e
    if device.type == "meta":
        raise ConfigError(f"{key} = {value!r} keeps no data (the meta device); use '' for the "
                          "model's device, 'cpu' or 'cuda'")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(f"{key} = {value!r} does not exist on this machine: it has no CUDA "
                              f"device; train on the CPU with {key}{sep}cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{key} = {value!r} does not exist on this machine ({count} CUDA "
                              f"devices); use {key}{sep}cuda:0 .. cuda:{count - 1}, or cpu")


def _optional_bool(key: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ConfigError(f"{key} = {value!r} must be True, False or None (automatic)")


def _as_float(x: Any) -> Any:
    return float(x) if type(x) is int else x


def _check_consistency(v: dict[str, Any], key: Callable[[str], str], schedule: str) -> None:
    """Refuse settings that contradict each other or would silently do nothing."""
    on = f"{key('ENABLED')} True"
    if not v["ENABLED"]:
        if v["USE_EMA_WEIGHTS_FOR_EVAL_ONLY"]:
            raise ConfigError(
                f"{key('USE_EMA_WEIGHTS_FOR_EVAL_ONLY')} = True asks to evaluate EMA weights, but "
                f"{key('ENABLED')} is False, so there is no EMA (the raw weights would be "
                f"evaluated instead); set {on} to evaluate a checkpoint's EMA, or "
                "USE_EMA_WEIGHTS_FOR_EVAL_ONLY False for the raw weights"
            )
        if not v["EVAL_BOTH"]:
            raise ConfigError(
                f"{key('EVAL_BOTH')} = False asks to evaluate the EMA weights only, but "
                f"{key('ENABLED')} is False, so there is no EMA; set {on}, or EVAL_BOTH True"
            )
        return
    if v["DISCARD_ON_RESUME"]:
        raise ConfigError(
            f"{key('DISCARD_ON_RESUME')} = True drops a checkpoint's EMA when resuming without "
            f"one, but {key('ENABLED')} is True; set DISCARD_ON_RESUME False to keep the EMA"
        )
    if v["DECAY_WARM_UP_FACTOR"] >= 0 and schedule not in ("constant", "tf"):
        raise ConfigError(
            f"{key('DECAY_WARM_UP_FACTOR')} = {v['DECAY_WARM_UP_FACTOR']!r} selects the 'tf' "
            f"warm-up, but {key('SCHEDULE')} is {schedule!r}; keep one: DECAY_WARM_UP_FACTOR -1, "
            "or SCHEDULE 'tf'"
        )
    for name, used_by in _SCHEDULE_OF.items():
        default = KEYS[name][0]
        if schedule != used_by and v[name] != default:
            raise ConfigError(
                f"{key(name)} = {v[name]!r} has no effect with {key('SCHEDULE')} = "
                f"{schedule!r} (it is a parameter of '{used_by}'); set SCHEDULE '{used_by}', or "
                f"leave {name} at its default {default!r}"
            )


def ema_settings(cfg: Any) -> EMASettings:
    """Read and validate the EMA settings of a yacs or LazyConfig config."""
    v, prefix, model_device = _read(cfg)

    def key(name: str) -> str:
        return prefix + (name if prefix.startswith("MODEL_EMA") else name.lower())

    _check_types(v, key)
    decay, every, start = v["DECAY"], v["UPDATE_EVERY"], v["START_ITER"]
    name = v["SCHEDULE"]
    warm_up = v["DECAY_WARM_UP_FACTOR"]
    if d2go_schedule(decay, warm_up, key("DECAY_WARM_UP_FACTOR")) and name == "constant":
        name = "tf"  # another SCHEDULE with it is refused by _check_consistency
    v.update({k: _as_float(v[k]) for k in ("TAU", "INV_GAMMA", "POWER", "MIN_DECAY", "SIGMA_REL")})
    params = {
        "yolov5": {"tau": v["TAU"]},
        "tf": {"warmup_factor": warm_up if warm_up >= 1 else 10.0},
        "power": {"inv_gamma": v["INV_GAMMA"], "power": v["POWER"], "min_decay": v["MIN_DECAY"]},
        "sigma_rel": {"sigma_rel": v["SIGMA_REL"]},
    }
    if name == "power" and v["MIN_DECAY"] > decay:
        raise ConfigError(f"{key('MIN_DECAY')} = {v['MIN_DECAY']!r} must be at most "
                          f"{key('DECAY')} = {decay!r} (the power schedule's floor)")
    if name not in SCHEDULES:
        raise ConfigError(
            f"{key('SCHEDULE')} = {name!r} is unknown; choose one of {sorted(SCHEDULES)}"
        )
    _check_consistency(v, key, v["SCHEDULE"])
    try:
        schedule = make_schedule(name, decay, **params.get(name, {}))
    except ValueError as e:
        raise ConfigError(f"{key('SCHEDULE')} = {name!r}: {e}") from e
    master = str(v["MASTER_DTYPE"]).lower()
    if master not in _MASTER_DTYPES:
        raise ConfigError(
            f"{key('MASTER_DTYPE')} = {v['MASTER_DTYPE']!r}; choose one of "
            f"{sorted(k for k in _MASTER_DTYPES if k)}"
        )
    device = v["DEVICE"]
    if device or v["ENABLED"]:
        yacs = prefix.startswith("MODEL_EMA")
        model_key = "MODEL.DEVICE" if yacs else "train.device"
        check_device(key("DEVICE") if device else model_key, device or model_device,
                     " " if yacs else "=")
    exclude = v["EXCLUDE"]
    if isinstance(exclude, str):
        exclude = [exclude]
    return EMASettings(
        enabled=bool(v["ENABLED"]),
        decay=float(decay),
        device=device,
        include_frozen=bool(v["INCLUDE_FROZEN"]),
        include_buffer=bool(v["INCLUDE_BUFFER"]),
        use_ema_weights_for_eval_only=bool(v["USE_EMA_WEIGHTS_FOR_EVAL_ONLY"]),
        schedule=schedule,
        update_every=int(every),
        start_iter=int(start),
        master_dtype=_MASTER_DTYPES[master],
        skip_nonfinite=bool(v["SKIP_NONFINITE"]),
        exclude=tuple(exclude),
        flat=_optional_bool(key("FLAT"), v["FLAT"]),
        eval_both=bool(v["EVAL_BOTH"]),
        **several_emas(v, key, schedule),
        discard_on_resume=bool(v["DISCARD_ON_RESUME"]),
        sharded=bool(v["SHARDED"]),
    )


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
