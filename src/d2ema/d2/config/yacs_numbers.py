"""Integers where ``MODEL_EMA`` expects floats, in yacs configs: ``TAU: 5``, ``DECAY 1``.

yacs checks every merged value against the type of the default and refuses an ``int`` for a
``float`` key ("Type mismatch (float vs int)"), in files (``merge_from_file``, ``_BASE_``
included) and command-line overrides (``merge_from_list``) alike. For the float keys of
``MODEL_EMA`` (``DECAY``, ``TAU``, ``INV_GAMMA``, ``POWER``, ``MIN_DECAY``, ...) an integer is
what people write, so :func:`accept_integers_for_floats` lets yacs take it, as a float. Every
other key, and every other type (a bool, a string) is checked by yacs as before.

yacs makes this check in one module-level function used by both merge paths; it is wrapped once,
and the wrapper passes everything but those keys through unchanged.

Example::

    cfg = get_cfg(); add_model_ema_configs(cfg)     # calls accept_integers_for_floats
    cfg.merge_from_list(["MODEL_EMA.TAU", "5"])     # cfg.MODEL_EMA.TAU == 5.0
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ['accept_integers_for_floats']


def accept_integers_for_floats(keys: Iterable[str]) -> None:
    """Let yacs merge an ``int`` into the float keys ``keys`` (full names, e.g.
    ``"MODEL_EMA.TAU"``); every call adds to the keys so accepted."""
    import yacs.config as yacs_config

    check = yacs_config._check_and_coerce_cfg_value_type
    float_keys = getattr(check, "d2ema_float_keys", None)
    if float_keys is None:
        float_keys = set()
        original = check

        def check(replacement: Any, original_value: Any, key: str, full_key: str) -> Any:
            if full_key in float_keys and type(original_value) is float and (
                type(replacement) is int
            ):
                return float(replacement)
            return original(replacement, original_value, key, full_key)

        check.d2ema_float_keys = float_keys  # type: ignore[attr-defined]
        yacs_config._check_and_coerce_cfg_value_type = check
    float_keys.update(keys)
