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

    cfg = get_cfg(); add_model_ema_configs(cfg)     # calls accept_integers_for_floats()
    cfg.merge_from_list(["MODEL_EMA.TAU", "5"])     # cfg.MODEL_EMA.TAU == 5.0
"""

from __future__ import annotations

from typing import Any

__all__ = ["FLOAT_KEYS", "accept_integers_for_floats"]


def _float_keys() -> frozenset[str]:
    from .config import KEYS

    return frozenset(f"MODEL_EMA.{k}" for k, (d, _) in KEYS.items() if isinstance(d, float))


FLOAT_KEYS = _float_keys()


def accept_integers_for_floats() -> None:
    """Let yacs merge an ``int`` into a float key of ``MODEL_EMA`` (idempotent)."""
    import yacs.config as yacs_config

    check = yacs_config._check_and_coerce_cfg_value_type
    if getattr(check, "d2ema_wrapped", False):
        return

    def check_and_coerce(replacement: Any, original: Any, key: str, full_key: str) -> Any:
        if full_key in FLOAT_KEYS and type(original) is float and type(replacement) is int:
            return float(replacement)
        return check(replacement, original, key, full_key)

    check_and_coerce.d2ema_wrapped = True  # type: ignore[attr-defined]
    yacs_config._check_and_coerce_cfg_value_type = check_and_coerce
