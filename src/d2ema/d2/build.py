"""Attach an EMA to a detectron2 model, and find it again.

The EMA lives on the (unwrapped) model as ``model.ema_state``, the attribute D2Go and the seed
article use, so every part of a trainer reaches it from the model alone.

Example::

    model = build_model(cfg)
    ema = build_model_ema(cfg, model)     # None unless cfg.MODEL_EMA.ENABLED
    assert get_model_ema(model) is ema
"""

from __future__ import annotations

from torch import nn

from ..ema import EMA
from ..sharded import ShardedEMA
from ..state import unwrap_model
from .config import ema_settings

__all__ = ["ATTRIBUTE", "build_model_ema", "get_model_ema"]

ATTRIBUTE = "ema_state"


def build_model_ema(cfg, model: nn.Module) -> EMA | None:
    """Validate the config's EMA settings and, if enabled, attach a new :class:`EMA`
    (a :class:`~d2ema.sharded.ShardedEMA` with ``SHARDED``)."""
    settings = ema_settings(cfg)
    if not settings.enabled:
        return None
    target = unwrap_model(model)
    if hasattr(target, ATTRIBUTE):
        raise ValueError(
            f"the model already has an attribute {ATTRIBUTE!r}: it is reserved for the EMA. "
            "Build the EMA once per model."
        )
    ema = (ShardedEMA if settings.sharded else EMA)(target, **settings.ema_kwargs())
    setattr(target, ATTRIBUTE, ema)
    return ema


def get_model_ema(model: nn.Module) -> EMA | None:
    """The EMA attached to ``model`` (ours, or the one inside a seed/D2Go ``EMAState``)."""
    holder = getattr(unwrap_model(model), ATTRIBUTE, None)
    if holder is None or isinstance(holder, EMA):
        return holder
    return getattr(holder, "ema", None)
