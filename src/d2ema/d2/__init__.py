"""The detectron2 layer: config keys, hook, checkpointer and trainer, delegating to the core.

Example::

    from d2ema.d2 import EMATrainer, add_model_ema_configs
    cfg = get_cfg(); add_model_ema_configs(cfg); cfg.MODEL_EMA.ENABLED = True
    trainer = EMATrainer(cfg); trainer.resume_or_load(resume=False); trainer.train()
"""

from .build import build_model_ema, get_model_ema
from .checkpoint import EMACheckpointer, ema_checkpointables
from .config import (
    ConfigError,
    EMASettings,
    add_model_ema_configs,
    ema_settings,
    lazy_model_ema_defaults,
)
from .hooks import EMAHook
from .trainer import EMATrainer, EMATrainerMixin

__all__ = [
    "ConfigError",
    "EMACheckpointer",
    "EMAHook",
    "EMASettings",
    "EMATrainer",
    "EMATrainerMixin",
    "add_model_ema_configs",
    "build_model_ema",
    "ema_checkpointables",
    "ema_settings",
    "get_model_ema",
    "lazy_model_ema_defaults",
]
