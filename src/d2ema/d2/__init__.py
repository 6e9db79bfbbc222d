"""The detectron2 layer: config keys, hook, checkpointer, trainer and evaluation, delegating
to the core. ``d2ema.d2.compat`` is the seed article's / D2Go's API; ``d2ema.d2.engine.train_net``
is
what ``d2ema train`` runs.

Example::

    from d2ema.d2 import EMATrainer, add_model_ema_configs
    cfg = get_cfg(); add_model_ema_configs(cfg); cfg.MODEL_EMA.ENABLED = True
    trainer = EMATrainer(cfg); trainer.resume_or_load(resume=False); trainer.train()
"""

from d2ema.d2.checkpoint.checkpointers import EMACheckpointer, ema_checkpointables
from d2ema.d2.config.settings import (
    EMASettings,
    PostHocSettings,
    add_model_ema_configs,
    ema_settings,
    lazy_model_ema_defaults,
)
from d2ema.d2.data.datasets import register_coco_dataset
from d2ema.d2.engine.build import (
    EMAFamily,
    build_model_ema,
    get_ema_family,
    get_extra_emas,
    get_model_ema,
)
from d2ema.d2.engine.hooks import EMAHook
from d2ema.d2.engine.run_folder import setup_run
from d2ema.d2.engine.trainer import EMATrainer, EMATrainerMixin
from d2ema.d2.evaluation.evaluator import build_evaluator, evaluate_with_ema
from d2ema.errors import ConfigError, DatasetError, EMANotLoadedError, TrainerError

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
