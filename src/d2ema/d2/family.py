"""The EMAs attached to a detectron2 model, and how the rest of the layer finds them.

The primary EMA lives on the (unwrapped) model as ``model.ema_state``, the attribute D2Go and
the seed article use, so every part of a trainer reaches it from the model alone
(`get_model_ema`). Its extra and post-hoc EMAs form the model's `EMAFamily`
(`get_ema_family`), saved under the checkpoint keys ``ema_extras`` and ``ema_posthoc`` by
one `EMAGroupState` each; the settings they were built with stay with the model
(`get_settings`). `d2ema.d2.engine.build` builds them; the checkpointers, hooks,
evaluation and selection only find them here, so none of those imports the engine.

Example::

    ema = get_model_ema(model)              # None without MODEL_EMA.ENABLED
    extras = get_extra_emas(model)          # {"ema_0.99": EMA, ...}
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from d2ema.averaging.state import unwrap_model
from d2ema.d2.config.settings import EMASettings
from d2ema.ema import EMA
from d2ema.errors import EMAStateError
from d2ema.posthoc import PostHocEMA

__all__ = [
    "ATTRIBUTE",
    "EXTRAS_KEY",
    "POSTHOC_KEY",
    "EMAFamily",
    "EMAGroupState",
    "attach_family",
    "attach_settings",
    "get_ema_family",
    "get_extra_emas",
    "get_model_ema",
    "get_settings",
]

logger = logging.getLogger(__name__)


ATTRIBUTE = "ema_state"


EXTRAS_KEY = "ema_extras"


POSTHOC_KEY = "ema_posthoc"


def get_model_ema(model: nn.Module) -> EMA | None:
    """The EMA attached to ``model`` (ours, or the one inside a seed/D2Go ``EMAState``)."""
    holder = getattr(unwrap_model(model), ATTRIBUTE, None)
    if holder is None or isinstance(holder, EMA):
        return holder
    return getattr(holder, "ema", None)


_SETTINGS: weakref.WeakKeyDictionary[nn.Module, EMASettings] = weakref.WeakKeyDictionary()


def attach_settings(model: nn.Module, settings: EMASettings) -> None:
    """Keep ``settings`` with ``model`` (what its EMAs were built with)."""
    _SETTINGS[unwrap_model(model)] = settings


def get_settings(model: nn.Module) -> EMASettings | None:
    """The settings `build_model_ema` built ``model``'s EMAs with (None if it did not)."""
    return _SETTINGS.get(unwrap_model(model))


_FAMILIES: weakref.WeakKeyDictionary[nn.Module, EMAFamily] = weakref.WeakKeyDictionary()


class EMAGroupState:
    """A checkpointable for named EMAs: ``{name: EMA.state_dict()}``, all checked, then all
    loaded. Names only in the checkpoint are ignored; names only here restart (logged)."""

    def __init__(self, get_emas: Callable[[], Mapping[str, EMA]], key: str,
                 before_save: Callable[[], None] | None = None):
        self.emas, self.key, self.before_save = get_emas, key, before_save
        self.loaded: set[str] = set()

    def state_dict(self) -> dict[str, Any]:
        if self.before_save is not None:
            self.before_save()
        return {name: ema.state_dict() for name, ema in self.emas().items()}

    def check(self, state: Any) -> None:
        if not isinstance(state, Mapping):
            raise EMAStateError(f"checkpoint key {self.key!r} is a {type(state).__name__}, not a "
                                "dict of EMA states; nothing was loaded")
        for name, ema in self.emas().items():
            if name in state:
                try:
                    ema.check_state_dict(state[name])
                except EMAStateError as e:
                    raise EMAStateError(f"{self.key}[{name!r}]: {e}") from e

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check(state)
        emas = self.emas()
        for name, ema in emas.items():
            if name in state:
                ema.load_state_dict(state[name])
        self.loaded = set(emas) & set(state)
        new, gone = sorted(set(emas) - set(state)), sorted(set(state) - set(emas))
        if new or gone:
            logger.info("%s: %s start from the loaded weights%s", self.key, new or "none",
                        f"; {gone} in the checkpoint are not configured (ignored)" if gone else "")


@dataclasses.dataclass
class EMAFamily:
    """The extra and post-hoc EMAs of one model (see the module docstring)."""

    extras: dict[str, EMA]
    posthoc: PostHocEMA | None = None

    def __post_init__(self) -> None:
        self.states = {EXTRAS_KEY: EMAGroupState(lambda: self.extras, EXTRAS_KEY)}
        if self.posthoc is not None:
            # a checkpoint at step S resumes the series at S: every snapshot up to S must be on
            # disk by then (a kill after the save would otherwise leave a gap in the series)
            self.states[POSTHOC_KEY] = EMAGroupState(lambda: self.posthoc.emas, POSTHOC_KEY,  # type: ignore[union-attr]
                                                     before_save=self.posthoc.writer.flush)

    def before_train(self, model: nn.Module, max_iter: int | None, start_iter: int = 0) -> None:
        """Restart the EMAs no checkpoint provided; continue the snapshot series."""
        for state in self.states.values():
            for name, ema in state.emas().items():
                if name not in state.loaded:
                    ema.reset(model)
        if self.posthoc is not None and start_iter and not self.states[POSTHOC_KEY].loaded:
            logger.warning("post-hoc EMA: the checkpoint resumed at iteration %d has no post-hoc "
                           "EMAs; they start from its weights, as if training had begun there",
                           start_iter)
        if self.posthoc is not None:
            if self.posthoc.writer.enabled:
                self.posthoc.writer.check_space(self.posthoc.snapshot_every, max_iter or 0,
                                                start_iter)
                logger.info(self.posthoc.writer.describe(self.posthoc.snapshot_every,
                                                         max_iter or 0))
            self.posthoc.sync()
            if max_iter is not None and self.posthoc.step == max_iter:
                self.posthoc.snapshot()

    def after_step(self, model: nn.Module, step: int, max_iter: int | None) -> None:
        for ema in self.extras.values():
            ema.update(model, step=step)
        if self.posthoc is not None:
            self.posthoc.update(model, step=step)
            if step == max_iter:
                self.posthoc.snapshot()

    def after_train(self) -> None:
        if self.posthoc is not None:
            self.posthoc.close()


def attach_family(model: nn.Module, family: EMAFamily) -> None:
    """Make ``family`` the extra and post-hoc EMAs of ``model``."""
    _FAMILIES[unwrap_model(model)] = family


def get_ema_family(model: nn.Module) -> EMAFamily | None:
    """The extra and post-hoc EMAs of ``model`` (None if it has none)."""
    return _FAMILIES.get(unwrap_model(model))


def get_extra_emas(model: nn.Module) -> dict[str, EMA]:
    """The model's extra EMAs by name (``ema_0.99``, ``ema_sigma0.1``); empty if none."""
    family = get_ema_family(model)
    return dict(family.extras) if family is not None else {}
