"""The seed article's / D2Go's / detrex's model-EMA API, in D2Go's module paths.

* ``from d2ema import compat as model_ema`` (was: ``from d2go.modeling import ema as
  model_ema``): D2Go's ``d2go/modeling/ema.py``, see `d2ema.d2.compat`. Its names are
  looked up when first used, which imports detectron2.
* ``from d2ema.compat.ema_state import EMAState`` (was: ``from d2go.utils.ema_state import
  EMAState``): the ``EMAState(decay, device)`` of D2Go's Lightning task, see
  `d2ema.compat.ema_state`; it needs no detectron2.

Both delegate to `d2ema.EMA`.

Example::

    from d2ema import compat as model_ema
    model_ema.may_build_model_ema(cfg, model)
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    # D2Go's modeling API needs detectron2: imported on first use, so that
    # d2ema.compat.ema_state (no detectron2) imports this package without it.
    if name.startswith("__") and name != "__all__":
        raise AttributeError(name)
    if name == "ema_state":  # the submodule, not imported yet
        return importlib.import_module("d2ema.compat.ema_state")
    modeling = importlib.import_module("d2ema.d2.compat")
    try:
        return getattr(modeling, name)
    except AttributeError:
        raise AttributeError(f"module 'd2ema.compat' has no attribute {name!r}") from None
