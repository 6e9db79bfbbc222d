"""The one table of the EMA settings: every ``MODEL_EMA`` key, its default, its type, the values
it allows, the schedule it belongs to and what it means.

yacs configs use the upper-case names under ``cfg.MODEL_EMA`` (the seed's and D2Go's:
``ENABLED``, ``DECAY``, ``DEVICE``, ...), LazyConfigs the lower-case names under
``train.model_ema`` (detrex's). `d2ema.d2.config.settings` adds and checks them (its
messages read the allowed values here); `d2ema.d2.config.reference` writes
docs/configuration.md from this table.

Example::

    from d2ema.d2.config.keys import KEYS
    KEYS["DECAY"].default, KEYS["DECAY"].type     # 0.999, "float"
    KEYS["TAU"].schedule                          # "yolov5": a parameter of that schedule
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from d2ema.d2.config.view import ConfigView
from d2ema.errors import D2EMAError
from d2ema.schedules import SCHEDULES

__all__ = ['KEYS', 'MAX_SIGMA_REL', 'Key', 'core_words_named', 'named_in_config']


MAX_SIGMA_REL = 12**-0.5  # the widest power-EMA profile (sigma_rel < 1/sqrt(12))


@dataclasses.dataclass(frozen=True)
class Key:
    """One setting. ``type``: ``bool``, ``int``, ``float``, ``str``, ``str|None``, ``bool|None``,
    ``regexes`` (a list of regular expressions) or ``numbers`` (a list of distinct numbers,
    each in the open interval (``low``, ``high``)). Numbers must lie in [``low``, ``high``]
    (``low`` excluded with ``low_open``); ``allowed`` is how messages say it when the interval
    does not. ``schedule``: the decay schedule this key parameterises (set for another, it does
    nothing and is refused). ``core``: the core parameter the key sets (``Class.parameter``, as
    `d2ema.errors.D2EMAError.parameters` names it), so that a core message can be given
    the key beside it. ``meaning`` is Markdown: docs/configuration.md shows it as written.
    """

    name: str  # upper-case, as in yacs; LazyConfigs use it in lower case
    default: Any
    type: str
    meaning: str
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    allowed: str = ""
    schedule: str = ""
    core: str = ""

    def allowed_text(self) -> str:
        """What a message says the value must be, e.g. ``a number in [0.0, 1.0]``."""
        if self.allowed:
            return self.allowed
        kind = "an integer" if self.type == "int" else "a number"
        close = "]" if self.high < math.inf else ")"
        return f"{kind} in {'(' if self.low_open else '['}{self.low}, {self.high}{close}"


KEYS: dict[str, Key] = {key.name: key for key in (
    Key('ENABLED', False, 'bool',
        "keep an EMA of the model's weights"),
    Key('DECAY', 0.999, 'float',
        "decay d in [0, 1] (the ceiling of ramping schedules)",
        low=0.0, high=1.0),
    Key('DEVICE', "", 'str',
        "device of the EMA; '' = the model's (`MODEL.DEVICE`); 'cpu' keeps it off the GPU, "
        "updated in the background"),
    Key('INCLUDE_FROZEN', True, 'bool',
        "also average parameters with `requires_grad=False`"),
    Key('INCLUDE_BUFFER', True, 'bool',
        "also average buffers (BN running statistics)"),
    Key('USE_EMA_WEIGHTS_FOR_EVAL_ONLY', False, 'bool',
        "`--eval-only` evaluates the EMA weights"),
    Key('USE_LERP', False, 'bool',
        "accepted for D2Go configs; the update is always a fused lerp"),
    Key('AFTER_BACKWARD', False, 'bool',
        "accepted for D2Go configs; d2ema always updates after `optimizer.step()`, since "
        "an update after backward averages the previous step's weights"),
    Key('DECAY_WARM_UP_FACTOR', -1.0, 'float',
        ">= 1 selects the `tf` schedule with this warm-up factor (refused under another "
        "`SCHEDULE`)",
        allowed="-1 (off) or a number >= 1 (D2Go's warm-up)"),
    Key('SCHEDULE', "constant", 'str',
        "decay schedule: " + ", ".join(f"`{s}`" for s in sorted(SCHEDULES))),
    Key('TAU', 2000.0, 'float',
        "`yolov5` schedule: ramp time constant in steps",
        low=0.0, low_open=True, schedule="yolov5"),
    Key('INV_GAMMA', 1.0, 'float',
        "`power` schedule: inv_gamma",
        low=0.0, low_open=True, schedule="power"),
    Key('POWER', 2.0 / 3.0, 'float',
        "`power` schedule: power",
        low=0.0, low_open=True, schedule="power"),
    Key('MIN_DECAY', 0.0, 'float',
        "`power` schedule: floor of the decay",
        low=0.0, high=1.0, schedule="power"),
    Key('SIGMA_REL', 0.05, 'float',
        "`sigma_rel` schedule: relative width of the averaging profile",
        low=0.0, high=MAX_SIGMA_REL * (1 - 1e-12), low_open=True,
        allowed=f"a number in (0, {MAX_SIGMA_REL:.4f})"),
    Key('UPDATE_EVERY', 1, 'int',
        "update every N iterations with decay ** N",
        low=1),
    Key('START_ITER', 0, 'int',
        "before this iteration the EMA copies the weights",
        low=0),
    Key('MASTER_DTYPE', "float32", 'str|None',
        "dtype of the EMA of bf16/fp16 weights; 'none' keeps theirs"),
    Key('SKIP_NONFINITE', False, 'bool',
        "skip (and count) updates whose weights hold NaN/Inf",
        core='EMA.skip_nonfinite'),
    Key('EXCLUDE', [], 'regexes',
        "regular expressions of tensor names not to track"),
    Key('FLAT', None, 'bool|None',
        "re-point the model's tensors into one buffer per group (single-op update); None: on "
        "where the EMA is built before the optimizer and DDP (`build_model_ema`: `EMATrainer`, "
        "`d2ema train`), off elsewhere (the seed/D2Go API)"),
    Key('EVAL_BOTH', True, 'bool',
        "evaluate the raw and the EMA weights at each evaluation (`bbox` and `ema/bbox`: two "
        "TensorBoard curves)"),
    Key('EXTRA_DECAYS', [], 'numbers',
        "more EMAs like the primary (its `SCHEDULE`), one per decay, evaluated and logged as "
        "`ema_<d>/...`, checkpointed under `ema_extras`",
        low=0.0, high=1.0),
    Key('EXTRA_SIGMA_RELS', [], 'numbers',
        "more power EMAs, one per sigma_rel, evaluated and logged as `ema_sigma<s>/...`, "
        "checkpointed under `ema_extras`",
        low=0.0, high=MAX_SIGMA_REL),
    Key('POSTHOC.ENABLED', False, 'bool',
        "snapshot power EMAs for `d2ema posthoc` (length chosen after)",
        core='PostHocEMA'),
    Key('POSTHOC.SIGMA_RELS', [0.05, 0.10], 'numbers',
        "widths of the power EMAs snapshotted",
        low=0.0, high=MAX_SIGMA_REL,
        core='PostHocEMA.sigma_rels'),
    Key('POSTHOC.PERIOD', 0, 'int',
        "snapshot every N iterations (0: `MAX_ITER / 100`, at least 10) and at the last",
        core='PostHocEMA.snapshot_every'),
    Key('POSTHOC.DTYPE', "float32", 'str',
        "snapshot precision: float32, float16 or bfloat16",
        core='PostHocEMA.dtype'),
    Key('POSTHOC.DIR', "", 'str',
        "snapshot folder inside `OUTPUT_DIR`, relative to it ('' = `ema_snapshots`)",
        core='PostHocEMA.folder'),
    Key('POSTHOC.SELECT', False, 'bool',
        "at the end of training, rebuild a sweep of EMA lengths, evaluate each on `SELECT_ON` "
        "and write the best as `OUTPUT_DIR/model_final_posthoc.pth` (+ a plain detectron2 "
        "`.yaml`); see [ema-length.md](ema-length.md)"),
    Key('POSTHOC.SELECT_SIGMA_RELS', [], 'numbers',
        "the lengths `SELECT` tries; [] = 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25 "
        "(those the snapshots can represent)",
        low=0.0, high=MAX_SIGMA_REL),
    Key('POSTHOC.SELECT_ON', "", 'str',
        "the dataset `SELECT` chooses on (held out); '' = `DATASETS.TEST[0]`, which then also "
        "reports (optimistic). The chosen EMA is reported on `DATASETS.TEST[0]`"),
    Key('DISCARD_ON_RESUME', False, 'bool',
        "with `ENABLED` False: resume from a checkpoint that has an EMA and drop that EMA "
        "(refused otherwise, so that no checkpoint loses its EMA silently)"),
    Key('SHARDED', False, 'bool',
        "multi-GPU (DDP): each of N ranks stores and updates 1/N of the EMA, gathered only to "
        "evaluate and to save (see `d2ema.distributed.ShardedEMA`)",
        core='ShardedEMA'),
)}


_BY_CORE = {key.core: key.name for key in KEYS.values() if key.core}


_yacs_key = ConfigView(None, lazy=False).key


def named_in_config(parameters: Iterable[str], key: Callable[[str], str] | None = None) -> str:
    """``"; in the config: snapshot_every is MODEL_EMA.POSTHOC.PERIOD"`` for the core
    ``parameters`` a message names (``""`` for those no key sets). ``key`` spells the keys
    (`key`; default: yacs)."""
    key = key or _yacs_key
    named = [f"{p.rsplit('.', 1)[-1]} is {key(_BY_CORE[p])}" for p in parameters
             if p in _BY_CORE]
    return f"; in the config: {', '.join(named)}" if named else ""


@contextlib.contextmanager
def core_words_named(key: Callable[[str], str] | None = None) -> Iterator[None]:
    """Re-raise a core `D2EMAError` raised in the block with the config
    keys of the parameters it names added (same type, one line): the detectron2 layer's words
    beside the core's, e.g. ``... set PostHocEMA(snapshot_every=...) larger ...; in the config:
    snapshot_every is MODEL_EMA.POSTHOC.PERIOD``.

    Example::

        with core_words_named(settings.key):
            trainer.train()
    """
    try:
        yield
    except D2EMAError as e:
        suffix = named_in_config(e.parameters, key)
        if not suffix or suffix in str(e):
            raise
        raise type(e)(f"{e}{suffix}") from e
