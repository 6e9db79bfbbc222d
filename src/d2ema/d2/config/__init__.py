"""The ``MODEL_EMA`` settings of a detectron2 config (yacs ``MODEL_EMA.*`` or LazyConfig
``train.model_ema``): the one typed table of keys (`.keys`), the settings read and checked
once per run (`.settings`), which config system a config is (`.view`), a run folder's
saved ``config.yaml`` read as data and written plain (`.saved`), integers accepted for
floats in yacs (`.yacs_numbers`) and the generator of docs/configuration.md
(`.reference`).

Example::

    from d2ema.d2.config import add_model_ema_configs, ema_settings

    add_model_ema_configs(cfg)          # adds MODEL_EMA.* with its defaults
    settings = ema_settings(cfg)        # read and checked once
"""

from d2ema.d2.config.settings import (
    EMASettings,
    add_model_ema_configs,
    check_device,
    d2go_schedule,
    ema_settings,
    lazy_model_ema_defaults,
)

__all__ = [
    "EMASettings",
    "add_model_ema_configs",
    "check_device",
    "d2go_schedule",
    "ema_settings",
    "lazy_model_ema_defaults",
]
