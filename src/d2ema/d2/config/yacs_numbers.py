"""Integers where ``MODEL_EMA`` expects floats, in the yacs configs d2ema merges: ``TAU: 5``.

yacs checks every merged value against the type of the default and refuses an ``int`` for a
``float`` key ("Type mismatch (float vs int)"), in files (``merge_from_file``, ``_BASE_``
included) and command-line overrides (``merge_from_list``) alike. For the float keys of
``MODEL_EMA`` (``DECAY``, ``TAU``, ``INV_GAMMA``, ``POWER``, ``MIN_DECAY``, ...) an integer is
what people write, so the merges d2ema makes itself (``d2ema train``, ``d2ema demo``) run inside
`integers_for_floats`, which lets yacs take one, as a float. Every other key, and every other
type (a bool, a string), is checked by yacs as before.

Why a context manager around a private yacs function: yacs makes this check in one module-level
function that both merge paths call with the key and its default, and offers no per-config hook
(a ``MODEL_EMA`` node of another class fails yacs' own type check of the node itself). Converting
the values before the merge would mean redoing detectron2's ``_BASE_`` and version handling. So
the function is wrapped only while d2ema's own merge runs, and put back after: importing d2ema,
or ``add_model_ema_configs``, changes no config's rules, and a merge in your own script is plain
yacs (write ``TAU: 5.0`` there, or merge inside ``integers_for_floats()``).

Example::

    cfg = get_cfg(); add_model_ema_configs(cfg)
    with integers_for_floats():
        cfg.merge_from_list(["MODEL_EMA.TAU", "5"])     # cfg.MODEL_EMA.TAU == 5.0
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ['integers_for_floats']


_lock = threading.RLock()


@contextlib.contextmanager
def integers_for_floats(prefix: str = "MODEL_EMA.") -> Iterator[None]:
    """Inside, yacs merges an ``int`` into a float key whose full name starts with ``prefix``,
    as a float; outside, yacs is as it was (the wrapper is put back on exit, also on error)."""
    import yacs.config as yacs_config

    with _lock:  # one wrapper at a time; nested uses keep the outer one
        original = yacs_config._check_and_coerce_cfg_value_type

        def check(replacement: Any, original_value: Any, key: str, full_key: str) -> Any:
            if full_key.startswith(prefix) and type(original_value) is float and (
                type(replacement) is int
            ):
                return float(replacement)
            return original(replacement, original_value, key, full_key)

        yacs_config._check_and_coerce_cfg_value_type = check
        try:
            yield
        finally:
            yacs_config._check_and_coerce_cfg_value_type = original
