"""EMA settings from a detectron2 config: yacs ``MODEL_EMA.*`` or LazyConfig ``train.model_ema``.

One table, `d2ema.d2.config.keys.KEYS`, defines every setting once; the yacs keys are its
upper-case names (the seed's and D2Go's: ``ENABLED``, ``DECAY``, ``DEVICE``, ...) and the
LazyConfig keys its lower-case names (detrex's ``train.model_ema.enabled/decay/device/...``).
Values are checked when the trainer is built, and a bad one raises `ConfigError` naming
the key, the value and what is allowed.

Example::

    cfg = get_cfg(); add_model_ema_configs(cfg)
    cfg.MODEL_EMA.ENABLED = True
    cfg.MODEL_EMA.SCHEDULE = "yolov5"
    settings = ema_settings(cfg)          # validated
    ema = EMA(model, **settings.ema_kwargs())

``MODEL_EMA.EXTRA_DECAYS``, ``EXTRA_SIGMA_RELS`` and ``POSTHOC.*`` are read and checked here
too (the EMAs themselves are built in
`d2ema.d2.engine.build`;
``POSTHOC.SELECT`` runs in `d2ema.d2.evaluation.select`, which also checks, before training,
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
from d2ema.d2.config.keys import KEYS, Key
from d2ema.d2.config.view import ConfigView
from d2ema.errors import ConfigError
from d2ema.schedules import SCHEDULES, Schedule, SigmaRel, TFWarmup, make_schedule

__all__ = [
    "KEYS",
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


_MASTER_DTYPES = {"float32": torch.float32, "float64": torch.float64, "none": None, "": None}


def add_model_ema_configs(cfg: Any) -> None:
    """Add ``cfg.MODEL_EMA`` with every key of `KEYS` at its default (idempotent)."""
    from detectron2.config import CfgNode as CN

    view = ConfigView(cfg, lazy=False)
    node_name = view.prefix.rstrip(".")
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    if node_name not in cfg:
        cfg[node_name] = CN()
    for name, key in KEYS.items():
        node = cfg[node_name]
        *parents, leaf = name.split(".")
        for part in parents:
            if part not in node:
                node[part] = CN()
            node = node[part]
        if leaf not in node:
            node[leaf] = list(key.default) if isinstance(key.default, list) else key.default
    if was_frozen:
        cfg.freeze()


def lazy_model_ema_defaults() -> dict[str, Any]:
    """``train.model_ema`` for a LazyConfig: ``train.model_ema = lazy_model_ema_defaults()``."""
    out: dict[str, Any] = {}
    for name, key in KEYS.items():
        *parents, leaf = name.lower().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = list(key.default) if isinstance(key.default, list) else key.default
    return out


def _unknown_keys(node, lower: bool) -> list[str]:
    """Names in ``node`` (and its sub-nodes such as ``POSTHOC``) that `KEYS` lacks."""
    names = [k.lower() if lower else k for k in KEYS]
    unknown = sorted(set(node.keys()) - {n.split(".")[0] for n in names})
    for parent in {n.split(".")[0] for n in names if "." in n}:
        inner = {n.split(".", 1)[1] for n in names if n.startswith(parent + ".")}
        unknown += sorted(f"{parent}.{k}" for k in set(node.get(parent, None) or {}) - inner)
    return unknown


@dataclasses.dataclass(frozen=True)
class EMASettings:
    """Validated EMA settings, whatever config system they came from: read once per run by
    `ema_settings` and handed on (the trainer keeps them as ``trainer.ema_settings``).
    `key` names a setting as the user writes it; `output_dir` and `max_iter`
    are the run's (read from the config when asked: an evaluation moves ``output_dir``)."""

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
    view: ConfigView | None = dataclasses.field(default=None, compare=False, repr=False)

    def key(self, name: str) -> str:
        """The key the user sets for ``name`` (``MODEL_EMA.DECAY`` / ``train.model_ema.decay``)."""
        return (self.view or ConfigView(None, lazy=False)).key(name)

    @property
    def output_dir(self) -> str:
        """The run's output folder (``OUTPUT_DIR`` / ``train.output_dir``; ``""`` if unknown)."""
        return self.view.output_dir if self.view is not None else ""

    @property
    def max_iter(self) -> int:
        """The run's number of iterations (``SOLVER.MAX_ITER`` / ``train.max_iter``; 0 if
        unknown)."""
        return int((self.view.max_iter if self.view is not None else 0) or 0)

    def ema_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `d2ema.EMA`."""
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


def _read(view: ConfigView) -> dict[str, Any]:
    """Raw values of every key (defaults where unset); unknown keys refused."""
    node = view.ema_node()
    unknown = _unknown_keys(node, lower=view.lazy)
    if unknown:
        valid = sorted({(k.lower() if view.lazy else k).split(".")[0] for k in KEYS})
        raise ConfigError(f"{view.prefix.rstrip('.')} has unknown keys {unknown}; valid keys "
                          f"are {valid}")
    return {name: view.ema_value(name, key.default) for name, key in KEYS.items()}


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


def _check_types(v: dict[str, Any], key: Callable[[str], str]) -> None:
    """Every key: its type in `KEYS` (numbers: finite, in range), before any is used."""
    for name, spec in KEYS.items():
        x = v[name]
        if spec.type == "bool":
            if not isinstance(x, bool):
                raise ConfigError(f"{key(name)} = {x!r} must be True or False")
        elif spec.type == "bool|None":
            if x is not None and not isinstance(x, bool):
                raise ConfigError(f"{key(name)} = {x!r} must be True, False or None (automatic)")
        elif spec.type in ("int", "float"):
            ok = isinstance(x, int if spec.type == "int" else (int, float)) and not isinstance(
                x, bool)
            if not ok or not math.isfinite(x) or not _in_range(x, spec):
                raise ConfigError(f"{key(name)} = {x!r} must be {spec.allowed_text()}")
        elif spec.type.startswith("str") and not (
            isinstance(x, str) or (spec.type == "str|None" and x is None)
        ):
            raise ConfigError(f"{key(name)} = {x!r} must be a string")
        elif spec.type == "regexes":
            patterns = [x] if isinstance(x, str) else x
            if not isinstance(patterns, Sequence):
                raise ConfigError(f"{key(name)} = {x!r} must be a list of regular expressions")
            compile_patterns(list(patterns), key(name))
        # "numbers": several_emas


def _in_range(x: float, spec: Key) -> bool:
    return spec.low <= x <= spec.high and not (spec.low_open and x == spec.low)


def check_device(key: str, value: str, sep: str = " ") -> None:
    """Raise `ConfigError` unless ``value`` names a device this machine has.

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
    for name, spec in KEYS.items():
        used_by, default = spec.schedule, spec.default
        if used_by and schedule != used_by and v[name] != default:
            raise ConfigError(
                f"{key(name)} = {v[name]!r} has no effect with {key('SCHEDULE')} = "
                f"{schedule!r} (it is a parameter of '{used_by}'); set SCHEDULE '{used_by}', or "
                f"leave {name} at its default {default!r}"
            )


