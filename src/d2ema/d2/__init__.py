"""The detectron2 layer: config keys, hook, checkpointer, trainer and evaluation, delegating
to the core. ``d2ema.d2.compat`` is the seed article's / D2Go's API; ``d2ema.d2.train_net`` is
what ``d2ema train`` runs.

Example::

    from d2ema.d2 import EMATrainer, add_model_ema_configs
    cfg = get_cfg(); add_model_ema_configs(cfg); cfg.MODEL_EMA.ENABLED = True
    trainer = EMATrainer(cfg); trainer.resume_or_load(resume=False); trainer.train()
"""

from ..errors import ConfigError, DatasetError, EMANotLoadedError, TrainerError
from .build import build_model_ema, get_model_ema
from .checkpoint import EMACheckpointer, ema_checkpointables
from .config import (
    EMASettings,
    PostHocSettings,
    add_model_ema_configs,
    ema_settings,
    lazy_model_ema_defaults,
)
from .datasets import register_coco_dataset
from .evaluation import build_evaluator, evaluate_with_ema
from .family import EMAFamily, get_ema_family, get_extra_emas
from .hooks import EMAHook
from .run_setup import setup_run
from .trainer import EMATrainer, EMATrainerMixin

__all__ = [
    "ConfigError",
    "DatasetError",
    "EMACheckpointer",
    "EMAFamily",
    "EMAHook",
    "EMANotLoadedError",
    "EMASettings",
    "EMATrainer",
    "EMATrainerMixin",
    "PostHocSettings",
    "TrainerError",
    "add_model_ema_configs",
    "build_evaluator",
    "build_model_ema",
    "ema_checkpointables",
    "ema_settings",
    "evaluate_with_ema",
    "get_ema_family",
    "get_extra_emas",
    "get_model_ema",
    "lazy_model_ema_defaults",
    "register_coco_dataset",
    "setup_run",
]
