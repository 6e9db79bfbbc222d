"""Attach an EMA to a detectron2 model, and find it again.

The EMA lives on the (unwrapped) model as ``model.ema_state``, the attribute D2Go and the seed
article use, so every part of a trainer reaches it from the model alone.

Example::

    model = build_model(cfg)
    ema = build_model_ema(cfg, model)     # None unless cfg.MODEL_EMA.ENABLED
    assert get_model_ema(model) is ema
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..distributed import ShardedEMA
from ..ema import EMA
from ..state import unwrap_model
from .config import ema_settings
from .family import build_ema_family

__all__ = ["ATTRIBUTE", "build_model_ema", "get_model_ema"]

ATTRIBUTE = "ema_state"


def build_model_ema(cfg: Any, model: nn.Module) -> EMA | None:
    """Validate the config's EMA settings and, if enabled, attach a new :class:`EMA`
    (a :class:`~d2ema.distributed.ShardedEMA` with ``SHARDED``), and build the extra and post-hoc
    EMAs the config asks for (:mod:`d2ema.d2.family`).

    Call it before building the optimizer and wrapping the model in DDP, as
    :class:`~d2ema.d2.EMATrainer` and ``d2ema train`` do: with ``FLAT`` unset (None) a plain EMA
    uses flat mode, which re-points the model's tensors into one buffer per dtype
    (:mod:`d2ema.flat`) so that an update is one ``lerp_``.
    """
    settings = ema_settings(cfg)
    if not settings.enabled:
        return None
    target = unwrap_model(model)
    if hasattr(target, ATTRIBUTE):
        raise ValueError(
            f"the model already has an attribute {ATTRIBUTE!r}: it is reserved for the EMA. "
            "Build the EMA once per model."
        )
    flat = settings.flat if settings.flat is not None else not settings.sharded
    kwargs = {**settings.ema_kwargs(), "flat": flat}
    ema = (ShardedEMA if settings.sharded else EMA)(target, **kwargs)
    setattr(target, ATTRIBUTE, ema)
    build_ema_family(cfg, target, settings, kwargs)  # MODEL_EMA.EXTRA_* and POSTHOC, if any
    return ema


def get_model_ema(model: nn.Module) -> EMA | None:
    """The EMA attached to ``model`` (ours, or the one inside a seed/D2Go ``EMAState``)."""
    holder = getattr(unwrap_model(model), ATTRIBUTE, None)
    if holder is None or isinstance(holder, EMA):
        return holder
    return getattr(holder, "ema", None)