def ema_settings(cfg: Any) -> EMASettings:
    """Read and validate the EMA settings of a yacs or LazyConfig config: once per run, then
    hand the object on (it keeps nothing between calls: each call reads and checks again).

    Raises `ConfigError` naming the key, the value and what is allowed; a yacs config
    without ``MODEL_EMA`` gets the defaults (``add_model_ema_configs`` adds them)."""
    view = ConfigView.of(cfg)
    v = _read(view)
    key = view.key

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
        check_device(key("DEVICE") if device else view.name("device"), device or view.device,
                     "=" if view.lazy else " ")
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
        flat=v["FLAT"],
        eval_both=bool(v["EVAL_BOTH"]),
        **several_emas(v, key, schedule),
        discard_on_resume=bool(v["DISCARD_ON_RESUME"]),
        sharded=bool(v["SHARDED"]),
        view=view,
    )


MIN_AUTO_PERIOD = 10  # iterations between snapshots at POSTHOC.PERIOD 0, at least


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
        `MIN_AUTO_PERIOD` iterations. Each snapshot costs two fp32 copies of the model
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

    def widths(name: str) -> tuple[float, ...]:
        lo, hi = KEYS[name].low, KEYS[name].high
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
        "extra_decays": widths("EXTRA_DECAYS"),
        "extra_sigma_rels": widths("EXTRA_SIGMA_RELS"),
    }
    if out["extra_decays"] and isinstance(schedule, SigmaRel):
        raise ConfigError(f"{key('EXTRA_DECAYS')} needs a decay schedule, but "
                          f"{key('SCHEDULE')} is 'sigma_rel' (which has no decay); list the "
                          f"widths in {key('EXTRA_SIGMA_RELS')} instead")
    sigmas = widths("POSTHOC.SIGMA_RELS")  # all checked, used or not
    select_sigmas = widths("POSTHOC.SELECT_SIGMA_RELS")
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
